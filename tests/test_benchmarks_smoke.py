"""CPU smoke run of the MoE benchmark: it finishes, checks pass, and the JSON/PNG have their fields."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import bench_moe, shapes  # noqa: E402

LAYER_FIELDS = {"shape", "mode", "path", "status", "T", "D", "F", "E", "K", "ms", "tflops", "peak_mib", "graph"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--check", "--backends", "reference,loop,torch_gmm,dense",
            "--json", str(out / "b.json"), "--png", str(out / "b.png"),
            "--routing-json", str(out / "r.json")]
    rc = bench_moe.main(argv)
    return rc, out


def test_smoke_run_passes_its_checks(smoke):
    rc, out = smoke
    assert rc == 0
    data = json.loads((out / "b.json").read_text())
    assert data["partial"] is False
    assert data["check"] and all(c["status"] == "ok" for c in data["check"]), data["check"]
    assert all(c["err_y"] <= c["tol_y"] and c["err_dx"] <= c["tol_dx"] for c in data["check"])


def test_json_has_meta_and_physics(smoke):
    _, out = smoke
    data = json.loads((out / "b.json").read_text())
    meta = data["meta"]
    for key in ("device", "gpu", "torch", "triton", "dtype", "backends", "copy_bandwidth_GBps", "flop_model"):
        assert key in meta, key
    assert meta["copy_bandwidth_GBps"] > 0
    rows = data["layer"]
    want = {(s.name, m) for s in shapes.CPU_SHAPES for m in s.modes}
    assert {(r["shape"], r["mode"]) for r in rows} == want
    by_path = {r["path"] for r in rows}
    assert {"flexkern:reference", "loop", "torch_gmm", "dense"} <= by_path
    for r in rows:
        assert r["status"] == "ok", r
        assert LAYER_FIELDS <= set(r), set(LAYER_FIELDS) - set(r)
        shape = next(s for s in shapes.CPU_SHAPES if s.name == r["shape"])
        assert r["ms"] > 0
        assert r["tflops"] == pytest.approx(shape.flops(r["mode"]) / (r["ms"] * 1e9))
        if shape.hot_share:
            assert r["hot_expert_row_share"] == shape.hot_share
        if shape.decode:
            assert r["bw_floor_share"] > 0 and r["touched_weight_bytes"] > 0
        else:
            assert r["dense_share"] > 0


def test_routing_json_and_png(smoke):
    _, out = smoke
    routing = json.loads((out / "r.json").read_text())["routing"]
    assert {r["path"] for r in routing} == {"torch_composite", "flexkern"}
    assert all(r["status"] == "ok" and r["us"] > 0 for r in routing)
    assert any("speedup" in r for r in routing)
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.select(shapes.CPU_SHAPES, "no-such-shape")


def test_bench_engines_cpu_smoke(tmp_path):
    """The engines benchmark: both paths run for every installed engine, side by side."""
    from benchmarks import bench_engines

    engines = [e for e in bench_engines.ENGINES if bench_engines.installed(e)]
    if not engines:
        pytest.skip("no training engine installed (pip install 'flexkern[olmo-core,torchtitan]')")
    assert bench_engines.main(["--dry-run"]) == 0
    assert bench_engines.main(["--shapes", "tiny", "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["engines"]
    assert {(r["engine"], r["path"]) for r in rows} == {(e, p) for e in engines for p in ("engine", "flexkern")}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert all("speedup" in r for r in rows if r["path"] == "flexkern")
