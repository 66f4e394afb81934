"""pytest-benchmark setup of the MoE layer suite (benchmarks/test_bench_moe.py).

    pytest benchmarks --benchmark-json=bench.json                  # GPU: bf16, the GPU shapes
    pytest benchmarks --benchmark-autosave                         # record a run (.benchmarks/)
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%   # vs the last run

Options: --bench-shapes a,b  --bench-paths torch_gmm,triton,dense  --bench-quick
--bench-device auto|cuda|cpu  --bench-rounds N  --bench-budget-s S. The saved machine info gets a
"flexkern" entry: GPU name, torch/CUDA/triton/flexkern versions, dtype, backends and the paths.
The normal test suite (testpaths = tests) never collects this folder.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("flexkern benchmark suite")
    g.addoption("--bench-shapes", default=None, help="comma-separated shape names (benchmarks/shapes.py)")
    g.addoption("--bench-paths", default=None,
                help="comma-separated paths: dense,torch_gmm,loop,triton,cuda,reference,auto,peer:<lib>")
    g.addoption("--bench-quick", action="store_true", help="GPU: the smaller --quick shapes")
    g.addoption("--bench-device", default="auto", choices=("auto", "cuda", "cpu"),
                help="cpu forces the smoke run even where a GPU exists")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case (default: 10 GPU, 3 CPU)")
    g.addoption("--bench-budget-s", type=float, default=None,
                help="skip the cases that would start after this many seconds")


def bench_device(config) -> torch.device:
    want = config.getoption("--bench-device")
    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device")
    return torch.device("cuda" if want != "cpu" and torch.cuda.is_available() else "cpu")


def flexkern_machine_info(config) -> dict:
    """What a saved run must carry to be compared: the card, the software and what was timed."""
    from benchmarks import bench_moe, report

    device = bench_device(config)
    env = report.environment(device)
    del env["date"]  # the run's date is pytest-benchmark's own field; machine info must not drift
    paths, same, peer_status, dense = bench_moe.pick_paths(device, config.getoption("--bench-paths"))
    env.update(dtype="bfloat16" if device.type == "cuda" else "float32",
               paths={p.name: p.detail for p in paths}, paths_same_as=same, dense=dense, peers=peer_status,
               flop_model={"fwd": "6*T*K*D*F", "fwd+bwd": "18*T*K*D*F"},
               timer="host clock after torch.cuda.synchronize (benchmarks.timing.synced_clock)")
    if device.type == "cuda":
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["gpu_count"] = torch.cuda.device_count()
    return env


if importlib.util.find_spec("pytest_benchmark") is not None:  # the hook exists only with the plugin
    def pytest_benchmark_update_machine_info(config, machine_info):
        info = flexkern_machine_info(config)
        machine_info["flexkern"] = info
        # top level too: pytest-benchmark's compare warns when these differ between runs
        machine_info["gpu"] = info["gpu"] or "cpu"
        machine_info["torch"] = info["torch"]
        machine_info["triton"] = info["triton"]
