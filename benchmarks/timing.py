"""Timing, CUDA-graph capture, peak memory and bandwidth measurement for the benchmarks.

On CUDA: ``triton.testing.do_bench`` (warmup, L2 flush between calls, median). On the CPU: a
wall-clock median over a few calls, for the smoke run only.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock() -> float:
    """Seconds on the host clock, read after the GPU has finished its queued work (a no-op wait
    on the CPU): a timer for pytest-benchmark that measures device time plus a sync's latency."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class L2Flush:
    """Overwrites a buffer larger than the GPU's L2 (do_bench does the same between calls), so
    a timed call does not start from the previous call's cached inputs. No-op on the CPU."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def bench_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25,
             rep_ms: float = 100, grad_to_none=None) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                              return_mode="median"))
    # CPU (smoke runs, the Triton interpreter): a first call that is already slow is not repeated.
    times = []
    while True:
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 50 or (sum(times) >= rep_ms and len(times) >= 3) or times[0] > 5 * rep_ms:
            break
    times = times[1:] or times  # the first call pays lazy initialisation
    return statistics.median(times)


def capture_graph(fn: Callable[[], object], warmup_calls: int = 3) -> Callable[[], None]:
    """Capture one call of ``fn`` into a CUDA graph and return its replay.

    Raises whatever capture raises (for example a host synchronisation inside ``fn``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def peak_memory_mb(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float | None:
    """Peak CUDA memory allocated during one call, above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    for t in grad_to_none or ():
        t.grad = None
    return peak / 2**20


def copy_bandwidth_Bps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (bytes read + written per second)."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms=10, rep_ms=50)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# Spec HBM bandwidth (bytes/s) by GPU name, for the decode floor next to the measured copy rate.
_HBM_SPEC = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12, "B200": 8.0e12}


def hbm_spec_Bps(gpu_name: str) -> float | None:
    if "PCIe" in gpu_name or "NVL" in gpu_name:  # other memory systems under the same names
        return None
    for key, bw in _HBM_SPEC.items():
        if key in gpu_name:
            return bw
    return None
