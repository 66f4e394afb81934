"""tune_experts on the CPU (Triton interpreter): the breakdown, its JSON and the gzipped trace are
written, so the GPU session's per-kernel step does not fail on its first run."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tune(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "benchmarks.tune_experts", "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_breakdown_writes_json_and_trace(tmp_path):
    proc = run_tune("--breakdown-only", "--shapes", "tiny-skew50", "--json", str(tmp_path / "t.json"),
                    "--trace-dir", str(tmp_path / "traces"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "t.json").read_text())
    assert "interpreter" in data["gpu"] and data["torch"]
    (res,) = data["results"]
    assert res["shape"]["name"] == "tiny-skew50" and res["shape"]["hot_share"] == 0.5
    assert res["breakdown_ms"] and all(ms > 0 for _, ms in res["breakdown_ms"])
    assert res["roles"] == {}  # --breakdown-only: no sweep
    trace = json.loads(gzip.decompress((tmp_path / "traces" / "trace_tiny-skew50.json.gz").read_bytes()))
    assert trace["traceEvents"]
    assert not [p for p in (tmp_path / "traces").iterdir() if p.name.startswith(".tmp")]


def test_bad_arguments_are_refused(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import tune_experts

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        tune_experts.main(["--device", "cpu", "--shapes", "tiny"])
    with pytest.raises(SystemExit, match="unknown role"):
        tune_experts.main(["--device", "cpu", "--shapes", "tiny", "--roles", "nope"])
    with pytest.raises(ValueError, match="unknown shape"):
        tune_experts.main(["--shapes", "nope"])


def test_kernel_launches_label_roles_in_launch_order():
    sys.path.insert(0, str(ROOT))
    from torch.autograd import DeviceType

    from benchmarks import tune_experts

    class Interval:
        def __init__(self, start, us):
            self.start, self.us = start, us

        def elapsed_us(self):
            return self.us

    class Event:
        def __init__(self, name, start, us, device=DeviceType.CUDA):
            self.name, self.time_range, self.device_type = name, Interval(start, us), device

    # one forward+backward, listed out of order; a CPU op and an unknown kernel mixed in
    seq = ["grouped_gemm_kernel", "grouped_gemm_kernel", "gather_sum_kernel", "recompute_kernel",
           "wgrad_kernel", "slot_sum_kernel", "grouped_gemm_kernel", "gather_sum_kernel", "wgrad_kernel",
           "elementwise_kernel<float>", "grouped_gemm_kernel"]
    events = [Event(n, start=10 * i, us=1000 * (i + 1)) for i, n in enumerate(seq)]
    events.append(Event("aten::mm", start=5, us=7, device=DeviceType.CPU))

    class Prof:
        def events(self):
            return list(reversed(events))

    got = tune_experts.kernel_launches(Prof())
    assert [r["role"] for r in got] == ["gate_up", "down", "combine", "recompute", "wgrad_down", "d_weights",
                                        "dx", "combine_dx", "wgrad_gate_up", "elementwise_kernel<float>",
                                        "grouped_gemm_kernel#3"]
    assert [r["ms"] for r in got] == [float(i + 1) for i in range(len(seq))]
    rated = tune_experts.kernel_launches(Prof(), ndf=1e9)
    gate_up, down = rated[0], rated[1]
    assert gate_up["tflops"] == 4 * 1e9 / (1.0 * 1e9) and down["tflops"] == 2 * 1e9 / (2.0 * 1e9)
    assert "tflops" not in rated[2]  # the combine is no GEMM


def test_sweep_tries_every_grouped_tile_order():
    """Each role's sweep adds its current tiles in the other grouped tile orders (group_m)."""
    sys.path.insert(0, str(ROOT))
    import dataclasses

    from benchmarks import tune_experts

    cur = tune_experts.T_(64, 128, 64, 4, 3, 8)
    got = tune_experts.group_m_variants(cur)
    assert sorted(c.group_m for c in got) == sorted(g for g in tune_experts.GROUP_MS if g != 8)
    assert all(dataclasses.replace(c, group_m=8) == cur for c in got)  # only the order differs
    assert 1 in tune_experts.GROUP_MS and all(c.group_m == 1 for c in tune_experts.CANDIDATES["wgrad"])
