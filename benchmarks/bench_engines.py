"""The training engines' MoE step with and without flexkern (OLMo-core, torchtitan), in one run.

    python -m benchmarks.bench_engines [--shapes olmoe,qwen3] [--json PATH] [--dry-run]

For each installed engine and each shape (benchmarks/shapes.py: T tokens, D, F, E experts, K):
the engine's module timed forward+backward as the engine runs it, then a copy after
``use_flexkern`` (flexkern/integrations/), same inputs, same run:

- torchtitan: the whole MoE block (router, local token dispatcher, GroupedExperts);
- OLMo-core: on a GPU the whole dropless MoE block (router, ParallelDroplessMLP with OLMo-core's
  Triton permutation kernels, DroplessMoEMLP; its experts use the ``grouped_gemm`` package when
  installed, else a per-expert loop, which the row's note says); on the CPU OLMo-core's kernels do
  not run, so its expert MLP alone on rows already grouped by expert.

Reported: ms (median), TFLOP/s with the SwiGLU experts' 18·T·K·D·F forward+backward FLOPs
(routing and permutation not counted), flexkern's speed-up, peak memory (GPU). A GPU runs bf16
weights and activations at the GPU shapes; the CPU runs float32 tiny shapes (timings mean
nothing there: a smoke test that every path runs). ``--dry-run`` prints the plan only.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import warnings
from pathlib import Path as _FsPath

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(_FsPath(__file__).resolve().parent.parent))

import torch

from benchmarks import report, timing
from benchmarks.shapes import CPU_SHAPES, GPU_SHAPES, MoEShape, select

ENGINES = ("torchtitan", "olmo_core")
GPU_DEFAULT = "olmoe,qwen3,mixtral"
CPU_DEFAULT = "tiny,tiny-qwen3"


def installed(engine: str) -> bool:
    return importlib.util.find_spec(engine) is not None


# ---- the engines' modules ----------------------------------------------------------------------------
def torchtitan_block(s: MoEShape, device, dtype):
    """torchtitan's MoE block (softmax router, top-K, local dispatcher, GroupedExperts) and its
    input; the step is forward + backward of the block."""
    from torchtitan.models.common import config_utils as cu

    router = cu.make_router_config(dim=s.D, num_experts=s.E, gate_param_init={}, top_k=s.K,
                                   score_func="softmax")
    routed = cu.make_routed_experts_config(dim=s.D, hidden_dim=s.F, num_experts=s.E, top_k=s.K,
                                           param_init={}, comm_backend="standard")
    block = cu.make_moe_config(num_experts=s.E, router=router, routed_experts=routed,
                               load_balance_coeff=None).build()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=s.D ** -0.5)
    block = block.to(device, dtype)
    x = torch.randn(1, s.T, s.D, device=device, dtype=dtype)
    return block, (x,), ""


def olmo_core_block(s: MoEShape, device, dtype):
    """OLMo-core's dropless MoE block on a GPU; its expert MLP on grouped rows on the CPU."""
    from olmo_core.nn.moe import MoEConfig, MoERouterConfig, MoEType
    from olmo_core.nn.moe.mlp import DroplessMoEMLP, gmm

    note = "" if gmm is not None else "OLMo-core experts: per-expert loop (no grouped_gemm package)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Grouped GEMM not available": said in the note
        if device.type == "cuda":
            cfg = MoEConfig(name=MoEType.dropless, num_experts=s.E, hidden_size=s.F,
                            router=MoERouterConfig(top_k=s.K), lb_loss_weight=None)
            block = cfg.build(d_model=s.D, init_device=device.type).to(dtype)
            return block, (torch.randn(1, s.T, s.D, device=device, dtype=dtype),), note
        mlp = DroplessMoEMLP(d_model=s.D, hidden_size=s.F, num_experts=s.E, dtype=dtype)
    counts = torch.full((s.E,), s.T * s.K // s.E, dtype=torch.int64)
    counts[: s.T * s.K - int(counts.sum())] += 1
    x = torch.randn(s.T * s.K, s.D, dtype=dtype)
    return mlp, (x, counts), (note + "; " if note else "") + "CPU: the expert MLP alone"


BUILDERS = {"torchtitan": torchtitan_block, "olmo_core": olmo_core_block}


def use_flexkern(engine: str, module):
    return importlib.import_module(f"flexkern.integrations.{engine}").use_flexkern(module)


# ---- timing ------------------------------------------------------------------------------------------
def step_fn(module, inputs):
    """One forward + backward; returns the callable and the tensors whose .grad it sets."""
    x, *rest = inputs
    x = x.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        y = module(x, *rest)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))

    return step, [x, *params]


def run(device: torch.device, shapes, engines, budget_rows: int | None = None) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for s in shapes:
        for engine in engines:
            base = {"engine": engine, **s.as_dict(), "dtype": str(dtype).replace("torch.", "")}
            try:
                torch.manual_seed(0)
                module, inputs, note = BUILDERS[engine](s, device, dtype)
                ours = use_flexkern(engine, copy.deepcopy(module))
            except Exception as exc:  # an engine that cannot build this shape here: say so, go on
                rows.append({**base, "path": "engine", "status": f"error: {type(exc).__name__}: {exc}"[:300]})
                continue
            times = {}
            for path, m in (("engine", module), ("flexkern", ours)):
                row = {**base, "path": path, "note": note if path == "engine" else ""}
                try:
                    step, grads = step_fn(m, inputs)
                    ms = timing.bench_ms(step, device, rep_ms=100 if device.type == "cuda" else 20,
                                         grad_to_none=grads)
                    times[path] = ms
                    row.update(status="ok", ms=ms, tflops=s.flops("fwd+bwd") / ms / 1e9,
                               peak_mib=timing.peak_memory_mb(step, device, grad_to_none=grads))
                except Exception as exc:
                    row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                rows.append(row)
            if len(times) == 2:
                rows[-1]["speedup"] = times["engine"] / times["flexkern"]
            del module, ours
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'engine':<11} {'shape':<14} {'path':<9} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'speedup':>8}  note")
    for r in rows:
        head = f"{r['engine']:<11} {r['name']:<14} {r['path']:<9}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{head} {r['ms']:>9.3f} {r['tflops']:>8.2f} {peak:>9} {sp:>8}  {r.get('note', '')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", help=f"comma-separated shape names (GPU default {GPU_DEFAULT}; CPU {CPU_DEFAULT})")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: torchtitan, olmo_core")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    shapes = select(all_shapes, args.shapes or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT))
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
    engines = [e for e in wanted if installed(e)]
    missing = [e for e in wanted if e not in engines]
    print(f"bench_engines on {device.type}: engines {engines or 'none'}"
          + (f" (not installed: {missing}; pip install 'flexkern[olmo-core,torchtitan]')" if missing else ""))
    for s in shapes:
        print(f"  {s.name}: T={s.T} D={s.D} F={s.F} E={s.E} K={s.K}, {s.flops('fwd+bwd') / 1e12:.3f} TFLOP a step")
    if args.dry_run or not engines:
        return 0
    rows = run(device, shapes, engines)
    print_table(rows)
    if args.json:
        report.write_json(args.json, {"meta": report.environment(device), "engines": rows,
                                      "missing_engines": missing})
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
