"""bench_ep runs under torchrun on the CPU (gloo smoke run) and reports every phase."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_ep import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ep_smoke(tmp_path):
    out = tmp_path / "ep.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "benchmarks" / "bench_ep.py"),
           "--tokens", "16", "--iters", "2", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and set(res["modes"]) == {"exact", "capacity"}
    for row in res["modes"].values():
        assert all(row[f"{p}_ms"] > 0 for p in ("routing", "exchange", "experts", "combine"))
    assert res["modes"]["capacity"]["overflow_slots"] >= 0
    assert "exchange bytes per token per layer" in proc.stdout
