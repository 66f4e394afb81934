"""ExpertParallelMoE: a FlexMoE whose experts are spread over the ranks of a process group.

Shapes: T tokens (this rank's), D d_model, F d_ff, E experts (all ranks), K top-k, W ranks,
N = T*K routed-row capacity, L = experts held by this rank.

Each rank holds a contiguous slice of the experts (rank d: experts [starts[d], starts[d+1]),
E/W each by default) and a full copy of the router. A forward on every rank:

    route (local, replicated router) -> dispatch (rows in expert order = destination-rank order)
    -> permute -> exchange rows (all_to_all) -> local grouped experts -> exchange back -> unpermute

Two exchange modes:
* exact (``capacity=None``): the per-expert row counts travel first, in one all_gather that also
  carries a small signature (E, D, F, top_k, mask, ...) so ranks that disagree get a clear error
  instead of a hang. Reading those counts is ONE HOST READ PER LAYER AND FORWARD (it sizes the
  variable all_to_all), so this mode is neither CUDA-graph capturable nor compile-fullgraph.
* fixed capacity (``capacity=C``): every rank sends exactly C rows (padded) to every rank, and the
  expert id of each row rides along; no host synchronisation after the first forward (which
  checks the signature once). Rows past C for one destination are dropped: their slots add
  nothing, like mask_mode="drop". They are never lost silently: ``overflow`` (int64 tensor, this
  rank's dropped slots in the last forward) and ``overflow_total`` (since construction or
  ``reset_overflow``) count them, on the device, readable whenever a host read is allowed.
  W*C rows go each way whatever the routing (choose C ~ capacity_factor * T*K / W). Meant for
  CUDA-graph capture; torch.compile(fullgraph=True) does not trace the c10d collectives used
  here. A mask changed on one rank only is caught by ``verify()``, not by the forward.

Same contract as FlexMoE (the parameter names and shapes too, except that ``experts.*`` hold the
L local experts): ``expert_mask`` (reroute/drop; change it identically on every rank), ``expert_frozen``
(the owning rank does no weight-gradient work for a frozen expert and its router row gets no
gradient), router bias applied as min(b, 0) to experts 1.., ``z_loss`` (mean over this rank's
tokens), top-k not renormalised unless asked.

Gradients: the experts' gradients are complete on their owner (every rank's tokens flow back to
it); the router's are this rank's tokens only, so replicated parameters (the router, and anything
outside the layer) need the usual data-parallel reduction (``all_reduce_replicated_grads``).
Every rank must run forward and backward through every layer in the same order, a rank with no
tokens too (its output is simply empty).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..nn.moe import Experts, FlexMoE, Router
from .exchange import all_gather_rows, all_to_all, all_to_all_raw

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FIELDS = ("num_experts", "d_model", "d_ff", "top_k", "world_size", "mask_mode", "renormalize",
           "capacity", "router_bias", "dtype", "experts_per_rank", "scoring", "n_group", "topk_group",
           "routed_scaling (x1e6)", "score_bias", "shared_d_ff", "expert_mask (active count)",
           "expert_mask (which experts)", "expert_mask (which experts, squared ids)")
_H = len(_FIELDS)


@functools.lru_cache(maxsize=None)
def _state_buffers() -> tuple[str, ...]:
    """Which of expert_mask / expert_frozen a FlexMoE state dict holds."""
    probe = FlexMoE(1, 1, 1, 1, device="meta")
    return tuple(k for k in probe.state_dict() if k in ("expert_mask", "expert_frozen"))


def expert_split(num_experts: int, world_size: int, experts_per_rank: Sequence[int] | None = None) -> list[int]:
    """Experts held by each rank: E/W each, or the explicit (uneven) ``experts_per_rank``."""
    if experts_per_rank is None:
        if num_experts % world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the world size {world_size}; pass "
                f"experts_per_rank=[...] ({world_size} positive ints summing to {num_experts}) for an uneven split")
        return [num_experts // world_size] * world_size
    split = [int(n) for n in experts_per_rank]
    if len(split) != world_size or any(n < 1 for n in split) or sum(split) != num_experts:
        raise ValueError(f"experts_per_rank must be {world_size} positive ints summing to "
                         f"num_experts={num_experts}, got {list(experts_per_rank)!r}")
    return split


class ExpertParallelMoE(FlexMoE):
    """FlexMoE with its experts sharded over ``group`` (default: the world). See the module doc.

    Build it empty (random init) with the FlexMoE arguments plus ``group``, ``capacity`` and
    ``experts_per_rank``, or from a full FlexMoE / state dict with ``shard``; ``unshard`` gathers
    the full state dict back. ``phase_timer`` (None, or name -> context manager) lets a benchmark
    time the phases "routing", "exchange", "experts" and "combine".
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, group=None, *,
                 capacity: int | None = None, experts_per_rank: Sequence[int] | None = None,
                 router_bias: bool = True, renormalize: bool = False, mask_mode: str = "reroute",
                 backend: str | None = None, recompute_activations: bool = False, device=None, dtype=None,
                 scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 routed_scaling: float = 1.0, score_bias: bool = False, shared_d_ff: int = 0,
                 shared_gate: bool = False):
        nn.Module.__init__(self)
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._set_gating(num_experts, top_k, renormalize, mask_mode, scoring, n_group, topk_group, routed_scaling)
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
            raise ValueError(f"capacity must be None (exact exchange) or a positive int, got {capacity!r}")
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.experts_per_rank = expert_split(num_experts, self.world_size, experts_per_rank)
        starts = [0]
        for n in self.experts_per_rank:
            starts.append(starts[-1] + n)
        self.expert_starts = tuple(starts)
        self.local_start, self.local_end = starts[self.rank], starts[self.rank + 1]
        self.capacity = capacity
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff = d_model, d_ff
        self.backend = backend
        self.recompute_activations = recompute_activations
        self.router = Router(d_model, num_experts, router_bias, **factory)
        self.experts = Experts(d_model, d_ff, self.local_end - self.local_start, **factory)
        # the replicated parts (shared expert, score bias) and the mask buffers, as FlexMoE's
        self._init_shared_and_state(num_experts, score_bias, shared_d_ff, shared_gate, factory)
        # Rank d holds experts [starts[d], starts[d+1]); kept on the device (no copy per forward).
        self.register_buffer("expert_starts_W1", torch.tensor(starts, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("overflow", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("overflow_total", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._verified = False
        self.phase_timer = None

    @property
    def local_experts(self) -> range:
        return range(self.local_start, self.local_end)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", world_size={self.world_size}, rank={self.rank}, "
                f"local_experts=[{self.local_start}, {self.local_end}), capacity={self.capacity}")

    def add_expert(self, *args, **kwargs):
        raise NotImplementedError("unshard the layer into a FlexMoE to add experts, then shard it again")

    def remove_expert(self, *args, **kwargs):
        raise NotImplementedError("unshard the layer into a FlexMoE to remove experts (or mask them)")

    def reset_overflow(self) -> None:
        self.overflow.zero_()
        self.overflow_total.zero_()

    # ---- the signature all ranks must agree on ---------------------------------------------------
    def _signature(self) -> torch.Tensor:
        dev = self.router.weight.device
        split_code = sum((i + 1) * n * 1009 ** (i % 7) for i, n in enumerate(self.experts_per_rank))
        static = torch.tensor([
            self.num_experts, self.d_model, self.d_ff, self.top_k, self.world_size,
            self.mask_mode == "reroute", self.renormalize, self.capacity or 0,
            self.router.bias is not None, _DTYPES.index(self.router.weight.dtype), split_code,
            self.scoring == "sigmoid", self.n_group, self.topk_group, round(self.routed_scaling * 1e6),
            self.score_bias is not None,
            0 if self.shared_expert is None else self.shared_expert.gate_proj.shape[0],
        ], dtype=torch.int64, device=dev)
        ids = torch.arange(1, self.num_experts + 1, device=dev)
        m = self.expert_mask.long()
        return torch.cat([static, torch.stack([m.sum(), (m * ids).sum(), (m * ids * ids).sum()])])

    def _check_signatures(self, rows_WH: torch.Tensor) -> None:
        """rows_WH: every rank's signature, on the host. Raises the same error on every rank."""
        for j, field in enumerate(_FIELDS):
            col = rows_WH[:, j].tolist()
            if len(set(col)) > 1:
                if field == "dtype":
                    col = [str(_DTYPES[c]) for c in col]
                raise ValueError(f"ExpertParallelMoE: the ranks disagree on {field}: "
                                 + ", ".join(f"rank {r}: {v}" for r, v in enumerate(col)))

    def verify(self) -> None:
        """Collective: check that every rank agrees on E, D, F, top_k, the mask, ... (clear error
        otherwise). Runs at the first forward; call it again after changing the mask in capacity
        mode (exact mode re-checks at every forward, at no extra cost)."""
        self._check_signatures(all_gather_rows(self._signature(), self.group, "signature all_gather").cpu())
        self._verified = True

    def _phase(self, name: str):
        return self.phase_timer(name) if self.phase_timer is not None else contextlib.nullcontext()

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self._verified:
            self.verify()
        self._check_mask()
        x_TD = x.reshape(-1, self.d_model)
        with self._phase("routing"):  # exactly FlexMoE's routing, on this rank's tokens
            weights_TK, experts_TK = self._route(x_TD)
            disp = ops.dispatch(experts_TK, self.num_experts, self.expert_mask, self.backend, validate=False)
            self._record_routing(x, experts_TK, disp)
            x_ND = ops.permute(x_TD, disp, self.backend)
        # Every rank must enter the backward exchanges together: keep them in the graph whenever a
        # gradient can be taken, even if this rank's rows do not require one.
        if torch.is_grad_enabled() and not x_ND.requires_grad and any(p.requires_grad for p in self.parameters()):
            x_ND = x_ND.detach().requires_grad_()
        if self.capacity is None:
            o_ND = self._exact(x_ND, disp.offsets_E1)
        else:
            o_ND = self._fixed_capacity(x_ND, disp.offsets_E1)
        with self._phase("combine"):
            y_TD = ops.unpermute(o_ND, disp, weights_TK, self.backend)
        return self._add_shared(x_TD, y_TD).view(x.shape)

    def _local_experts(self, x_rD, offsets_L1):
        with self._phase("experts"):
            e = self.experts
            return ops.experts_swiglu_grouped(
                x_rD, e.gate_proj, e.up_proj, e.down_proj, offsets_L1,
                self.expert_frozen[self.local_start:self.local_end], self.backend, self.recompute_activations,
                validate=False)  # offsets built here from the exchanged counts

    def _exact(self, x_ND: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
        W, r, starts = self.world_size, self.rank, self.expert_starts
        N, D = x_ND.shape
        with self._phase("exchange"):
            counts_E = offsets_E1[1:] - offsets_E1[:-1]
            rows = all_gather_rows(torch.cat([self._signature(), counts_E]), self.group, "row-count all_gather")
            rows = rows.cpu()  # the one host read of this layer's forward
            self._check_signatures(rows[:, :_H])
            counts_WE = rows[:, _H:]
            send = [int(counts_WE[r, starts[d]:starts[d + 1]].sum()) for d in range(W)]
            recv = [int(counts_WE[s, self.local_start:self.local_end].sum()) for s in range(W)]
            if int(counts_WE.sum()) == 0:  # nothing routed anywhere: every rank skips the exchange
                return x_ND.new_zeros((N, D)) + 0 * x_ND
            used = sum(send)
            recv_x = all_to_all(x_ND[:used], recv, send, self.group, "expert rows all_to_all")
            # Received rows are grouped by source rank, then by expert: regroup them by expert.
            local_WL = counts_WE[:, self.local_start:self.local_end]
            L = local_WL.shape[1]
            expert_of_row = torch.repeat_interleave(torch.arange(L).repeat(W), local_WL.reshape(-1))
            order = torch.sort(expert_of_row, stable=True).indices.to(x_ND.device)
            offsets_L1 = torch.zeros(L + 1, dtype=torch.int64)
            torch.cumsum(local_WL.sum(0), 0, out=offsets_L1[1:])
        o_loc = self._local_experts(recv_x[order], offsets_L1.to(x_ND.device))
        with self._phase("exchange"):
            o_recv = o_loc[torch.argsort(order)]
            back = all_to_all(o_recv, send, recv, self.group, "expert outputs all_to_all")
        return torch.cat([back, back.new_zeros((N - used, D))])

    def _fixed_capacity(self, x_ND: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
        W, C, dev = self.world_size, self.capacity, x_ND.device
        N, D = x_ND.shape
        L = self.local_end - self.local_start
        with self._phase("exchange"):
            starts_W1 = self.expert_starts_W1
            first_W = offsets_E1[starts_W1[:-1]]  # first row bound for each destination rank
            count_W = offsets_E1[starts_W1[1:]] - first_W
            over = (count_W - C).clamp_min(0).sum()
            self.overflow.copy_(over)
            self.overflow_total.add_(over)
            # Buffer slot (d, p) holds row first[d] + p when p < count[d]; row N is a zero pad.
            p_C = torch.arange(C, device=dev)
            valid_WC = p_C < count_W[:, None]
            row_WC = torch.where(valid_WC, first_W[:, None] + p_C, N)
            x_pad = torch.cat([x_ND, x_ND.new_zeros((1, D))])
            send_x = x_pad[row_WC.reshape(-1)]
            r_N = torch.arange(N, device=dev)
            expert_N = torch.searchsorted(offsets_E1[1:], r_N, right=True)  # E for unused rows
            expert_pad = torch.cat([expert_N, expert_N.new_full((1,), -1)])
            local_WC = torch.where(valid_WC, expert_pad[row_WC] - starts_W1[:-1, None], -1)
            recv_x = all_to_all(send_x, None, None, self.group, "expert rows all_to_all (fixed capacity)")
            recv_e = all_to_all_raw(local_WC.reshape(-1), None, None, self.group, "expert ids all_to_all")
            key = torch.where(recv_e >= 0, recv_e, L)
            order = torch.sort(key, stable=True).indices
            counts_L1 = torch.zeros(L + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
            offsets_L1 = torch.zeros(L + 1, dtype=torch.int64, device=dev)
            torch.cumsum(counts_L1[:L], 0, out=offsets_L1[1:])
        o_loc = self._local_experts(recv_x[order], offsets_L1)
        with self._phase("exchange"):
            back = all_to_all(o_loc[torch.argsort(order)], None, None, self.group,
                              "expert outputs all_to_all (fixed capacity)")
            # Row r of expert e went to rank d(e), slot r - first[d]; overflowed rows get zero.
            dest_N = torch.searchsorted(starts_W1[1:], expert_N.clamp_max(self.num_experts - 1), right=True)
            p_N = r_N - first_W[dest_N]
            ok_N = (r_N < offsets_E1[-1]) & (p_N < C)
            back_pad = torch.cat([back, back.new_zeros((1, D))])
            return back_pad[torch.where(ok_N, dest_N * C + p_N, W * C)]


# ---- building from a full layer and gathering back ------------------------------------------------
_EXPERT_KEYS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


def _replicated_keys(module: FlexMoE) -> list[str]:
    """State-dict keys every rank holds whole, besides the router weight and the mask buffers."""
    keys = ["router.bias"] if module.router.bias is not None else []
    if module.score_bias is not None:
        keys.append("score_bias")
    if module.shared_expert is not None:
        keys += [f"shared_expert.{n}" for n, _ in module.shared_expert.named_parameters()]
    return keys


def shard(source, group=None, *, top_k: int | None = None, capacity: int | None = None,
          experts_per_rank: Sequence[int] | None = None, **kwargs) -> ExpertParallelMoE:
    """This rank's ExpertParallelMoE from a full FlexMoE (its settings, mask and frozen flags are
    kept) or a full FlexMoE state dict (``top_k`` required; other FlexMoE arguments in kwargs).
    The router is copied whole, the experts [starts[rank], starts[rank+1]) are sliced; the values
    are copied bit for bit."""
    if isinstance(source, ExpertParallelMoE):
        raise TypeError("source is already expert-parallel; unshard it first")
    if isinstance(source, FlexMoE):
        settings = {**source.settings(), **kwargs}
        top_k = source.top_k if top_k is None else top_k
        # the experts by attribute: they may be views of another model's fused weights
        state = {**source.state_dict(), **{k: getattr(source.experts, k.split(".")[1]) for k in _EXPERT_KEYS}}
        mask, frozen = source.expert_mask, source.expert_frozen
    elif isinstance(source, dict):
        if top_k is None:
            raise ValueError("shard(state_dict) needs top_k")
        missing = [k for k in ("router.weight", *_EXPERT_KEYS) if k not in source]
        if missing:
            raise ValueError(f"state dict lacks {missing} (expected a FlexMoE state dict)")
        shared = source.get("shared_expert.gate_proj")
        settings = dict(router_bias="router.bias" in source, score_bias="score_bias" in source,
                        shared_d_ff=0 if shared is None else shared.shape[0],
                        shared_gate="shared_expert.output_gate" in source, **kwargs)
        state, mask, frozen = source, source.get("expert_mask"), source.get("expert_frozen")
    else:
        raise TypeError(f"shard expects a FlexMoE or its state dict, got {type(source).__name__}")
    router = state["router.weight"]
    E, D = router.shape
    Fw = state["experts.gate_proj"].shape[1]
    module = ExpertParallelMoE(D, Fw, E, top_k, group, capacity=capacity, experts_per_rank=experts_per_rank,
                               device=router.device, dtype=state["experts.gate_proj"].dtype, **settings)
    lo, hi = module.local_start, module.local_end
    with torch.no_grad():
        if module.router.weight.dtype != router.dtype:  # a float32 router beside other experts
            module.router.weight = nn.Parameter(router.detach().clone())
        module.router.weight.copy_(router)
        targets = module.state_dict()  # shares storage with the parameters and buffers
        for key in _replicated_keys(module):  # the bias, score bias, the shared expert
            targets[key].copy_(state[key])
        for key in _EXPERT_KEYS:
            full = state[key]
            if full.shape[0] != E:
                raise ValueError(f"{key} has {full.shape[0]} experts, the router has {E}")
            getattr(module.experts, key.split(".")[1]).copy_(full[lo:hi])
        if mask is not None:
            module.expert_mask.copy_(mask)
        if frozen is not None:
            module.expert_frozen.copy_(frozen)
    if isinstance(source, FlexMoE):  # keep which parameters train
        dst = dict(module.named_parameters())
        for name, p in source.named_parameters():
            dst[name].requires_grad_(p.requires_grad)
    return module


@torch.no_grad()
def unshard(module: ExpertParallelMoE) -> dict[str, torch.Tensor]:
    """The full FlexMoE state dict, on every rank (a collective): the router of this rank and
    every rank's experts in order, bit-identical to what ``shard`` was given."""
    if not isinstance(module, ExpertParallelMoE):
        raise TypeError(f"unshard expects an ExpertParallelMoE, got {type(module).__name__}")
    state = {"router.weight": module.router.weight.detach().clone()}
    full = module.state_dict()
    for key in _replicated_keys(module):
        state[key] = full[key].detach().clone()
    most = max(module.experts_per_rank)
    for key in _EXPERT_KEYS:
        local = getattr(module.experts, key.split(".")[1]).detach()
        pad = torch.cat([local, local.new_zeros((most - local.shape[0], *local.shape[1:]))])
        parts = all_gather_rows(pad, module.group, f"unshard all_gather of {key}")
        state[key] = torch.cat([parts[d, :n] for d, n in enumerate(module.experts_per_rank)])
    for name in _state_buffers():
        state[name] = getattr(module, name).clone()
    return state


def to_flexmoe(module: ExpertParallelMoE) -> FlexMoE:
    """A single-device FlexMoE with the same weights, settings, mask and frozen flags (collective)."""
    state = unshard(module)
    w = module.router.weight
    out = FlexMoE(module.d_model, module.d_ff, module.num_experts, module.top_k, device=w.device,
                  dtype=module.experts.gate_proj.dtype, **module.settings())
    if w.dtype != out.router.weight.dtype:
        out.router.weight = nn.Parameter(w.detach().clone())
    out.load_state_dict(state)
    out.expert_mask.copy_(module.expert_mask)
    out.expert_frozen.copy_(module.expert_frozen)
    return out


# ---- models -----------------------------------------------------------------------------------------
def expert_parallel(model: nn.Module, group=None, **kwargs) -> nn.Module:
    """Replace every FlexMoE inside ``model`` (in place) by this rank's ExpertParallelMoE shard;
    ``kwargs`` go to ``shard`` (capacity, experts_per_rank). Returns the model. Every rank must
    call it on the same model (same weights); the FlexMoE layers' full experts are dropped."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FlexMoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, name, shard(child, group, **kwargs))
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel layers' local expert parameters: the ones data-parallel
    wrappers must leave alone, e.g. ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
    model, expert_parameter_names(model))`` before wrapping (their gradients are already complete
    on their owner: a sum over every rank's tokens)."""
    return [f"{prefix}.experts.{n}" if prefix else f"experts.{n}"
            for prefix, m in model.named_modules() if isinstance(m, ExpertParallelMoE)
            for n, _ in m.experts.named_parameters()]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except the expert-parallel layers' local experts."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}
    return [p for p in model.parameters() if id(p) not in sharded]


def all_reduce_replicated_grads(model: nn.Module, group=None, average: bool = True) -> None:
    """Data-parallel reduction of the replicated parameters' gradients (sum, or mean over ranks).
    The experts' gradients are already complete on their owner and are left alone; with a loss
    that is a per-rank mean, divide them by the world size too if the optimiser should see the
    mean over ranks."""
    W = dist.get_world_size(group)
    for p in replicated_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            if average:
                p.grad /= W
