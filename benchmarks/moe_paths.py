"""The MoE layer implementations the benchmark compares, all from the same inputs.

Every path computes the full layer: route (softmax over the router logits, top-k, no
renormalisation) -> dispatch -> SwiGLU experts -> router-weighted combine. Masked experts use
drop semantics: routing is unchanged and slots that picked a masked expert add nothing.

Shapes: T tokens, D d_model, F expert width, E experts, K top-k, N = T*K routed rows.

    flexkern:<backend>  flexkern's route/dispatch/experts_swiglu ops with that experts backend
    loop                a per-expert Python loop (gather, 3 matmuls, index_add) — the classic one
    torch_gmm           the best plain-PyTorch path: argsort permutation, torch._grouped_mm with
                        gate+up fused in one (E, D, 2F) operand, SwiGLU, gather + bmm combine
    dense               (see dense_ceiling) the same GEMMs with every row in one group
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import flexkern
from flexkern.ops import backend as fk_backend

from .shapes import MoEShape

Forward = Callable[[], torch.Tensor]


@dataclass
class LayerInputs:
    """Leaf tensors shared by every path (weights in flexkern's layout)."""

    x_TD: torch.Tensor
    router_ED: torch.Tensor
    w_gate_EFD: torch.Tensor
    w_up_EFD: torch.Tensor
    w_down_EDF: torch.Tensor
    mask_E: torch.Tensor | None   # bool, True = active; None = no mask
    K: int

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x_TD, self.router_ED, self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF]

    def sliced(self, T: int) -> "LayerInputs":
        """The first T tokens as a fresh leaf, weights shared (for the correctness check)."""
        x = self.x_TD[:T].detach().clone().requires_grad_(True)
        return LayerInputs(x, *self.leaves[1:], self.mask_E, self.K)


def make_inputs(shape: MoEShape, device, dtype, seed: int = 0) -> LayerInputs:
    """Random inputs scaled so every intermediate is O(1), drawn on the device (GBs at big shapes).

    A skewed shape (``hot_share`` > 0) gets inputs whose routing puts expert 0 in the top-k of
    exactly ``shape.hot_tokens`` tokens (see force_hot_expert); every path routes them itself."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=dtype).mul_(scale)

    T, D, Fw, E, K = shape.T, shape.D, shape.F, shape.E, shape.K
    mask = None
    if shape.masked_frac > 0:
        n_masked = int(round(E * shape.masked_frac))
        mask = torch.ones(E, dtype=torch.bool)
        mask[torch.arange(E)[1::2][:n_masked]] = False  # every other expert
        mask = mask.to(device)
    x_TD, router_ED = rand(T, D), rand(E, D, scale=D**-0.5)
    if shape.hot_share:
        force_hot_expert(x_TD, router_ED, shape.hot_tokens, g)
    leaves = (x_TD, router_ED, rand(E, Fw, D, scale=D**-0.5), rand(E, Fw, D, scale=D**-0.5),
              rand(E, D, Fw, scale=Fw**-0.5))
    return LayerInputs(*(t.requires_grad_(True) for t in leaves), mask, K)


@torch.no_grad()
def force_hot_expert(x_TD: torch.Tensor, router_ED: torch.Tensor, n_hot: int,
                     generator: torch.Generator | None = None) -> None:
    """In place: expert 0 enters the top-k of exactly ``n_hot`` tokens (a random subset) and of
    no other, whatever the top-k (k < E), for any router that computes x·routerᵀ.

    Feature 0 carries the choice: x[:, 0] = +1 on hot tokens, -1 elsewhere; router row 0 is
    (c, 0, ..., 0) and the other rows get a zero feature 0, so expert 0's logit is ±c while the
    others' logits do not see feature 0. c exceeds the largest |other logit| by 1 (far above
    rounding, in bf16 too). The other rows are scaled by 1/4 (exact) so expert 0's softmax weight
    stays away from 1 and the other experts' rows carry real weight."""
    T = x_TD.shape[0]
    if not 0 <= n_hot <= T:
        raise ValueError(f"n_hot must be in [0, T={T}], got {n_hot}")
    sign_T = torch.full((T,), -1.0, device=x_TD.device)
    hot = torch.randperm(T, generator=generator, device=x_TD.device)[:n_hot]
    sign_T[hot] = 1.0
    x_TD[:, 0] = sign_T.to(x_TD.dtype)
    router_ED[1:, 0] = 0
    router_ED[1:] *= 0.25
    largest = (x_TD.float() @ router_ED[1:].float().t()).abs().max() if router_ED.shape[0] > 1 else 0
    router_ED[0] = 0
    router_ED[0, 0] = float(largest) + 1.0


@torch.no_grad()
def expert_rows(inp: LayerInputs) -> torch.Tensor:
    """Routed rows per expert, (E,) int64, under the benchmark's routing (mask not applied)."""
    _, experts_TK = torch_route(inp.x_TD, inp.router_ED, inp.K, None)
    return torch.bincount(experts_TK.reshape(-1), minlength=inp.router_ED.shape[0])


@dataclass(frozen=True)
class Path:
    name: str
    build: Callable[[LayerInputs], tuple[Forward, list[torch.Tensor]]]
    capturable: bool = True       # free of host synchronisation: CUDA-graph replay possible
    supports_mask: bool = True
    backward: bool = True
    oracle: bool = False          # flexkern's reference on CUDA: E x the work, decode sizes only
    detail: str = ""
    key: tuple = field(default=(), compare=False)  # resolved backends, to skip duplicates


# ---- flexkern ---------------------------------------------------------------------------------
def _resolve(op: str, wanted: str, device: torch.device) -> str:
    """The backend an op runs with when the layer asks for ``wanted``: the same name when that op
    has it, else "auto" (route/dispatch may have no triton version, experts no cuda version)."""
    name = wanted if wanted == "auto" or wanted in fk_backend.available(op) else "auto"
    try:
        return _quiet_lookup(op, name, device)
    except RuntimeError:
        return _quiet_lookup(op, "auto", device)


def _quiet_lookup(op: str, name: str, device: torch.device) -> str:
    """The backend lookup picks for ``name`` on ``device``, without the fallback warning (the
    benchmark records the resolved names itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fk_backend.lookup(op, name, device)[0]


def flexkern_path(wanted: str, device: torch.device) -> Path:
    route_b, disp_b, exp_b = (_resolve(op, wanted, device) for op in ("route", "dispatch", "experts_swiglu"))

    def build(inp: LayerInputs):
        E = inp.router_ED.shape[0]

        def fwd():
            weights_TK, experts_TK, _ = flexkern.route(
                inp.x_TD, inp.router_ED, inp.K, None, inp.mask_E, "drop", False, backend=route_b)
            disp = flexkern.dispatch(experts_TK, E, inp.mask_E, backend=disp_b, validate=False)
            return flexkern.experts_swiglu(inp.x_TD, inp.w_gate_EFD, inp.w_up_EFD, inp.w_down_EDF,
                                           disp, weights_TK, None, backend=exp_b)

        return fwd, inp.leaves

    oracle = exp_b == "reference" and device.type == "cuda"
    return Path(f"flexkern:{wanted}", build, oracle=oracle,
                detail=f"route={route_b} dispatch={disp_b} experts={exp_b}", key=(route_b, disp_b, exp_b))


def flexkern_paths(device: torch.device, keep: Callable[[str], bool] = lambda name: True
                   ) -> tuple[list[Path], dict[str, str]]:
    """One path per experts backend usable on ``device``, plus "auto", for the names ``keep``
    accepts. A path resolving to the same backends as an earlier one is dropped: returns
    (paths, {dropped name: the path it duplicates})."""
    usable = []
    for name in list(fk_backend.available("experts_swiglu")) + ["auto"]:
        try:
            got = _quiet_lookup("experts_swiglu", name, device)
        except RuntimeError:
            continue
        # a backend that declines this device (falls back to another) is not a path of its own
        if (name == "auto" or got == name) and keep(f"flexkern:{name}"):
            usable.append(name)
    paths, seen, same = [], {}, {}
    for name in usable:
        p = flexkern_path(name, device)
        if p.key in seen:
            same[p.name] = seen[p.key]
            continue
        seen[p.key] = p.name
        paths.append(p)
    return paths, same


# ---- plain PyTorch ----------------------------------------------------------------------------
def torch_route(x_TD, router_ED, K, mask_E):
    """softmax(x·Wᵀ) top-k in float32 (as flexkern), drop-masked slots weighted 0."""
    logits_TE = x_TD.float() @ router_ED.float().t()
    weights_TK, experts_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
    if mask_E is not None:
        weights_TK = torch.where(mask_E[experts_TK], weights_TK, 0)
    return weights_TK, experts_TK


def _loop_build(inp: LayerInputs):
    E = inp.router_ED.shape[0]
    active = list(range(E)) if inp.mask_E is None else inp.mask_E.nonzero().flatten().tolist()

    def fwd():
        x_TD = inp.x_TD
        weights_TK, experts_TK = torch_route(x_TD, inp.router_ED, inp.K, inp.mask_E)
        y_TD = torch.zeros_like(x_TD, requires_grad=False)
        for e in active:
            tok, slot = torch.where(experts_TK == e)  # host synchronisation per expert
            x_rD = x_TD[tok]
            h_rF = F.silu(x_rD @ inp.w_gate_EFD[e].t()) * (x_rD @ inp.w_up_EFD[e].t())
            o_rD = (h_rF @ inp.w_down_EDF[e].t()) * weights_TK[tok, slot, None].to(x_TD.dtype)
            y_TD.index_add_(0, tok, o_rD)
        return y_TD

    return fwd, inp.leaves


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def _torch_gmm_build(inp: LayerInputs):
    E, D = inp.router_ED.shape
    # The fastest layout for _grouped_mm: gate and up stacked into one operand, set up once.
    w13_E2FD = torch.cat([inp.w_gate_EFD, inp.w_up_EFD], dim=1).detach().requires_grad_(True)
    w_down_EDF = inp.w_down_EDF

    def fwd():
        x_TD, K, mask_E = inp.x_TD, inp.K, inp.mask_E
        T = x_TD.shape[0]
        weights_TK, experts_TK = torch_route(x_TD, inp.router_ED, K, mask_E)
        key_N = experts_TK.reshape(-1)
        if mask_E is not None:  # dropped slots sort last, past every expert's rows
            key_N = torch.where(mask_E[key_N], key_N, E)
        order_N = torch.argsort(key_N, stable=True)
        # bincount without its host synchronisation (so the path can be graph-captured)
        counts = torch.zeros(E + 1, dtype=torch.int64, device=x_TD.device)
        counts.scatter_add_(0, key_N, torch.ones_like(key_N))
        offs_E = torch.cumsum(counts[:E], 0).to(torch.int32)
        x_ND = x_TD[order_N // K]
        if mask_E is not None:
            # _grouped_mm leaves rows past the last offset unwritten, in its gradient too: zero
            # the dropped rows so nothing unwritten reaches dx.
            used_N1 = (torch.arange(order_N.numel(), device=x_TD.device) < offs_E[-1])[:, None]
            x_ND = torch.where(used_N1, x_ND, 0)
        h_N2F = torch._grouped_mm(x_ND, w13_E2FD.transpose(1, 2), offs=offs_E)
        g_NF, u_NF = h_N2F.chunk(2, dim=-1)
        o_ND = torch._grouped_mm(F.silu(g_NF) * u_NF, w_down_EDF.transpose(1, 2), offs=offs_E)
        row_of_slot_N = torch.empty_like(order_N)
        row_of_slot_N[order_N] = torch.arange(order_N.numel(), device=x_TD.device)
        o_TKD = o_ND[row_of_slot_N].view(T, K, -1)
        if mask_E is not None:  # rows past the last offset are not written by _grouped_mm
            o_TKD = torch.where(mask_E[experts_TK][..., None], o_TKD, 0)
        return torch.bmm(weights_TK.to(x_TD.dtype)[:, None, :], o_TKD)[:, 0]

    return fwd, [inp.x_TD, inp.router_ED, w13_E2FD, w_down_EDF]


def torch_paths() -> list[Path]:
    paths = [Path("loop", _loop_build, capturable=False, detail="per-expert loop, index_add combine")]
    if grouped_mm_available():
        paths.append(Path("torch_gmm", _torch_gmm_build,
                          detail="argsort + torch._grouped_mm x2 + SwiGLU + gather/bmm combine"))
    return paths


# ---- the dense ceiling ------------------------------------------------------------------------
def dense_ceiling(shape: MoEShape, mode: str, device, dtype) -> Forward:
    """The layer's GEMMs with all N routed rows in one group: the same FLOPs, as plain torch.mm.

    fwd: X(N,D)·W1(D,2F) and A(N,F)·W2(F,D); fwd+bwd adds dX, dW1, dA, dW2 (6·N·D·F -> 18·N·D·F).
    """
    N, D, Fw = shape.routed_rows, shape.D, shape.F

    def r(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    x, w1, a, w2 = r(N, D), r(D, 2 * Fw), r(N, Fw), r(Fw, D)
    h, o = r(N, 2 * Fw), r(N, D)

    def fwd():
        torch.mm(x, w1, out=h)
        return torch.mm(a, w2, out=o)

    if mode == "fwd":
        return fwd
    dx, dw1, da, dw2 = r(N, D), r(D, 2 * Fw), r(N, Fw), r(Fw, D)

    def fwd_bwd():
        fwd()
        torch.mm(h, w1.t(), out=dx)
        torch.mm(x.t(), h, out=dw1)
        torch.mm(o, w2.t(), out=da)
        return torch.mm(a.t(), o, out=dw2)

    return fwd_bwd
