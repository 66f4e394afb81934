"""dispatch: sort the (token, slot) pairs of a routing by expert into grouped-GEMM rows.

Shapes: T tokens, K top-k, E experts, N = T*K row capacity.

The result is a counting sort of the T*K slots by expert id, stable in token order within each
expert. Slots that picked a masked expert (``expert_mask_E[e] == False``) are dropped: they get no
row, ``row_of_slot_TK == -1``, and they contribute nothing downstream. Buffers are sized for the
upper bound N = T*K so no shape depends on data (no host synchronisation); the rows actually used
are ``[0, offsets_E1[E])`` and the rest hold -1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as _backend
from .checks import can_read_values, check_shape, check_tensor


@dataclass(frozen=True)
class Dispatch:
    """Row layout of a routing, consumed by ``experts_swiglu``.

    offsets_E1:     int64 (E+1,)  rows of expert e are [offsets_E1[e], offsets_E1[e+1]); the last
                    entry is the number of routed rows.
    token_of_row_N: int32 (N,)    token each row reads; -1 past the routed rows.
    slot_of_row_N:  int32 (N,)    flat slot t*K+k each row came from; -1 past the routed rows.
    row_of_slot_TK: int32 (T, K)  row of each slot; -1 when the slot was dropped.
    """

    offsets_E1: torch.Tensor
    token_of_row_N: torch.Tensor
    slot_of_row_N: torch.Tensor
    row_of_slot_TK: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.shape[0] - 1

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.offsets_E1, self.token_of_row_N, self.slot_of_row_N, self.row_of_slot_TK


def dispatch_ref(experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None):
    """Counting sort in plain PyTorch, free of host synchronisation on CUDA tensors."""
    T, K = experts_TK.shape
    N = T * K
    dev = experts_TK.device
    flat_N = experts_TK.reshape(-1).long()
    # Dropped slots go to a virtual bucket E that sorts last.
    key_N = flat_N if mask_E is None else torch.where(mask_E[flat_N], flat_N, num_experts)
    order_N = torch.sort(key_N, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key_N, torch.ones_like(key_N))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts[:num_experts], 0, out=offsets_E1[1:])
    used_N = torch.arange(N, device=dev) < offsets_E1[-1]
    slot_of_row_N = torch.where(used_N, order_N, -1)
    token_of_row_N = torch.where(used_N, order_N // K, -1)
    row_of_slot_N = torch.empty(N, dtype=torch.int64, device=dev)
    row_of_slot_N[order_N] = torch.arange(N, device=dev)
    row_of_slot_N = torch.where(key_N < num_experts, row_of_slot_N, -1)
    return (
        offsets_E1,
        token_of_row_N.to(torch.int32),
        slot_of_row_N.to(torch.int32),
        row_of_slot_N.to(torch.int32).view(T, K),
    )


_backend.register("dispatch", "reference", dispatch_ref)


@torch.library.custom_op("flexkern::dispatch", mutates_args=())
def _dispatch_op(
    experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = _backend.lookup("dispatch", backend, experts_TK.device)
    return fn(experts_TK, num_experts, mask_E)


@_dispatch_op.register_fake
def _(experts_TK, num_experts, mask_E, backend):
    T, K = experts_TK.shape
    return (
        experts_TK.new_empty((num_experts + 1,), dtype=torch.int64),
        experts_TK.new_empty((T * K,), dtype=torch.int32),
        experts_TK.new_empty((T * K,), dtype=torch.int32),
        experts_TK.new_empty((T, K), dtype=torch.int32),
    )


def dispatch(
    experts_TK: torch.Tensor,
    num_experts: int,
    expert_mask_E: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> Dispatch:
    """Group the routed slots by expert. See the module docstring for the layout.

    ``validate`` checks that every id is in [0, E) — one device-to-host read on CUDA tensors, so
    the FlexMoE layer (whose ids come from ``route``) turns it off.
    """
    check_tensor("experts", experts_TK, ndim=2, dtypes=(torch.int32, torch.int64))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if expert_mask_E is not None:
        check_tensor("expert_mask", expert_mask_E, ndim=1, dtypes=(torch.bool,), device=experts_TK.device)
        check_shape("expert_mask", expert_mask_E, (num_experts,))
    if validate and experts_TK.numel() and can_read_values(experts_TK):
        lo, hi = int(experts_TK.min()), int(experts_TK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got ids in [{lo}, {hi}]")
    out = _dispatch_op(experts_TK.contiguous(), num_experts, expert_mask_E, _backend.requested(backend))
    return Dispatch(*out)
