"""dispatch on CUDA: stable counting sort by expert (csrc/dispatch.cu). Same signature and results
as ``dispatch_ref`` on the inputs ``supports_dispatch`` accepts."""
from __future__ import annotations

import torch

from flexkern import _C

from ._launch import device_and_stream, ptr

_INT32_MAX = 2**31 - 1


def supports_dispatch(experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None):
    """None when the kernel covers these inputs, else why not (registered with the seam)."""
    if num_experts > _C.DISPATCH_MAX_EXPERTS:
        return f"{num_experts} experts > {_C.DISPATCH_MAX_EXPERTS}"
    if experts_TK.numel() > _INT32_MAX:
        return "more than 2^31 - 1 slots"
    return None


def dispatch_cuda(experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None):
    """Drop-in for ``dispatch_ref``: (offsets_E1 int64, token_of_row_N, slot_of_row_N int32,
    row_of_slot_TK int32). Ids outside [0, E) are dropped like masked ones (never out of bounds)."""
    T, K = experts_TK.shape
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
