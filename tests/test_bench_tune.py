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
