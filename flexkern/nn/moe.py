"""FlexMoE: the MoE layer of FlexOlmo — router with an expert mask and bias, SwiGLU experts.

Public contract (the merge tooling depends on these names and shapes):
    router.weight       (E, D)   router rows; row 0 is the public expert
    router.bias         (E,)     applied as min(b, 0) to experts 1..E-1; expert 0 gets no bias
    experts.gate_proj   (E, F, D)
    experts.up_proj     (E, F, D)
    experts.down_proj   (E, D, F)    expert e: down(silu(gate x) * up x)
    expert_mask         bool (E,) buffer, True = active; change it in place at any time
    expert_frozen       bool (E,) buffer, True = no gradient reaches that expert or its router row
    mask_mode           "reroute": masked experts leave the softmax (same as deleting them)
                        "drop":    routing unchanged, slots that chose a masked expert add nothing
    z_loss              router z-loss of the last forward that wanted a gradient: mean over tokens
                        of logsumexp(active logits)^2 (None after a forward whose router logits need
                        no gradient: under no_grad, or neither input nor router parameters require it)
    load_balancing_loss Switch/OLMoE balance loss of the same forward (transformers'
                        load_balancing_loss_func for one layer, unweighted); None like z_loss
    sequence_balance_loss  DeepSeek-V3's sequence-level balance loss of the same forward (the input's
                        second-to-last dimension is the sequence; a 2-d input is one sequence)
    tokens_per_expert   int64 (E,) on the device: routed rows per expert in the last forward

Router family (every setting keeps the mask rules; flexkern/ops/route.py has the formulas):
    scoring             "softmax" (FlexOlmo default) or "sigmoid"; renormalize; routed_scaling
    n_group, topk_group group-limited top-k (DeepSeek-V3)
    score_bias          float32 (E,) buffer added to the scores for the choice only (aux-loss-free
                        balancing); ``update_score_bias`` moves it from the load counted in training
                        forwards since the last update (``expert_load``)
    shared_expert       an always-on SwiGLU of width shared_d_ff added to the routed output, scaled
                        by sigmoid(x . shared_expert.output_gate) when shared_gate=True (Qwen2-MoE)

Rules:
- Expert 0 is the public expert: it stays in slot 0 and has no bias. ``remove_expert(0)`` is
  refused; masking it (``expert_mask[0] = False``) is allowed.
- ``expert_mask`` and ``expert_frozen`` are saved in ``state_dict``. A state dict without them
  (files written before they were saved) leaves the layer's current values: all active and none
  frozen for a new layer. Assigning either needs a bool tensor of shape (E,).
- Fewer active experts than top_k (reroute): the slots past the active experts get weight 0 and
  are dropped (row -1), every expert masked gives y = 0, and the z-loss is over the active logits
  only (0 for a token with none). This is the same in eager, compiled and CUDA-graph code (no
  check needs the mask's values); eager code warns once per mask change.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.checks import can_read_values
from ..ops.route import check_gating
from . import balance

# Weight of the router z-loss in the training loss (FlexOlmo): loss = CE + Z_LOSS_WEIGHT * z_loss.
Z_LOSS_WEIGHT = 1e-3
_STATE_BUFFERS = ("expert_mask", "expert_frozen")


class Router(nn.Module):
    def __init__(self, d_model: int, num_experts: int, bias: bool, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.bias = nn.Parameter(torch.zeros(num_experts, **factory)) if bias else None
        nn.init.normal_(self.weight, std=0.02)


class Experts(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int, **factory):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert: down(silu(gate x) * up x), optionally scaled by
    sigmoid(x . output_gate) (Qwen2-MoE's shared-expert gate)."""

    def __init__(self, d_model: int, d_ff: int, output_gate: bool, **factory):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        self.up_proj = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(d_model, d_ff, **factory))
        self.output_gate = nn.Parameter(torch.empty(1, d_model, **factory)) if output_gate else None
        for w in (self.gate_proj, self.up_proj, self.down_proj, self.output_gate):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = F.linear(F.silu(F.linear(x_TD, self.gate_proj)) * F.linear(x_TD, self.up_proj),
                        self.down_proj)
        if self.output_gate is not None:
            y_TD = torch.sigmoid(F.linear(x_TD, self.output_gate)) * y_TD
        return y_TD


class FlexMoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        router_bias: bool = True,
        renormalize: bool = False,
        mask_mode: str = "reroute",
        backend: str | None = None,
        recompute_activations: bool = False,
        device=None,
        dtype=None,
        *,
        scoring: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling: float = 1.0,
        score_bias: bool = False,
        shared_d_ff: int = 0,
        shared_gate: bool = False,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._set_gating(num_experts, top_k, renormalize, mask_mode, scoring, n_group, topk_group,
                         routed_scaling)
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff = d_model, d_ff
        self.backend = backend
        # False: keep the experts' gate/up pre-activations for the backward (faster);
        # True: recompute them there (2·T·K·d_ff fewer elements held between forward and backward).
        self.recompute_activations = recompute_activations
        self.router = Router(d_model, num_experts, router_bias, **factory)
        self.experts = Experts(d_model, d_ff, num_experts, **factory)
        self._init_shared_and_state(num_experts, score_bias, shared_d_ff, shared_gate, factory)

    def _set_gating(self, num_experts, top_k, renormalize, mask_mode, scoring, n_group, topk_group,
                    routed_scaling) -> None:
        """Check and keep top_k and the routing settings (shared with ExpertParallelMoE)."""
        check_gating(num_experts, top_k, scoring, n_group, topk_group, routed_scaling)
        if mask_mode not in ("reroute", "drop"):
            raise ValueError(f"mask_mode must be 'reroute' or 'drop', got {mask_mode!r}")
        self.top_k = top_k
        self.renormalize, self.mask_mode, self.scoring = bool(renormalize), mask_mode, scoring
        self.n_group, self.topk_group, self.routed_scaling = n_group, topk_group, float(routed_scaling)

    def _init_shared_and_state(self, num_experts, score_bias, shared_d_ff, shared_gate, factory):
        """The shared expert, the score bias and the per-forward state (shared with ExpertParallelMoE)."""
        device = factory["device"]
        if not isinstance(shared_d_ff, int) or isinstance(shared_d_ff, bool) or shared_d_ff < 0:
            raise ValueError(f"shared_d_ff must be an int >= 0 (0: no shared expert), got {shared_d_ff!r}")
        if shared_gate and not shared_d_ff:
            raise ValueError("shared_gate needs a shared expert (shared_d_ff > 0)")
        self.shared_expert = SharedExpert(self.d_model, shared_d_ff, shared_gate, **factory) if shared_d_ff else None
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer("expert_frozen", torch.zeros(num_experts, dtype=torch.bool, device=device))
        if score_bias:
            self.register_buffer("score_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
            # tokens per expert counted by training forwards since the last update_score_bias
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64, device=device),
                                 persistent=False)
        else:
            self.score_bias = self.expert_load = None
        self.z_loss: torch.Tensor | None = None
        self._routing = None  # what the balance losses need from the last forward
        self._offsets_E1 = None
        self._checked_mask_version = None

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    def settings(self) -> dict:
        """The constructor's keyword settings of this layer (not the sizes): a copy built with
        them routes the same way."""
        shared = self.shared_expert
        return dict(router_bias=self.router.bias is not None, renormalize=self.renormalize,
                    mask_mode=self.mask_mode, backend=self.backend,
                    recompute_activations=self.recompute_activations, scoring=self.scoring,
                    n_group=self.n_group, topk_group=self.topk_group,
                    routed_scaling=self.routed_scaling, score_bias=self.score_bias is not None,
                    shared_d_ff=0 if shared is None else shared.gate_proj.shape[0],
                    shared_gate=shared is not None and shared.output_gate is not None)

    def __getstate__(self):
        # The last forward's z-loss and routing are graph nodes, which copy.deepcopy and pickle
        # refuse; a copy of the layer (an EMA model, a checkpoint by pickle) starts without them.
        state = super().__getstate__()
        return {**state, "z_loss": None, "_routing": None, "_offsets_E1": None}

    def __setattr__(self, name, value):
        if name in _STATE_BUFFERS and name in self.__dict__.get("_buffers", {}):
            value = self._checked_state(name, value)
        super().__setattr__(name, value)

    def _checked_state(self, name: str, value) -> torch.Tensor:
        """expert_mask / expert_frozen must stay bool (E,) on the layer's device."""
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value, dtype=torch.bool)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{name} must be a bool tensor of shape ({self.num_experts},): {exc}") from None
        if value.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got dtype {value.dtype}")
        if tuple(value.shape) != (self.num_experts,):
            raise ValueError(f"{name} must have shape ({self.num_experts},) (one entry per expert), "
                             f"got {tuple(value.shape)}")
        return value.to(self.router.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Files written before the mask and frozen flags were saved: keep the current values.
        for name in _STATE_BUFFERS:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        text = (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, renormalize={self.renormalize}, mask_mode={self.mask_mode!r}")
        if self.scoring != "softmax":
            text += f", scoring={self.scoring!r}"
        if self.n_group > 1:
            text += f", n_group={self.n_group}, topk_group={self.topk_group}"
        if self.routed_scaling != 1.0:
            text += f", routed_scaling={self.routed_scaling}"
        if self.score_bias is not None:
            text += ", score_bias=True"
        return text

    # ---- forward -------------------------------------------------------------------------------
    def effective_bias(self) -> torch.Tensor | None:
        """min(b, 0) for experts 1..E-1 and 0 for the public expert 0."""
        b = self.router.bias
        if b is None:
            return None
        # One clamp and one fill (not zeros + clamp + cat): the same values, and under autograd the
        # same gradient (expert 0's entry gets none; the others pass where b <= 0).
        bias_E = torch.clamp(b, max=0)
        bias_E[:1].zero_()
        return bias_E

    def _check_mask(self) -> None:
        # Only a warning: fewer than top_k active experts is defined (module docstring). Reading the
        # mask costs one device-to-host copy, so it happens only after the mask changed, and never
        # while compiling or capturing a CUDA graph.
        m = self.expert_mask
        if self.mask_mode != "reroute" or not can_read_values(m):
            return
        try:
            version = (m.data_ptr(), m._version)
        except RuntimeError:  # inference tensors have no version counter
            return
        if version == self._checked_mask_version:
            return
        self._checked_mask_version = version
        active = int(m.sum())
        if active < self.top_k:
            what = "every expert is masked: the layer outputs zeros" if active == 0 else (
                f"the slots past them get weight 0")
            warnings.warn(f"expert_mask leaves {active} active experts, fewer than "
                          f"top_k={self.top_k}; {what}", stacklevel=3)

    def _check_input(self, x) -> None:
        layer = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{layer} expects input (..., {self.d_model}), got shape {tuple(x.shape)}")
        w = self.experts.gate_proj  # the router may be kept in float32 (DeepSeek-V3)
        if x.dtype != w.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"input is on {x.device} but the layer is on {w.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        self._check_mask()
        x_TD = x.reshape(-1, self.d_model)
        weights_TK, experts_TK = self._route(x_TD)
        mask_E = self.expert_mask
        disp = ops.dispatch(experts_TK, self.num_experts, mask_E, self.backend, validate=False)
        self._record_routing(x, experts_TK, disp)
        y_TD = ops.experts_swiglu(
            x_TD, self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj, disp,
            weights_TK, self.expert_frozen, self.backend, self.recompute_activations,
        )
        return self._add_shared(x_TD, y_TD).view(x.shape)

    def _add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        return y_TD if self.shared_expert is None else y_TD + self.shared_expert(x_TD)

    def _route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """route with this layer's router; sets ``self.z_loss``. Returns (weights_TK, experts_TK).

        Frozen experts' router rows and biases are detached only where a gradient could reach them,
        and the z-loss is computed only when it can have a gradient (its logits require grad). A
        forward without gradient (no_grad, or no router parameter or input requiring grad) runs
        the bias clamp and the route op, nothing more (``tests/test_moe.py`` pins the op count)."""
        w, frozen_E = self.router.weight, self.expert_frozen
        bias_E = self.effective_bias()
        router_ED = w
        if w.requires_grad and torch.is_grad_enabled():
            # frozen router rows and biases see no gradient (the experts skip their dW work)
            router_ED = torch.where(frozen_E[:, None], w.detach(), w)
        if bias_E is not None and bias_E.requires_grad:
            bias_E = torch.where(frozen_E, bias_E.detach(), bias_E)
        weights_TK, experts_TK, logits_TE = ops.route(
            x_TD, router_ED, self.top_k, bias_E, self.expert_mask, self.mask_mode, self.renormalize,
            self.backend, **self._gating(),
        )
        # The z-loss is a training term: not computed when it cannot have a gradient.
        wants_grad = logits_TE.requires_grad
        self.z_loss = balance.z_loss(logits_TE, self.expert_mask, self.mask_mode == "reroute") \
            if wants_grad else None
        self._routing = (logits_TE, experts_TK) if wants_grad else None
        return weights_TK, experts_TK

    def _gating(self) -> dict:
        """The route op's keyword settings for this layer (only those that differ from the default,
        so the FlexOlmo gate calls the op exactly as before)."""
        gate = {}
        if self.scoring != "softmax":
            gate["scoring"] = self.scoring
        if self.score_bias is not None:
            gate["score_bias_E"] = self.score_bias
        if self.n_group > 1:
            gate.update(n_group=self.n_group, topk_group=self.topk_group)
        if self.routed_scaling != 1.0:
            gate["routed_scaling"] = self.routed_scaling
        return gate

    def _record_routing(self, x: torch.Tensor, experts_TK: torch.Tensor, disp) -> None:
        """Keep what the balance losses and ``tokens_per_expert`` read (references, no work) and
        count the load for ``update_score_bias`` in training forwards (no host read)."""
        self._offsets_E1 = disp.offsets_E1
        if self._routing is not None:
            seq_len = x.shape[-2] if x.dim() >= 2 else 1  # a 2-d input is one sequence
            self._routing = (*self._routing[:2], disp.row_of_slot_TK, seq_len)
        if self.expert_load is not None and self.training:
            self.expert_load += disp.offsets_E1.diff()

    # ---- what the last forward routed -----------------------------------------------------------
    @property
    def tokens_per_expert(self) -> torch.Tensor | None:
        """int64 (E,), on the layer's device: rows routed to each expert by the last forward
        (masked or dropped slots not counted); None before the first forward."""
        return None if self._offsets_E1 is None else self._offsets_E1.diff()

    def _balance_inputs(self):
        if self._routing is None or len(self._routing) < 4:
            return None
        logits_TE, experts_TK, row_of_slot_TK, seq_len = self._routing
        reroute = self.mask_mode == "reroute"
        probs_TE = balance.routing_probs(logits_TE, self.expert_mask, reroute, self.scoring)
        n_active = balance.active_count(self.expert_mask, reroute, self.num_experts, probs_TE)
        return probs_TE, experts_TK, row_of_slot_TK, seq_len, n_active

    @property
    def load_balancing_loss(self) -> torch.Tensor | None:
        """Switch/OLMoE load-balancing loss of the last forward that wanted a gradient (else None):
        E_act * sum_e f_e P_e (flexkern/nn/balance.py); differentiable in the router."""
        inputs = self._balance_inputs()
        if inputs is None:
            return None
        probs_TE, _, _, _, n_active = inputs
        return balance.switch_balance_loss(probs_TE, self._offsets_E1.diff(), n_active)

    @property
    def sequence_balance_loss(self) -> torch.Tensor | None:
        """DeepSeek-V3's sequence-level balance loss of the last forward that wanted a gradient
        (else None), over the input's sequences (its second-to-last dimension)."""
        inputs = self._balance_inputs()
        if inputs is None:
            return None
        probs_TE, experts_TK, row_of_slot_TK, seq_len, n_active = inputs
        T = probs_TE.shape[0]
        B = T // seq_len if seq_len else 0
        rows_BE = balance.sequence_rows(experts_TK, row_of_slot_TK >= 0, B, self.num_experts) if B else \
            probs_TE.new_zeros((0, self.num_experts))
        return balance.sequence_balance_loss(probs_TE, rows_BE, self.top_k, n_active)

    @torch.no_grad()
    def update_score_bias(self, rate: float = 1e-3, group=None) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): move ``score_bias`` by ``rate`` towards
        balance from the load counted by training forwards since the last call (summed over
        ``group`` with an all-reduce when given: data-parallel ranks must agree), then reset the
        count. Masked experts keep their bias. No host synchronisation."""
        if self.score_bias is None:
            raise RuntimeError("this layer has no score bias (build it with score_bias=True)")
        if not (isinstance(rate, (int, float)) and rate >= 0):
            raise ValueError(f"rate must be a number >= 0, got {rate!r}")
        load_E = self.expert_load.to(torch.float32)
        if group is not None:
            torch.distributed.all_reduce(load_E, group=group)
        self.score_bias += balance.score_bias_step(load_E, self.expert_mask, float(rate))
        self.expert_load.zero_()

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> list:
        """Which backend runs route, dispatch and experts_swiglu on input ``x``, and why
        (``flexkern.explain`` for each op with this layer's arguments and backend preference)."""
        x_TD = x.reshape(-1, self.d_model)
        route_args = (x_TD, self.router.weight, self.top_k, self.effective_bias(), self.expert_mask,
                      self.mask_mode, self.renormalize)
        why = [ops.backend.explain("route", *route_args, backend=self.backend, **self._gating())]
        weights_TK, experts_TK, _ = ops.route(*route_args, backend=self.backend, **self._gating())
        why.append(ops.backend.explain("dispatch", experts_TK, self.num_experts, self.expert_mask,
                                       validate=False, backend=self.backend))
        disp = ops.dispatch(experts_TK, self.num_experts, self.expert_mask, self.backend, validate=False)
        why.append(ops.backend.explain(
            "experts_swiglu", x_TD, self.experts.gate_proj, self.experts.up_proj,
            self.experts.down_proj, disp, weights_TK, self.expert_frozen, backend=self.backend))
        return why

    # ---- growing and shrinking -----------------------------------------------------------------
    def _replace(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))

    def _prepare_resize(self) -> None:
        """Growing and shrinking work on plain ``Experts``; others (views of another model's fused
        weights) are copied into one first. Group-limited routing needs a fixed expert count."""
        if self.n_group > 1:
            raise ValueError(f"cannot add or remove experts with group-limited routing (n_group="
                             f"{self.n_group} must divide the expert count); mask them instead")
        e = self.experts
        if type(e) is not Experts:
            plain = Experts(self.d_model, self.d_ff, self.num_experts, device=e.gate_proj.device,
                            dtype=e.gate_proj.dtype)
            for name in ("gate_proj", "up_proj", "down_proj"):
                src = getattr(e, name)
                setattr(plain, name, nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad))
            self.experts = plain

    def _resize_state(self, index) -> None:
        """Per-expert buffers after a resize: ``index`` is the kept ids, or None for one appended."""
        def resize(t, fill):
            return t[index].clone() if index is not None else torch.cat([t, t.new_full((1,), fill)])

        self.expert_mask = resize(self.expert_mask, True)
        self.expert_frozen = resize(self.expert_frozen, False)
        if self.score_bias is not None:
            self.score_bias = resize(self.score_bias, 0.0)
            self.expert_load = resize(self.expert_load, 0)
        self._routing = self._offsets_E1 = None

    @torch.no_grad()
    def add_expert(self, gate_proj=None, up_proj=None, down_proj=None, router_row=None, bias=None) -> int:
        """Append an expert (weights given, or freshly initialised). Returns its index.

        Parameters are replaced by larger ones, so build optimizers after growing the layer.
        """
        self._prepare_resize()
        E, D, Fw = self.num_experts, self.d_model, self.d_ff

        def new(value, shape, like):
            factory = {"device": like.device, "dtype": like.dtype}
            if value is None:
                return torch.randn(shape, **factory) * 0.02
            value = torch.as_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(f"new expert tensor must have shape {shape}, got {tuple(value.shape)}")
            return value.to(**factory)

        ex, r = self.experts, self.router
        parts = {
            (ex, "gate_proj"): new(gate_proj, (Fw, D), ex.gate_proj),
            (ex, "up_proj"): new(up_proj, (Fw, D), ex.up_proj),
            (ex, "down_proj"): new(down_proj, (D, Fw), ex.down_proj),
            (r, "weight"): new(router_row, (D,), r.weight),
        }
        if r.bias is not None:
            parts[(r, "bias")] = new(0.0 if bias is None else bias, (), r.bias)
        for (module, name), value in parts.items():
            self._replace(module, name, torch.cat([getattr(module, name), value[None]]))
        self._resize_state(None)
        return E

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        """Delete expert ``index`` from every per-expert tensor (the opt-out that writes a new model).

        Expert 0, the public expert, cannot be removed (it must stay in slot 0, where no bias
        applies); mask it instead with ``expert_mask[0] = False``."""
        E = self.num_experts
        if isinstance(index, bool) or not isinstance(index, int) or not -E <= index < E:
            raise ValueError(f"expert index must be in [0, {E}), got {index!r}")
        index %= E
        if index == 0:
            raise ValueError("expert 0 is the public expert and cannot be removed "
                             "(mask it instead: expert_mask[0] = False)")
        if E - 1 < self.top_k:
            raise ValueError(f"cannot remove an expert: {E - 1} experts would be fewer than top_k={self.top_k}")
        self._prepare_resize()
        keep = [e for e in range(E) if e != index]
        for module, name in ((self.experts, "gate_proj"), (self.experts, "up_proj"),
                             (self.experts, "down_proj"), (self.router, "weight"), (self.router, "bias")):
            if getattr(module, name) is not None:
                self._replace(module, name, getattr(module, name)[keep])
        self._resize_state(keep)
