"""dispatch on CUDA: stable counting sort by expert (csrc/dispatch.cu), and the grouped-GEMM
tile schedule derived from its offsets. Same signature and results as ``dispatch_ref``."""
from __future__ import annotations

import torch

from flexkern import _C
from flexkern.ops.dispatch import dispatch_ref

from ._launch import device_and_stream, ptr

_INT32_MAX = 2**31 - 1


def dispatch_cuda(experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None):
    """Drop-in for ``dispatch_ref``: (offsets_E1 int64, token_of_row_N, slot_of_row_N int32,
    row_of_slot_TK int32). Ids outside [0, E) are dropped like masked ones (never out of bounds)."""
    T, K = experts_TK.shape
    if num_experts > _C.DISPATCH_MAX_EXPERTS or T * K > _INT32_MAX:
        return dispatch_ref(experts_TK, num_experts, mask_E)
    ids_TK = experts_TK.contiguous()
    dev = ids_TK.device
    offsets_E1 = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    token_of_row_N = torch.empty(T * K, dtype=torch.int32, device=dev)
    slot_of_row_N = torch.empty(T * K, dtype=torch.int32, device=dev)
    row_of_slot_TK = torch.empty(T, K, dtype=torch.int32, device=dev)
    ws_bytes = _C.dispatch_workspace_bytes(T, K, num_experts)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=dev) if ws_bytes else None
    mask_E = None if mask_E is None else mask_E.contiguous()
    guard, stream = device_and_stream(ids_TK)
    with guard:
        _C.dispatch(ptr(ids_TK), ids_TK.dtype == torch.int64, ptr(mask_E), T, K, num_experts,
                    ptr(workspace), ws_bytes, ptr(offsets_E1), ptr(token_of_row_N),
                    ptr(slot_of_row_N), ptr(row_of_slot_TK), stream)
    return offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(rows_e / block_m) over any split of num_rows rows."""
    return -(-num_rows // block_m) + min(num_experts, num_rows)


def tile_schedule(offsets_E1: torch.Tensor, block_m: int, num_rows: int):
    """Tiles of ``block_m`` rows for a grouped GEMM over the dispatch layout, on the device.

    offsets_E1: (E+1,) int64 CUDA (from dispatch); num_rows: the row capacity N = T*K (a host
    int, so no shape depends on data). Returns ``tile_expert_M`` and ``tile_row_M`` (int32,
    M = max_tiles(num_rows, E, block_m)): the expert and first row of each tile in expert order,
    -1 past the last tile; and ``num_tiles_1`` (int32, (1,)). Experts without rows get no tiles.
    """
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    if offsets_E1.dtype != torch.int64 or offsets_E1.dim() != 1 or offsets_E1.numel() < 2:
        raise ValueError("offsets_E1 must be a 1-D int64 tensor of E+1 >= 2 entries")
    if not offsets_E1.is_cuda:
        raise ValueError("tile_schedule needs a CUDA tensor")
    E = offsets_E1.numel() - 1
    if E > _C.DISPATCH_MAX_EXPERTS:
        raise ValueError(f"tile_schedule supports up to {_C.DISPATCH_MAX_EXPERTS} experts, got {E}")
    offsets_E1 = offsets_E1.contiguous()
    M = max_tiles(num_rows, E, block_m)
    dev = offsets_E1.device
    tile_expert_M = torch.empty(M, dtype=torch.int32, device=dev)
    tile_row_M = torch.empty(M, dtype=torch.int32, device=dev)
    num_tiles_1 = torch.empty(1, dtype=torch.int32, device=dev)
    guard, stream = device_and_stream(offsets_E1)
    with guard:
        _C.tile_schedule(ptr(offsets_E1), E, block_m, M, ptr(tile_expert_M), ptr(tile_row_M),
                         ptr(num_tiles_1), stream)
    return tile_expert_M, tile_row_M, num_tiles_1
