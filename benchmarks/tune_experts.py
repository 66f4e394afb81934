"""Sweep the launch configs of the Triton expert kernels on a GPU, one kernel role at a time.

    python -m benchmarks.tune_experts --shapes olmoe,mixtral --json tune.json
    python -m benchmarks.tune_experts --breakdown-only --trace-dir traces/ --shapes qwen3,mixtral-skew50

For each shape it prints the per-kernel time breakdown of one forward+backward (torch.profiler)
with the current table (``--trace-dir``: also a gzipped Chrome trace of it per shape), then varies each role's TileConfig (gate_up and down timed through the
forward, recompute, dx and wgrad through the backward) with the others fixed, and reports the best
candidate per role next to the current one. Each role's candidates are the CANDIDATES tiles plus
its current tiles in every grouped tile order of GROUP_MS (``group_m``). The winners go into
flexkern/triton/configs.py by hand (and ``python -m flexkern.triton.compile_check --group-m ...``
checks they compile for sm_90).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import time

import torch
from torch.autograd import DeviceType

import flexkern
from flexkern.triton import configs, ops as triton_ops

from . import report
from .moe_paths import force_hot_expert
from .shapes import CPU_SHAPES, GPU_QUICK_SHAPES, GPU_SHAPES, select
from .timing import bench_ms

T_ = configs.TileConfig
CANDIDATES = {
    "gate_up": [T_(128, 128, 64, 8, 4), T_(128, 256, 64, 8, 3), T_(64, 128, 64, 4, 4), T_(128, 64, 64, 4, 4),
                T_(128, 128, 32, 8, 4)],
    "down": [T_(128, 128, 64, 8, 3), T_(128, 256, 64, 8, 3), T_(64, 128, 64, 4, 4), T_(128, 64, 64, 4, 4),
             T_(128, 128, 32, 8, 4)],
    "recompute": [T_(128, 64, 64, 8, 3), T_(128, 128, 32, 8, 3), T_(64, 128, 64, 8, 3), T_(64, 64, 64, 4, 4)],
    "dx": [T_(128, 128, 64, 8, 3), T_(128, 256, 64, 8, 3), T_(64, 128, 64, 4, 4), T_(128, 64, 64, 4, 4)],
    # row-major like the table's wgrad entries; the grouped orders come from GROUP_MS below
    "wgrad": [T_(128, 128, 32, 8, 4, 1), T_(128, 256, 64, 8, 3, 1), T_(64, 128, 64, 4, 4, 1),
              T_(128, 128, 128, 8, 2, 1), T_(256, 128, 64, 8, 3, 1)],
}
# Grouped (L2-aware) tile orders tried on each role's current config, tiles unchanged: 1 is
# row-major; the GEMMs' table entries use 8, wgrad's 1 (TileConfig.group_m).
GROUP_MS = (1, 4, 8, 16)


def group_m_variants(cfg: configs.TileConfig) -> list[configs.TileConfig]:
    """``cfg`` with each other grouped tile order of GROUP_MS."""
    return [dataclasses.replace(cfg, group_m=g) for g in GROUP_MS if g != cfg.group_m]
FORWARD_ROLES = ("gate_up", "down")


def make_inputs(shape, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    T, D, F, E, K = shape.T, shape.D, shape.F, shape.E, shape.K

    def r(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

    x = r(T, D)
    ws = (r(E, F, D, scale=D**-0.5), r(E, F, D, scale=D**-0.5), r(E, D, F, scale=F**-0.5))
    router = r(E, D, scale=D**-0.5)
    if shape.hot_share:  # the skewed shape's routing, as in the layer benchmark
        force_hot_expert(x, router, shape.hot_tokens, g)
    mask = None
    if shape.masked_frac:
        mask = torch.ones(E, dtype=torch.bool, device=device)
        mask[::2] = False
    weights, experts, _ = flexkern.route(x, router, K)
    disp = flexkern.dispatch(experts, E, mask, validate=False)
    return x, ws, disp, weights, r(T, D)


def kernel_breakdown(fwd, bwd, trace_path: str | None = None, launches: list | None = None,
                     ndf: float | None = None) -> list[tuple[str, float]]:
    """The 12 costliest kernels of one forward+backward: (name, ms). ``trace_path``: also write
    the profile there as a gzipped Chrome trace (chrome://tracing, ui.perfetto.dev);
    ``launches``: extended with every kernel launch and its role (kernel_launches)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:  # compile and warm up outside the profile (the interpreter has nothing to warm)
        fwd(), bwd()
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        fwd(), bwd()
        if cuda:
            torch.cuda.synchronize()
    if trace_path:
        _write_trace(prof, trace_path)
    if launches is not None:
        launches.extend(kernel_launches(prof, ndf))
    events = prof.key_averages()
    # kernels only: with CPU activity recorded, the CPU ops above them carry their device time too
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if cuda:
        rows = [(e.key, e.device_time_total / 1e3) for e in kernels or events]
    else:  # the interpreter: Python-level ops on the host clock
        rows = [(e.key, e.cpu_time_total / 1e3) for e in events]
    return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])[:12]


# Launch order of flexkern's Triton kernels in one forward+backward with saved activations
# (flexkern/triton/ops.py): the n-th launch of a kernel name is this role.
ROLE_ORDER = {
    "grouped_gemm_kernel": ("gate_up", "down", "dx"),
    "gather_sum_kernel": ("combine", "combine_dx"),
    "recompute_kernel": ("recompute",),
    "wgrad_kernel": ("wgrad_down", "wgrad_gate_up"),
    "slot_sum_kernel": ("d_weights",),
}


# Useful FLOPs of each GEMM role in units of N·D·F (N routed rows): forward 6, backward with the
# saved gate/up pre-activations 12 (the recompute kernel then only computes dh).
ROLE_FLOPS = {"gate_up": 4, "down": 2, "recompute": 2, "dx": 4, "wgrad_down": 2, "wgrad_gate_up": 4}


def kernel_launches(prof, ndf: float | None = None) -> list[dict]:
    """Every GPU kernel of the profile in launch order, with the role it plays: the roles share
    kernel names (gate_up, down and dx are all grouped_gemm_kernel), which key_averages merges.
    ``ndf`` (N·D·F): each GEMM role also gets its TFLOP/s (ROLE_FLOPS)."""
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    seen: dict[str, int] = {}
    out = []
    for e in events:
        base = next((k for k in ROLE_ORDER if k in e.name), None)
        role = e.name[:60]
        if base is not None:
            n = seen.get(base, 0)
            seen[base] = n + 1
            roles = ROLE_ORDER[base]
            role = roles[n] if n < len(roles) else f"{base}#{n}"
        row = {"role": role, "kernel": e.name[:120], "ms": e.time_range.elapsed_us() / 1e3}
        if ndf and role in ROLE_FLOPS and row["ms"] > 0:
            row["tflops"] = ROLE_FLOPS[role] * ndf / (row["ms"] * 1e9)
        out.append(row)
    return out


def _write_trace(prof, path: str) -> None:
    """Chrome trace, gzipped, written to a temporary name and moved into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    raw = os.path.join(folder, f".tmp-{os.getpid()}-trace.json")
    prof.export_chrome_trace(raw)
    try:
        with open(raw, "rb") as src, gzip.open(path + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.replace(path + ".tmp", path)
    finally:
        os.unlink(raw)


def sweep(shape, breakdown_only: bool = False, trace_dir: str | None = None,
          progress=lambda result: None, roles=tuple(CANDIDATES), device="cuda") -> dict:
    """Breakdown, then the sweep role by role; ``progress(result)`` after each step (so a run
    that is cut short keeps what it measured)."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    x, ws, disp, weights, dy = make_inputs(shape, dtype, device)
    args = (x, *ws, *disp.tensors(), weights, None)
    # The training path: the forward saves the gate/up pre-activations, the backward loads them.
    fwd = lambda: triton_ops.experts_fwd_triton(*args, save_activations=True)  # noqa: E731
    _, g_NF, u_NF = fwd()
    bwd = lambda: triton_ops.experts_bwd_triton(dy, *args, g_NF=g_NF, u_NF=u_NF)  # noqa: E731
    base = configs.pick(x.device, x.dtype, disp.token_of_row_N.shape[0], shape.E)
    result = {"shape": shape.as_dict(), "base": dataclasses.asdict(base), "roles": {}}
    try:
        trace = os.path.join(trace_dir, f"trace_{shape.name}.json.gz") if trace_dir else None
        result["launches"] = []
        rows = int(disp.tensors()[0].reshape(-1)[-1])  # routed rows (dropped ones excluded)
        result["routed_rows"] = rows
        result["breakdown_ms"] = kernel_breakdown(fwd, bwd, trace, result["launches"],
                                                  float(rows) * shape.D * shape.F)
        if trace:
            result["trace"] = trace
    except Exception as exc:  # the profiler is a nice-to-have; the sweep is the point
        print(f"kernel breakdown failed: {exc!r}")
        result["breakdown_ms"] = []
    print(f"\n== {shape.name}: kernel time of one forward+backward (ms)")
    for name, ms in result["breakdown_ms"]:
        print(f"  {ms:9.3f}  {name[:90]}")
    if result.get("launches"):
        total = sum(r["ms"] for r in result["launches"])
        print(f"  by role, in launch order (kernels sum to {total:.3f} ms):")
        for r in result["launches"]:
            rate = f"{r['tflops']:6.1f} TFLOP/s" if "tflops" in r else " " * 13
            print(f"  {r['ms']:9.3f}  {100 * r['ms'] / total:5.1f}%  {rate}  {r['role']:<16} {r['kernel'][:50]}")
    progress(result)
    if breakdown_only:
        return result
    original = triton_ops.pick
    try:
        for role in roles:
            cands = CANDIDATES[role] + group_m_variants(getattr(base, role))
            fn = fwd if role in FORWARD_ROLES else bwd
            rows = []
            for cand in [getattr(base, role)] + cands:
                cfg = dataclasses.replace(base, **{role: cand})
                triton_ops.pick = lambda *a, _cfg=cfg: _cfg
                t0 = time.time()
                try:
                    ms = bench_ms(fn, x.device, warmup_ms=10, rep_ms=60)
                except Exception as exc:  # a config that does not compile or fit is just skipped
                    ms = float("nan")
                    print(f"  {role} {cand}: failed ({type(exc).__name__})")
                rows.append({"config": dataclasses.asdict(cand), "ms": ms, "s": time.time() - t0})
            ok = [r for r in rows if r["ms"] == r["ms"]]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            result["roles"][role] = {"rows": rows, "best": best}
            if best:
                print(f"  {role:<10} current {rows[0]['ms']:.3f} ms -> best {best['ms']:.3f} ms {best['config']}")
            progress(result)
    finally:
        triton_ops.pick = original
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="olmoe,mixtral")
    ap.add_argument("--json")
    ap.add_argument("--breakdown-only", action="store_true",
                    help="only the per-kernel breakdown of the current configs, no sweep")
    ap.add_argument("--trace-dir", help="write a gzipped Chrome trace per shape here")
    ap.add_argument("--roles", default=",".join(CANDIDATES),
                    help=f"kernel roles to sweep, comma-separated (default: all of {','.join(CANDIDATES)})")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the Triton interpreter (TRITON_INTERPRET=1), to test this script only")
    a = ap.parse_args(argv)
    shapes = select(GPU_SHAPES + GPU_QUICK_SHAPES + CPU_SHAPES, a.shapes)  # unknown names fail here
    roles = tuple(r.strip() for r in a.roles.split(",") if r.strip())
    if unknown := [r for r in roles if r not in CANDIDATES]:
        raise SystemExit(f"unknown role(s) {unknown}; known: {list(CANDIDATES)}")
    if a.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--device cpu needs TRITON_INTERPRET=1 (the Triton interpreter)")
        name = "cpu (Triton interpreter; times mean nothing)"
    elif not torch.cuda.is_available():
        print("tune_experts needs a CUDA GPU; nothing to do")
        return 0
    else:
        name = torch.cuda.get_device_name()
    out = {"gpu": name, "torch": torch.__version__, "results": []}
    for s in shapes:
        done = list(out["results"])

        def progress(result, done=done):  # the JSON holds every step so far
            if a.json:
                report.write_json(a.json, {**out, "results": done + [result]})

        out["results"].append(sweep(s, a.breakdown_only, a.trace_dir, progress, roles, a.device))
        progress(out["results"][-1], done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
