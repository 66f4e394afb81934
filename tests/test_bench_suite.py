"""CPU smoke run of the pytest-benchmark suite (benchmarks/test_bench_moe.py) in a subprocess:
every case runs, the saved JSON carries the machine info and each case's physics, and a second
run compares against the first (the regression check between commits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root holds benchmarks/

from benchmarks import shapes  # noqa: E402

PATHS = ("dense", "torch_gmm", "loop", "flexkern:reference")


def run_suite(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
           "--bench-device", "cpu", "--bench-paths", "reference,loop,torch_gmm,dense", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    storage = f"file://{out / 'storage'}"
    proc = run_suite("--bench-rounds", "2", f"--benchmark-json={out / 'run.json'}",
                     "--benchmark-autosave", f"--benchmark-storage={storage}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "run.json").read_text()), storage


def test_machine_info_names_the_device_and_versions(saved):
    data, _ = saved
    info = data["machine_info"]
    assert info["gpu"] == "cpu" and info["torch"] and info["triton"]
    fk = info["flexkern"]
    for key in ("device", "gpu", "torch", "cuda", "triton", "flexkern", "dtype", "backends", "paths",
                "flop_model", "timer"):
        assert key in fk, key
    assert fk["device"] == "cpu" and fk["dtype"] == "float32"
    assert set(fk["paths"]) == set(PATHS) - {"dense"}


def test_every_case_ran_with_its_physics(saved):
    data, _ = saved
    by_name = {b["name"]: b for b in data["benchmarks"]}
    want = {f"test_moe_layer[{s.name}-{m}-{p}]" for s in shapes.CPU_SHAPES for m in s.modes for p in PATHS
            if not (p == "dense" and s.decode)}
    assert set(by_name) == want
    for b in data["benchmarks"]:
        x, shape = b["extra_info"], next(s for s in shapes.CPU_SHAPES if s.name == b["extra_info"]["shape"]["name"])
        assert b["group"] == f"{shape.name} {x['mode']}"
        assert b["stats"]["rounds"] == 2
        assert x["flops"] == shape.flops(x["mode"])
        assert x["median_ms"] == pytest.approx(b["stats"]["median"] * 1e3)
        assert x["tflops"] == pytest.approx(x["flops"] / (b["stats"]["median"] * 1e12))
        if not shape.decode:  # the dense ceiling runs first in each group
            assert x["dense_share"] == pytest.approx(x["dense_ms"] / x["median_ms"])
        else:
            assert x["bw_floor_share"] > 0 and x["touched_weight_bytes"] > 0
        if x["path"] not in ("dense", "torch_gmm"):
            assert x["speedup_vs_torch_gmm"] == pytest.approx(x["torch_gmm_ms"] / x["median_ms"])
        if shape.masked_frac and x["path"] != "dense":
            assert x["unmasked_shape"] == "tiny" and x["mask_time_saved"] < 1
        if shape.hot_share:
            assert x["hot_expert_row_share"] == shape.hot_share == 0.5


def test_second_run_compares_against_the_saved_one(saved):
    _, storage = saved
    proc = run_suite("--bench-shapes", "tiny", "--bench-rounds", "1", f"--benchmark-storage={storage}",
                     "--benchmark-compare", "--benchmark-compare-fail=median:1000000%")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Comparing against benchmarks from" in proc.stdout + proc.stderr
    assert "(NOW)" in proc.stdout


def test_normal_test_run_does_not_collect_the_suite():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"]
    assert "python_files" not in ini  # the default test_*.py; benchmarks/ lies outside testpaths
    assert not (ROOT / "tests" / "test_bench_moe.py").exists()


def test_gpu_check_script_parses_and_plans_every_step(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for what in ("bench_moe --check", "pytest benchmarks", "--benchmark-json=", "--breakdown-only",
                 "--trace-dir", "tune_experts --shapes"):
        assert what in proc.stdout, what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.txt"]  # a dry run writes only its plan
    bad = subprocess.run(["bash", str(script), "--no-such-flag"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
