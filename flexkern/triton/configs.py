"""Launch configurations of the Triton expert kernels: one table per GPU family, one place.

Each kernel of the forward/backward gets a TileConfig. ``pick`` chooses the table from the device
(compute capability; the interpreter has its own small-tile table; float32 uses the small "default"
tiles) and the row regime from shapes only — the average rows per expert T*K/E — so nothing is
read from the device:

    decode   (<= 32 rows per expert)   BLOCK_M = 16: the weights dominate, keep the row tile small
    medium   (<= 128)                  BLOCK_M = 64
    large    (> 128)                   BLOCK_M = 128, Hopper-sized tiles

Shared memory per stage is about (BLOCK_M + operands * BLOCK_N) * BLOCK_K * 2 bytes. Compiled
offline for sm_90 with triton 3.6 (16-byte aligned shapes), the largest bf16 Hopper entry takes
144 KB of the 227 KB and float32 on the "default" tiles far less. A launch that still runs out of
resources falls back to SAFE (see ops.py).

Autotuning is not used: the grids depend on T*K only through a shape bound, a tuning pass would
have to run outside CUDA-graph capture, and the interpreter must never tune.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """block_m: rows (tokens); block_n: output columns; block_k: reduction. For wgrad these are
    (P, Q, rows) of the per-expert weight tile; for the combine (tokens, d_model columns, -).

    group_m: grouped (L2-aware) program order (``schedule.swizzle``, as in Triton's matmul
    tutorial): group_m row tiles (wgrad: P tiles) run for each column tile before the next group;
    1 is plain row-major order (column tiles fastest). The combine ignores it. Every wgrad entry
    below says 1, the order that kernel had before it took the parameter (unmeasured on a GPU)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


@dataclass(frozen=True)
class ExpertsConfig:
    gate_up: TileConfig     # forward: x -> h (two weights, SwiGLU epilogue)
    down: TileConfig        # forward: h -> o
    recompute: TileConfig   # backward: g, u, dy w_down -> h, dg, du (three accumulators)
    dx: TileConfig          # backward: dg, du -> dx rows (two operand pairs)
    wgrad: TileConfig       # backward: per-expert dW (P, Q, rows)
    combine: TileConfig     # gather-sums over K (tokens, columns, -)


_T = TileConfig
SAFE = _T(32, 32, 32, num_warps=4, num_stages=1)
SAFE_WGRAD = _T(32, 32, 32, num_warps=4, num_stages=1, group_m=1)  # wgrad's fallback, row-major

_COMBINE = _T(4, 256, 1, num_warps=4)
_TABLE: dict[tuple[str, str], ExpertsConfig] = {
    # H100 / H200 (sm90): wide tiles, 8 warps, deep pipelines for the gathered loads.
    # Measured with benchmarks/tune_experts.py on an H200 (bf16, OLMoE- and Mixtral-like shapes).
    ("hopper", "large"): ExpertsConfig(
        gate_up=_T(128, 128, 32, 8, 4), down=_T(128, 256, 64, 8, 3), recompute=_T(128, 64, 64, 8, 3),
        dx=_T(128, 128, 64, 8, 3), wgrad=_T(128, 128, 64, 8, 3, 1), combine=_COMBINE),
    ("hopper", "medium"): ExpertsConfig(
        gate_up=_T(64, 128, 64, 8, 3), down=_T(64, 128, 64, 4, 4), recompute=_T(64, 64, 64, 4, 3),
        dx=_T(64, 128, 64, 4, 3), wgrad=_T(128, 128, 64, 8, 3, 1), combine=_COMBINE),
    ("hopper", "decode"): ExpertsConfig(
        gate_up=_T(16, 64, 128, 4, 3), down=_T(16, 64, 128, 4, 3), recompute=_T(16, 64, 64, 4, 3),
        dx=_T(16, 64, 64, 4, 3), wgrad=_T(64, 64, 32, 4, 3, 1), combine=_COMBINE),
    # A100 (sm80): same shapes, fewer stages.
    ("ampere", "large"): ExpertsConfig(
        gate_up=_T(128, 128, 32, 8, 3), down=_T(128, 128, 32, 8, 3), recompute=_T(128, 64, 32, 8, 3),
        dx=_T(128, 128, 32, 8, 2), wgrad=_T(128, 128, 32, 8, 3, 1), combine=_COMBINE),
    ("ampere", "medium"): ExpertsConfig(
        gate_up=_T(64, 128, 32, 4, 3), down=_T(64, 128, 32, 4, 3), recompute=_T(64, 64, 32, 4, 3),
        dx=_T(64, 128, 32, 4, 3), wgrad=_T(64, 128, 32, 4, 3, 1), combine=_COMBINE),
    ("ampere", "decode"): ExpertsConfig(
        gate_up=_T(16, 64, 64, 4, 3), down=_T(16, 64, 64, 4, 3), recompute=_T(16, 64, 64, 4, 2),
        dx=_T(16, 64, 64, 4, 2), wgrad=_T(64, 64, 32, 4, 3, 1), combine=_COMBINE),
}
_DEFAULT = ExpertsConfig(  # any other GPU: small shared memory footprint
    gate_up=_T(64, 64, 32, 4, 2), down=_T(64, 64, 32, 4, 2), recompute=_T(64, 32, 32, 4, 2),
    dx=_T(64, 64, 32, 4, 2), wgrad=_T(64, 64, 32, 4, 2, 1), combine=_COMBINE)
_DEFAULT_DECODE = ExpertsConfig(
    gate_up=_T(16, 64, 32, 4, 2), down=_T(16, 64, 32, 4, 2), recompute=_T(16, 32, 32, 4, 2),
    dx=_T(16, 64, 32, 4, 2), wgrad=_T(32, 32, 32, 4, 2, 1), combine=_COMBINE)
# The interpreter runs each program in numpy: small tiles exercise the ragged edges of small
# test shapes (several row tiles per expert, several K steps).
_INTERPRETER = ExpertsConfig(
    gate_up=_T(16, 16, 16, 1, 1, 2), down=_T(16, 16, 16, 1, 1, 2), recompute=_T(16, 16, 16, 1, 1, 2),
    dx=_T(16, 16, 16, 1, 1, 2), wgrad=_T(16, 16, 16, 1, 1, 2), combine=_T(4, 16, 1, 1, 1))


def max_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(rows_e / block_m) over experts, given sum_e rows_e <= num_rows.

    Each expert with rows wastes less than one tile, and at most min(E, num_rows) experts have rows.
    """
    return min(num_rows, num_rows // block_m + num_experts)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def family(device: torch.device) -> str:
    """"hopper", "ampere", "default", or "interpreter"."""
    if device.type != "cuda" or interpreting():
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return "hopper"
    if (major, minor) == (8, 0):
        return "ampere"
    return "default"


def regime(num_rows: int, num_experts: int) -> str:
    per_expert = num_rows / max(num_experts, 1)
    return "decode" if per_expert <= 32 else "medium" if per_expert <= 128 else "large"


def pick(device: torch.device, dtype: torch.dtype, num_rows: int, num_experts: int) -> ExpertsConfig:
    """The configuration for N = T*K row capacity over E experts on ``device`` (shapes only)."""
    fam = family(device)
    if fam == "interpreter":
        return _INTERPRETER
    reg = regime(num_rows, num_experts)
    # float32 runs exact fp32 products on CUDA cores (a correctness path, not a fast one): small
    # tiles keep its registers and compile time in check.
    if fam == "default" or dtype == torch.float32:
        return _DEFAULT_DECODE if reg == "decode" else _DEFAULT
    return _TABLE[(fam, reg)]
