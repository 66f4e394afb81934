"""Collectives for expert parallelism: an autograd-aware all-to-all and small helpers.

Every collective runs through ``_guard``: a failure (a peer died, a timeout, mismatched sizes)
surfaces as a RuntimeError that names this rank, the group size and what was being exchanged.

``all_to_all`` is differentiable: the backward of sending rows with (out_splits, in_splits) is
sending their gradients back with the splits swapped. It is written here as an
autograd.Function around ``dist.all_to_all_single`` (it does not depend on torch.distributed.nn).
Every rank must run the backward of every exchange it ran forward, in the same order (autograd
does so when every rank backpropagates through the layer's output, a rank with no tokens too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def group_rank(group=None) -> int:
    return dist.get_rank(group)


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def _guard(what: str, group, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - re-raised with the rank named
        rank = dist.get_rank() if dist.is_initialized() else -1
        size = dist.get_world_size(group) if dist.is_initialized() else -1
        raise RuntimeError(f"rank {rank} (group of {size}): {what} failed: {exc}") from exc


def all_to_all_raw(x: torch.Tensor, out_splits: Sequence[int] | None, in_splits: Sequence[int] | None,
                   group=None, what: str = "all_to_all") -> torch.Tensor:
    """dist.all_to_all_single along dim 0; splits None = equal parts. No autograd."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else int(sum(out_splits))
    out = x.new_empty((rows, *x.shape[1:]))
    _guard(what, group, lambda: dist.all_to_all_single(
        out, x, None if out_splits is None else list(out_splits),
        None if in_splits is None else list(in_splits), group=group))
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, what):
        ctx.splits, ctx.group, ctx.what = (out_splits, in_splits), group, what
        return all_to_all_raw(x, out_splits, in_splits, group, what)

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = all_to_all_raw(grad_out, in_splits, out_splits, ctx.group, f"{ctx.what} (backward)")
        return grad_in, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: Sequence[int] | None = None,
               in_splits: Sequence[int] | None = None, group=None, what: str = "all_to_all") -> torch.Tensor:
    """Differentiable all_to_all_single of the rows of x: in_splits[d] rows go to rank d,
    out_splits[s] rows arrive from rank s (None: equal parts)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, what)


def all_gather_rows(t: torch.Tensor, group=None, what: str = "all_gather") -> torch.Tensor:
    """(W, *t.shape): every rank's ``t`` (same shape on every rank). No autograd."""
    W = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(W)]
    _guard(what, group, lambda: dist.all_gather(parts, t.contiguous(), group=group))
    return torch.stack(parts)
