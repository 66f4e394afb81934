"""dispatch: sort the (token, slot) pairs of a routing by expert into grouped-GEMM rows.

Shapes: T tokens, K top-k, E experts, N = T*K row capacity.

The result is a counting sort of the T*K slots by expert id, stable in token order within each
expert. Slots that picked a masked expert (``expert_mask_E[e] == False``) are dropped: they get no
row, ``row_of_slot_TK == -1``, and they contribute nothing downstream. Buffers are sized for the
upper bound N = T*K so no shape depends on data (no host synchronisation); the rows actually used
are ``[0, offsets_E1[E])`` and the rest hold -1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import backend as _backend
from .checks import can_read_values, check_shape, check_tensor

INT32_MAX = 2**31 - 1
# Set only by the library's own constructors (dispatch(), Dispatch.from_offsets): a Dispatch that
# carries it was built valid and is not checked again; any other Dispatch is checked on entry.
_BUILT = object()


def _versions(tensors):
    """In-place version counters of the tensors (None while compiling or for inference tensors:
    then a library-built Dispatch is trusted as it is)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


@dataclass(frozen=True)
class Dispatch:
    """Row layout of a routing, consumed by ``experts_swiglu``.

    offsets_E1:     int64 (E+1,)  rows of expert e are [offsets_E1[e], offsets_E1[e+1]); the last
                    entry is the number of routed rows U.
    token_of_row_N: int32 (N,)    token each row reads; -1 past the routed rows.
    slot_of_row_N:  int32 (N,)    flat slot t*K+k each row came from; -1 past the routed rows.
    row_of_slot_TK: int32 (T, K)  row of each slot; -1 when the slot was dropped.

    Build it with ``flexkern.dispatch`` (from a routing) or ``Dispatch.from_offsets`` (rows
    already in expert order). Those are trusted as built. A Dispatch constructed by hand, or one
    whose tensors were changed in place afterwards, is checked by ``experts_swiglu`` on entry:
    dtypes, shapes and devices always; and its values (offsets start at 0, never decrease and end
    at U <= N = T*K; every routed row r < U has a token in [0, T) and a slot s with
    row_of_slot[s] = r and token = s // K; exactly U slots have a row; every other entry is -1 or
    in range) with one device-to-host read. While compiling or capturing a CUDA graph values cannot
    be read, and a hand-built Dispatch is refused there. So no Dispatch can make a kernel read or
    write out of bounds.
    """

    offsets_E1: torch.Tensor
    token_of_row_N: torch.Tensor
    slot_of_row_N: torch.Tensor
    row_of_slot_TK: torch.Tensor
    _built: object = field(default=None, repr=False, compare=False)
    _built_versions: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.shape[0] - 1

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.offsets_E1, self.token_of_row_N, self.slot_of_row_N, self.row_of_slot_TK

    @classmethod
    def _trusted(cls, offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK) -> "Dispatch":
        ts = (offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK)
        return cls(*ts, _built=_BUILT, _built_versions=_versions(ts))

    def is_trusted(self) -> bool:
        """True for a Dispatch built by the library and not modified in place since."""
        if self._built is not _BUILT:
            return False
        if self._built_versions is None:
            return True
        now = _versions(self.tensors())
        return now is None or now == self._built_versions

    def validated(self) -> "Dispatch":
        """This layout checked once by value (see the class docstring) and returned as trusted,
        for example to pass a hand-built Dispatch into compiled code. T, K come from
        row_of_slot_TK and E from offsets_E1. One device-to-host read; not while compiling."""
        rows = self.row_of_slot_TK
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise ValueError("dispatch.row_of_slot_TK must be a (T, K) tensor")
        if not isinstance(self.offsets_E1, torch.Tensor) or self.offsets_E1.dim() != 1 \
                or self.offsets_E1.shape[0] < 2:
            raise ValueError("dispatch.offsets_E1 must be a 1-D tensor of E+1 >= 2 entries")
        (T, K), E = rows.shape, self.offsets_E1.shape[0] - 1
        return Dispatch._trusted(*check_dispatch(self, T, K, E, rows.device))

    @classmethod
    def from_offsets(cls, offsets_E1: torch.Tensor, num_rows: int, *, validate: bool = True) -> "Dispatch":
        """The layout of ``num_rows`` rows that are already in expert order (x row r is routed
        row r; T = num_rows tokens, K = 1): rows of expert e are [offsets_E1[e], offsets_E1[e+1]),
        token_of_row = slot_of_row = r and row_of_slot = r (shape (N, 1)) for r < offsets_E1[E],
        -1 past it. Pass weights_TK of shape (N, 1) (for example ones) to ``experts_swiglu``.

        offsets_E1: int64 (E+1,) on the rows' device. ``validate`` checks that the offsets start at
        0, never decrease and end at most at ``num_rows`` (one device-to-host read; a ValueError
        otherwise). With ``validate=False``, or while compiling or capturing a CUDA graph, they are
        not read but clamped on the device into a valid layout (no synchronisation).
        """
        check_tensor("offsets_E1", offsets_E1, ndim=1, dtypes=(torch.int64,))
        if offsets_E1.shape[0] < 2:
            raise ValueError(f"offsets_E1 needs E+1 >= 2 entries, got shape {tuple(offsets_E1.shape)}")
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or not 0 <= num_rows <= INT32_MAX:
            raise ValueError(f"num_rows must be an int in [0, 2^31), got {num_rows!r}")
        offsets_E1 = offsets_E1.contiguous()
        if validate and can_read_values(offsets_E1):
            bad = _offsets_problem(offsets_E1, num_rows)
            if bad:
                raise ValueError(f"offsets_E1 {bad}")
        else:  # clamp into [0, N], non-decreasing, starting at 0
            offsets_E1 = torch.cummax(offsets_E1.clamp(0, num_rows), 0).values
            offsets_E1 = torch.cat([offsets_E1.new_zeros(1), offsets_E1[1:]])
        r_N = torch.arange(num_rows, device=offsets_E1.device)
        idx_N = torch.where(r_N < offsets_E1[-1], r_N, -1).to(torch.int32)
        return cls._trusted(offsets_E1, idx_N, idx_N, idx_N.view(num_rows, 1))


def _offsets_problem(offsets_E1: torch.Tensor, N: int) -> str | None:
    """Why these offsets are not a valid layout of N rows, or None (one host read)."""
    ok = torch.stack([offsets_E1[0] == 0, (offsets_E1.diff() >= 0).all(), offsets_E1[-1] <= N])
    first, monotone, within = ok.tolist()
    if not first:
        return f"must start at 0, got {int(offsets_E1[0])}"
    if not monotone:
        return "must never decrease"
    if not within:
        return f"ends at {int(offsets_E1[-1])}, more than the {N} rows"
    return None


_DISPATCH_DTYPES = (("offsets_E1", torch.int64), ("token_of_row_N", torch.int32),
                    ("slot_of_row_N", torch.int32), ("row_of_slot_TK", torch.int32))


def check_dispatch(d, T: int, K: int, E: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The dispatch's four tensors (contiguous) after checking they fit T tokens, K slots and E
    experts on ``device``; a hand-built Dispatch also has its values checked (see ``Dispatch``)."""
    if not isinstance(d, Dispatch):
        raise TypeError(f"dispatch must be a flexkern.Dispatch, got {type(d).__name__}")
    N = T * K
    if N > INT32_MAX:
        raise ValueError(f"T*K = {N} routed slots exceed the int32 row ids (at most 2^31 - 1)")
    shapes = {"offsets_E1": (E + 1,), "token_of_row_N": (N,), "slot_of_row_N": (N,),
              "row_of_slot_TK": (T, K)}
    # row_of_slot first: it is the one tied to weights_TK, so a K mismatch names it
    for i in (3, 0, 1, 2):
        (name, dtype), t = _DISPATCH_DTYPES[i], d.tensors()[i]
        check_tensor(f"dispatch.{name}", t, dtypes=(dtype,), device=device)
        check_shape(f"dispatch.{name}", t, shapes[name])
    tensors = tuple(t.contiguous() for t in d.tensors())
    if d.is_trusted():
        return tensors
    if not can_read_values(tensors[0]):
        raise ValueError(
            "a Dispatch built by hand cannot be checked while compiling or capturing a CUDA graph "
            "(its values cannot be read there); build it with flexkern.dispatch() or "
            "Dispatch.from_offsets(), or check it once outside with dispatch.validated()")
    bad = _dispatch_problem(*tensors, T, K)
    if bad:
        raise ValueError(f"invalid Dispatch: {bad}")
    return tensors


def _dispatch_problem(offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK, T, K) -> str | None:
    N = T * K
    bad = _offsets_problem(offsets_E1, N)
    if bad:
        return f"offsets_E1 {bad}"
    if N == 0:
        return None
    U = offsets_E1[-1]
    r_N = torch.arange(N, device=offsets_E1.device)
    used_N = r_N < U
    tok, slot, row = token_of_row_N.long(), slot_of_row_N.long(), row_of_slot_TK.reshape(-1).long()
    checks = {
        "token_of_row_N must lie in [0, T) for routed rows and be -1 or in [0, T) past them":
            torch.where(used_N, (tok >= 0) & (tok < T), (tok >= -1) & (tok < T)).all(),
        "slot_of_row_N must lie in [0, T*K) for routed rows and be -1 or in range past them":
            torch.where(used_N, (slot >= 0) & (slot < N), (slot >= -1) & (slot < N)).all(),
        "row_of_slot_TK must be -1 or a routed row (< offsets_E1[E])":
            ((row >= -1) & (row < U)).all(),
        "exactly offsets_E1[E] slots must have a row": (row >= 0).sum() == U,
    }
    names = list(checks)
    first = torch.stack(list(checks.values())).tolist()
    for name, ok in zip(names, first):
        if not ok:
            return name
    # In range: now the two maps must be inverse and each row must read its slot's token.
    s_N = slot.clamp(0, N - 1)
    inverse = torch.where(used_N, row[s_N] == r_N, True).all()
    token = torch.where(used_N, tok == s_N // K, True).all()
    inv_ok, tok_ok = torch.stack([inverse, token]).tolist()
    if not inv_ok:
        return "row_of_slot_TK[slot_of_row_N[r]] must be r for every routed row r"
    if not tok_ok:
        return "token_of_row_N[r] must be slot_of_row_N[r] // K for every routed row r"
    return None


def dispatch_ref(experts_TK: torch.Tensor, num_experts: int, mask_E: torch.Tensor | None):
    """Counting sort in plain PyTorch, free of host synchronisation on CUDA tensors. Ids outside
    [0, E) are dropped like masked ones (as the CUDA kernel does), never indexed."""
    T, K = experts_TK.shape
    N = T * K
    dev = experts_TK.device
    flat_N = experts_TK.reshape(-1).long()
    # Dropped slots go to a virtual bucket E that sorts last.
    keep_N = (flat_N >= 0) & (flat_N < num_experts)
    if mask_E is not None:
        keep_N = keep_N & mask_E[flat_N.clamp(0, num_experts - 1)]
    key_N = torch.where(keep_N, flat_N, num_experts)
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
    _, fn = _backend.lookup("dispatch", backend, experts_TK, num_experts, mask_E)
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


def _dispatch_arguments(experts_TK, num_experts, expert_mask_E=None, validate=True):
    """Check the public arguments; returns the backend functions' (args, kwargs)."""
    check_tensor("experts", experts_TK, ndim=2, dtypes=(torch.int32, torch.int64))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if experts_TK.numel() > INT32_MAX:
        raise ValueError(f"experts has {experts_TK.numel()} slots (T*K); dispatch's int32 row ids "
                         "allow at most 2^31 - 1")
    if expert_mask_E is not None:
        check_tensor("expert_mask", expert_mask_E, ndim=1, dtypes=(torch.bool,), device=experts_TK.device)
        check_shape("expert_mask", expert_mask_E, (num_experts,))
    if validate and experts_TK.numel() and can_read_values(experts_TK):
        lo, hi = torch.stack([experts_TK.min(), experts_TK.max()]).tolist()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got ids in [{lo}, {hi}]")
    return (experts_TK.contiguous(), num_experts, expert_mask_E), {}


_backend.register_arguments("dispatch", _dispatch_arguments)


def dispatch(
    experts_TK: torch.Tensor,
    num_experts: int,
    expert_mask_E: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> Dispatch:
    """Group the routed slots by expert. See the module docstring for the layout.

    ``validate`` checks that every id is in [0, E) — one device-to-host read on CUDA tensors, so
    the FlexMoE layer (whose ids come from ``route``) turns it off; unchecked ids outside [0, E)
    are dropped like masked ones. At most 2^31 - 1 slots (T*K): row ids are int32.
    """
    args, _ = _dispatch_arguments(experts_TK, num_experts, expert_mask_E, validate)
    return Dispatch._trusted(*_dispatch_op(*args, _backend.requested(backend)))
