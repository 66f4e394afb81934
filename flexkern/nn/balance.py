"""The routing's training terms: router z-loss, load-balancing losses, aux-loss-free bias steps.

Shapes: T tokens, E experts, K top-k, B sequences of L tokens (T = B*L).

    z_loss                 mean_t logsumexp(active logits_t)^2                     (ST-MoE, FlexOlmo)
    switch_balance_loss    E_act * sum_e f_e * P_e                     (Switch Transformer, OLMoE)
                           f_e = routed rows of e / T,  P_e = mean_t p_te
    sequence_balance_loss  mean_b sum_e f_be * P_be                            (DeepSeek-V3, eq. 17)
                           f_be = E_act / (K*L) * rows of e from sequence b,  P_be = mean_{t in b} p_te
    score_bias_step        rate * sign(mean load - load_e), centred over the active experts
                                                              (DeepSeek-V3's aux-loss-free balancing)

p_te are the normalised gate scores over the active experts: the softmax probabilities, or the
sigmoids divided by their sum (DeepSeek-V3's s'). E_act counts the active experts (all of them
in "drop" mode, where the mask does not change routing), so a masked expert behaves as if deleted.
With no mask and softmax gating ``switch_balance_loss`` equals transformers'
``load_balancing_loss_func`` for one layer. Routed rows count the slots that reached an expert
(slots dropped by the mask do not). Nothing here reads a value back to the host.
"""
from __future__ import annotations

import torch

from ..ops.route import gate_scores


def z_loss(logits_TE: torch.Tensor, mask_E: torch.Tensor | None, reroute: bool) -> torch.Tensor:
    """mean over tokens of logsumexp(active logits)^2; finite when every expert is masked."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    if reroute and mask_E is not None:
        any_active = mask_E.any()
        # Masked logits leave the sum; with none active a finite fill keeps the gradient clean
        # and the token's term is 0.
        fill = torch.where(any_active, float("-inf"), 0.0).to(logits_TE.dtype)
        lse_T = torch.logsumexp(torch.where(mask_E, logits_TE, fill), dim=-1)
        lse_T = torch.where(any_active, lse_T, 0.0)
    else:
        lse_T = torch.logsumexp(logits_TE, dim=-1)
    return (lse_T ** 2).mean()


def routing_probs(logits_TE: torch.Tensor, mask_E: torch.Tensor | None, reroute: bool,
                  scoring: str) -> torch.Tensor:
    """p_TE: the gate scores normalised over the active experts (rows sum to 1, or 0 when no
    expert is active)."""
    scores_TE = gate_scores(logits_TE, mask_E, reroute, scoring)
    if scoring == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def active_count(mask_E: torch.Tensor | None, reroute: bool, num_experts: int, like: torch.Tensor):
    """E_act as a tensor of ``like``'s dtype (no host read)."""
    if reroute and mask_E is not None:
        return mask_E.sum().to(like.dtype)
    return torch.tensor(float(num_experts), dtype=like.dtype, device=like.device)


def switch_balance_loss(probs_TE: torch.Tensor, rows_E: torch.Tensor, num_active: torch.Tensor) -> torch.Tensor:
    """E_act * sum_e (rows_e / T) * mean_t p_te (see the module docstring); 0 for T = 0."""
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum()
    f_E = rows_E.to(probs_TE.dtype) / T
    return num_active * (f_E * probs_TE.mean(0)).sum()


def sequence_rows(experts_TK: torch.Tensor, routed_TK: torch.Tensor, num_sequences: int,
                  num_experts: int) -> torch.Tensor:
    """rows_BE: how many of each sequence's slots reached each expert (routed_TK: the slot has a row)."""
    T, K = experts_TK.shape
    ids_BN = experts_TK.long().clamp(0, num_experts - 1).reshape(num_sequences, (T // num_sequences) * K)
    ones_BN = routed_TK.reshape(num_sequences, -1).to(torch.float32)
    return torch.zeros(num_sequences, num_experts, device=experts_TK.device).scatter_add_(1, ids_BN, ones_BN)


def sequence_balance_loss(probs_TE: torch.Tensor, rows_BE: torch.Tensor, k: int,
                          num_active: torch.Tensor) -> torch.Tensor:
    """mean_b sum_e (E_act / (K*L)) rows_be * mean_{t in b} p_te (see the module docstring)."""
    B, E = rows_BE.shape
    T = probs_TE.shape[0]
    if T == 0 or B == 0:
        return probs_TE.sum()
    L = T // B
    f_BE = rows_BE.to(probs_TE.dtype) * (num_active / (k * L))
    P_BE = probs_TE.reshape(B, L, E).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def score_bias_step(load_E: torch.Tensor, mask_E: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias change for a load (tokens per expert): +rate for an expert below the mean load of
    the active experts, -rate above it, then centred over the active experts (a shift common to
    all of them changes no choice). Masked experts: 0."""
    load = load_E.to(torch.float32)
    active = mask_E.to(torch.float32)
    n = active.sum().clamp_min(1.0)
    mean = (load * active).sum() / n
    step = rate * torch.sign(mean - load) * active
    return (step - step.sum() / n) * active
