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
from torch import nn

from .. import ops
from ..ops.checks import can_read_values

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
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if mask_mode not in ("reroute", "drop"):
            raise ValueError(f"mask_mode must be 'reroute' or 'drop', got {mask_mode!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.top_k = d_model, d_ff, top_k
        self.renormalize, self.mask_mode, self.backend = renormalize, mask_mode, backend
        # False: keep the experts' gate/up pre-activations for the backward (faster);
        # True: recompute them there (2·T·K·d_ff fewer elements held between forward and backward).
        self.recompute_activations = recompute_activations
        self.router = Router(d_model, num_experts, router_bias, **factory)
        self.experts = Experts(d_model, d_ff, num_experts, **factory)
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer("expert_frozen", torch.zeros(num_experts, dtype=torch.bool, device=device))
        self.z_loss: torch.Tensor | None = None
        self._checked_mask_version = None

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    def __getstate__(self):
        # The last forward's z-loss is a graph node, which copy.deepcopy and pickle refuse; a copy
        # of the layer (an EMA model, a checkpoint by pickle) starts without it.
        state = super().__getstate__()
        return {**state, "z_loss": None}

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
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, renormalize={self.renormalize}, mask_mode={self.mask_mode!r}")

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
        w = self.router.weight
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
        y_TD = ops.experts_swiglu(
            x_TD, self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj, disp,
            weights_TK, self.expert_frozen, self.backend, self.recompute_activations,
        )
        return y_TD.view(x.shape)

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
            self.backend,
        )
        # The z-loss is a training term: not computed when it cannot have a gradient.
        self.z_loss = self._z_loss(logits_TE) if logits_TE.requires_grad else None
        return weights_TK, experts_TK

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> list:
        """Which backend runs route, dispatch and experts_swiglu on input ``x``, and why
        (``flexkern.explain`` for each op with this layer's arguments and backend preference)."""
        x_TD = x.reshape(-1, self.d_model)
        route_args = (x_TD, self.router.weight, self.top_k, self.effective_bias(), self.expert_mask,
                      self.mask_mode, self.renormalize)
        why = [ops.backend.explain("route", *route_args, backend=self.backend)]
        weights_TK, experts_TK, _ = ops.route(*route_args, backend=self.backend)
        why.append(ops.backend.explain("dispatch", experts_TK, self.num_experts, self.expert_mask,
                                       validate=False, backend=self.backend))
        disp = ops.dispatch(experts_TK, self.num_experts, self.expert_mask, self.backend, validate=False)
        why.append(ops.backend.explain(
            "experts_swiglu", x_TD, self.experts.gate_proj, self.experts.up_proj,
            self.experts.down_proj, disp, weights_TK, self.expert_frozen, backend=self.backend))
        return why

    def _z_loss(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """mean over tokens of logsumexp(active logits)^2; finite when every expert is masked."""
        if logits_TE.shape[0] == 0:
            return logits_TE.sum()
        if self.mask_mode == "reroute":
            m = self.expert_mask
            any_active = m.any()
            # Masked logits leave the sum; with none active a finite fill keeps the gradient clean
            # and the token's term is 0.
            fill = torch.where(any_active, float("-inf"), 0.0).to(logits_TE.dtype)
            lse_T = torch.logsumexp(torch.where(m, logits_TE, fill), dim=-1)
            lse_T = torch.where(any_active, lse_T, 0.0)
        else:
            lse_T = torch.logsumexp(logits_TE, dim=-1)
        return (lse_T ** 2).mean()

    # ---- growing and shrinking -----------------------------------------------------------------
    def _replace(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))

    @torch.no_grad()
    def add_expert(self, gate_proj=None, up_proj=None, down_proj=None, router_row=None, bias=None) -> int:
        """Append an expert (weights given, or freshly initialised). Returns its index.

        Parameters are replaced by larger ones, so build optimizers after growing the layer.
        """
        E, D, Fw = self.num_experts, self.d_model, self.d_ff
        ref = self.router.weight
        factory = {"device": ref.device, "dtype": ref.dtype}

        def new(value, shape):
            if value is None:
                return torch.randn(shape, **factory) * 0.02
            value = torch.as_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(f"new expert tensor must have shape {shape}, got {tuple(value.shape)}")
            return value.to(**factory)

        parts = {
            (self.experts, "gate_proj"): new(gate_proj, (Fw, D)),
            (self.experts, "up_proj"): new(up_proj, (Fw, D)),
            (self.experts, "down_proj"): new(down_proj, (D, Fw)),
            (self.router, "weight"): new(router_row, (D,)),
        }
        if self.router.bias is not None:
            parts[(self.router, "bias")] = new(0.0 if bias is None else bias, ())
        for (module, name), value in parts.items():
            self._replace(module, name, torch.cat([getattr(module, name), value[None]]))
        self.expert_mask = torch.cat([self.expert_mask, self.expert_mask.new_ones(1)])
        self.expert_frozen = torch.cat([self.expert_frozen, self.expert_frozen.new_zeros(1)])
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
        keep = [e for e in range(E) if e != index]
        for module, name in ((self.experts, "gate_proj"), (self.experts, "up_proj"),
                             (self.experts, "down_proj"), (self.router, "weight"), (self.router, "bias")):
            if getattr(module, name) is not None:
                self._replace(module, name, getattr(module, name)[keep])
        self.expert_mask = self.expert_mask[keep].clone()
        self.expert_frozen = self.expert_frozen[keep].clone()
