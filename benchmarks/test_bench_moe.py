"""The MoE layer benchmark as a pytest-benchmark suite: one case per (shape, mode, path).

    pytest benchmarks --benchmark-json=bench.json [--benchmark-compare] [--bench-shapes qwen3,...]

Paths as in bench_moe (moe_paths): dense (the ceiling: same GEMMs, one group), torch_gmm
(torch._grouped_mm), loop (per-expert), flexkern:<backend>, peers when installed; modes fwd
(no_grad) and fwd+bwd; shapes from benchmarks/shapes.py (masked-half drop, skewed routing,
Qwen3-like and decode included). Each case's extra_info holds the FLOP model's TFLOP/s and, where
measured in the same run, the share of the dense ceiling, the speed-up over torch_gmm, the time
saved by the mask (vs the unmasked twin shape), peak memory (GPU) and at decode sizes the share
of the weight-read floor.

Timing: pedantic rounds on the host clock read after torch.cuda.synchronize, the L2 flushed and
gradients cleared before each training round (not timed). Decode sizes replay a CUDA graph
``iterations`` times per round (no flush in between; benchmarks.bench_moe has the do_bench
numbers for microsecond cases). On the CPU: tiny shapes in float32, a smoke run; its times mean
nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import bench_moe, moe_paths, shapes, timing  # noqa: E402
from benchmarks.conftest import bench_device  # noqa: E402
from benchmarks.moe_paths import Path  # noqa: E402
from benchmarks.shapes import MoEShape  # noqa: E402

pytestmark = pytest.mark.benchmark(timer=timing.synced_clock, disable_gc=True, warmup=False)


@dataclass(frozen=True)
class Case:
    shape: MoEShape
    mode: str
    path: Path | None   # None: the dense ceiling

    @property
    def path_name(self) -> str:
        return self.path.name if self.path else "dense"

    @property
    def id(self) -> str:
        return f"{self.shape.name}-{self.mode}-{self.path_name}"


def cases(config) -> list[Case]:
    """In run order: per shape and mode, the dense ceiling first, then torch_gmm, then the rest,
    so every later case can be related to the ones it is compared with."""
    device = bench_device(config)
    if device.type == "cuda":
        presets = shapes.GPU_QUICK_SHAPES if config.getoption("--bench-quick") else shapes.GPU_SHAPES
    else:
        presets = shapes.CPU_SHAPES
    todo = shapes.select(presets, config.getoption("--bench-shapes"))
    paths, _, _, dense = bench_moe.pick_paths(device, config.getoption("--bench-paths"))
    paths = sorted(paths, key=lambda p: p.name != "torch_gmm")  # stable: torch_gmm first
    out = []
    for shape in todo:
        for mode in shape.modes:
            if dense and not shape.decode:
                out.append(Case(shape, mode, None))
            out += [Case(shape, mode, p) for p in paths]
    return out


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        todo = cases(metafunc.config)
        metafunc.parametrize("case", todo, ids=[c.id for c in todo])


class SuiteState:
    """What the cases of one session share: the current shape's inputs (one shape at a time),
    the medians measured so far (for the ratios), the copy bandwidth, the time budget."""

    def __init__(self, config):
        self.device = bench_device(config)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.rounds = config.getoption("--bench-rounds") or (10 if self.cuda else 3)
        budget = config.getoption("--bench-budget-s")
        self.deadline = time.monotonic() + budget if budget else None
        self.flush = timing.L2Flush(self.device)
        self.median_ms: dict[tuple[str, str, str], float] = {}
        self._inputs: tuple[str, moe_paths.LayerInputs] | None = None
        self._copy_Bps: float | None = None

    def inputs(self, shape: MoEShape) -> moe_paths.LayerInputs:
        if self._inputs is None or self._inputs[0] != shape.name:
            self._inputs = None
            bench_moe._free(self.cuda)
            self._inputs = (shape.name, moe_paths.make_inputs(shape, self.device, self.dtype))
        return self._inputs[1]

    @property
    def copy_Bps(self) -> float:
        if self._copy_Bps is None:
            self._copy_Bps = timing.copy_bandwidth_Bps(self.device)
        return self._copy_Bps


@pytest.fixture(scope="session")
def state(request):
    return SuiteState(request.config)


def _unmasked_twin(shape: MoEShape) -> str | None:
    """The shape with the same sizes and no mask, for the mask's time saving."""
    for s in shapes.GPU_SHAPES + shapes.GPU_QUICK_SHAPES + shapes.CPU_SHAPES:
        if (s.T, s.D, s.F, s.E, s.K, s.decode, s.hot_share) == (
                shape.T, shape.D, shape.F, shape.E, shape.K, shape.decode, shape.hot_share) and not s.masked_frac:
            return s.name
    return None


def test_moe_layer(benchmark, state, case):
    shape, mode = case.shape, case.mode
    if case.path is not None:
        reason = bench_moe.skip_reason(case.path, shape, mode)
        if reason:
            pytest.skip(reason)
    if state.deadline is not None and time.monotonic() > state.deadline:
        pytest.skip("time budget (--bench-budget-s) spent")
    benchmark.group = f"{shape.name} {mode}"
    inp = state.inputs(shape)
    flops = shape.flops(mode)
    info = benchmark.extra_info
    info.update(shape=shape.as_dict(), mode=mode, path=case.path_name, dtype=str(state.dtype)[6:],
                device=state.device.type, flops=flops,
                flop_model="18*T*K*D*F" if mode == "fwd+bwd" else "6*T*K*D*F",
                detail=case.path.detail if case.path else "torch.mm, same GEMMs in one group")
    if shape.hot_share:
        rows_E = moe_paths.expert_rows(inp)
        info["hot_expert_row_share"] = float(rows_E[0]) / float(rows_E.sum())

    leaves: list[torch.Tensor] = []
    graph = False
    if case.path is None:
        fn = moe_paths.dense_ceiling(shape, mode, state.device, state.dtype)
    else:
        fwd, leaves = case.path.build(inp)
        if mode == "fwd":
            def fn(fwd=fwd):
                with torch.no_grad():
                    return fwd()
        else:
            dy_TD = torch.randn_like(inp.x_TD)

            def fn(fwd=fwd, dy_TD=dy_TD):
                fwd().backward(dy_TD)
                return inp.x_TD.grad

    def clear_grads():
        for t in leaves:
            t.grad = None

    try:
        out = fn()  # first call: compiles, and is checked (a benchmark that can fail)
        if case.path is not None:
            assert out is not None and bool(torch.isfinite(out).all()), f"{case.id}: non-finite output"
        clear_grads()
        if state.cuda:
            info["peak_mib"] = timing.peak_memory_mb(fn, state.device, leaves)
        if shape.decode and state.cuda and case.path.capturable:
            try:
                fn, graph = timing.capture_graph(fn), True
            except Exception as exc:  # eager then, and said so
                info["note"] = f"graph capture failed ({type(exc).__name__}); eager"
                torch.cuda.synchronize()
        info["graph"] = graph
        if shape.decode:
            iters = 50 if state.cuda else 1
            info["iterations_per_round"] = iters
            benchmark.pedantic(fn, rounds=state.rounds, iterations=iters, warmup_rounds=1)
        else:
            def setup():
                clear_grads()
                state.flush()

            benchmark.pedantic(fn, setup=setup, rounds=state.rounds, warmup_rounds=1)
    finally:
        clear_grads()

    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    ms = benchmark.stats.stats.median * 1e3
    key = (shape.name, mode, case.path_name)
    state.median_ms[key] = ms
    info.update(median_ms=ms, tflops=flops / (ms * 1e9))
    dense_ms = state.median_ms.get((shape.name, mode, "dense"))
    if dense_ms is not None:
        info.update(dense_ms=dense_ms, dense_share=dense_ms / ms)
    gmm_ms = state.median_ms.get((shape.name, mode, "torch_gmm"))
    if gmm_ms is not None and case.path_name != "torch_gmm":
        info.update(torch_gmm_ms=gmm_ms, speedup_vs_torch_gmm=gmm_ms / ms)
    twin = _unmasked_twin(shape) if shape.masked_frac else None
    full_ms = state.median_ms.get((twin, mode, case.path_name)) if twin else None
    if full_ms is not None:
        info.update(unmasked_shape=twin, unmasked_ms=full_ms, mask_time_saved=1 - ms / full_ms)
    if shape.decode:
        nbytes = bench_moe.touched_weight_bytes(inp)
        floor_ms = nbytes / state.copy_Bps * 1e3
        info.update(touched_weight_bytes=nbytes, bw_floor_ms=floor_ms, bw_floor_share=floor_ms / ms)
