"""Compile every expert kernel for a CUDA architecture without a GPU, and report shared memory.

    python -m flexkern.triton.compile_check --arch 90 --dtype bf16 [--regime large decode] [--group-m 4 8]

Triton lowers to PTX and runs its bundled ptxas offline, so a CPU machine can prove that each
launch-table entry compiles for Hopper (sm_90) and fits its shared memory. Integer sizes are given
16-divisibility, as aligned real shapes are specialised at launch. Must run with TRITON_INTERPRET
unset (the kernels must be built by triton.jit, not the interpreter). ``--group-m G ...`` also
compiles every table with each role's grouped tile order set to G (the values tune_experts
sweeps). Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import os
import sys

# Shared memory per block (opt-in maximum) by compute capability.
_MAX_SHARED = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
# Arguments that are counters, not sizes or strides: no divisibility hint.
_COUNTERS = {"E", "num_m", "num_n", "num_p", "num_q", "num_parts", "T", "TK"}


def _compile(fn, types: dict, consts: dict, cfg, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "i32")
        if sig[name].startswith("*") or name not in _COUNTERS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def kernels_of(table, dt: str):
    """(label, fn, pointer types, constexprs, config) for every launch of one ExpertsConfig."""
    from . import combine as cb
    from . import grouped_backward as gb
    from . import grouped_gemm as gg

    prec = "ieee" if dt == "fp32" else "tf32"
    ptr = f"*{dt}"
    idx = dict(offsets_ptr="*i64", token_ptr="*i32", slot_ptr="*i32", row_of_slot_ptr="*i32")
    gemm_t = dict(idx, a_ptr=ptr, a2_ptr=ptr, b_ptr=ptr, b2_ptr=ptr, c_ptr=ptr, g_ptr=ptr, u_ptr=ptr)

    def gemm(cfg, mode, gather, save=False):
        consts = dict(GATHER_A=gather, MODE=mode.value, SAVE_GU=save, PRECISION=prec, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_E=64, GROUP_M=cfg.group_m)
        consts["stride_bn" if mode.value == gg.MODE_DUAL.value else "stride_bk"] = 1
        return consts

    rec_t = dict(idx, weights_ptr="*fp32", pdw_ptr="*fp32",
                 **{n: ptr for n in ("x_ptr", "dy_ptr", "wg_ptr", "wu_ptr", "wd_ptr", "h_ptr", "dg_ptr",
                                     "du_ptr", "g_ptr", "u_ptr")})
    wg_t = dict(idx, weights_ptr="*fp32", frozen_ptr="*u8",
                **{n: ptr for n in ("a_ptr", "a2_ptr", "b_ptr", "out_ptr", "out2_ptr")})

    def wgrad(cfg, two):
        return dict(A_BY_TOKEN=not two, B_BY_TOKEN=two, TWO=two, HAS_FROZEN=True, PRECISION=prec,
                    BLOCK_P=cfg.block_m, BLOCK_Q=cfg.block_n, BLOCK_R=cfg.block_k, GROUP_M=cfg.group_m)

    def recompute(cfg, load_gu):
        return dict(LOAD_GU=load_gu, PRECISION=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, BLOCK_E=64, GROUP_M=cfg.group_m)

    t = table
    return [
        ("gate_up", gg.grouped_gemm_kernel, gemm_t, gemm(t.gate_up, gg.MODE_SWIGLU, True), t.gate_up),
        ("gate_up_save", gg.grouped_gemm_kernel, gemm_t, gemm(t.gate_up, gg.MODE_SWIGLU, True, True),
         t.gate_up),
        ("down", gg.grouped_gemm_kernel, gemm_t, gemm(t.down, gg.MODE_PLAIN, False), t.down),
        ("recompute", gb.recompute_kernel, rec_t, recompute(t.recompute, False), t.recompute),
        ("recompute_saved", gb.recompute_kernel, rec_t, recompute(t.recompute, True), t.recompute),
        ("dx", gg.grouped_gemm_kernel, gemm_t, gemm(t.dx, gg.MODE_DUAL, False), t.dx),
        ("wgrad_gate_up", gb.wgrad_kernel, wg_t, wgrad(t.wgrad, True), t.wgrad),
        ("wgrad_down", gb.wgrad_kernel, wg_t, wgrad(t.wgrad, False), t.wgrad),
        ("combine", cb.gather_sum_kernel, dict(idx, src_ptr=ptr, scale_ptr="*fp32", out_ptr=ptr),
         dict(HAS_SCALE=True, BLOCK_T=t.combine.block_m, BLOCK_D=t.combine.block_n), t.combine),
    ]


def _with_group_m(table, group_m: int):
    """``table`` with every role's grouped tile order set to ``group_m``."""
    import dataclasses
    return dataclasses.replace(table, **{f.name: dataclasses.replace(getattr(table, f.name), group_m=group_m)
                                         for f in dataclasses.fields(table)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--regime", nargs="*", default=("large", "medium", "decode"))
    ap.add_argument("--group-m", nargs="*", type=int, default=(),
                    help="also compile each table with every role's group_m set to these values")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter builds no compilable kernels", file=sys.stderr)
        return 2
    from . import configs

    fam = {90: "hopper", 80: "ampere"}.get(args.arch, "default")
    tables = []
    for reg in args.regime:
        if fam == "default" or args.dtype == "fp32":
            tables.append((f"default/{reg}", configs._DEFAULT_DECODE if reg == "decode" else configs._DEFAULT))
        else:
            tables.append((f"{fam}/{reg}", configs._TABLE[(fam, reg)]))
    tables += [(f"{name}/g{g}", _with_group_m(table, g)) for g in args.group_m for name, table in list(tables)]
    safe = configs.SAFE
    limit, failed = _MAX_SHARED.get(args.arch, 101376), 0
    for name, table in tables + [("safe", configs.ExpertsConfig(safe, safe, safe, safe, configs.SAFE_WGRAD, safe))]:
        for label, fn, types, consts, cfg in kernels_of(table, args.dtype):
            try:
                shared = _compile(fn, types, consts, cfg, args.arch).metadata.shared
                ok = shared <= limit
                print(f"sm_{args.arch} {args.dtype} {name:16s} {label:15s} shared {shared:7d} B"
                      + ("" if ok else f"  > {limit}"))
            except Exception as exc:  # report every failing entry, not just the first
                ok = False
                print(f"sm_{args.arch} {args.dtype} {name:16s} {label:15s} FAILED: {exc!r}"[:400])
            failed += not ok
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
