"""Models to compare FlexOlmo against, built from a merged model's experts.

- ``expert_submodel``: the merged model restricted to a subset of its experts; [public, owner j]
  with top-2 is exactly owner j's own trained model (what "the owner's model alone" means).
- ``model_soup``: uniform weight averaging of the owner models (Wortsman et al. 2022).
    mode="owners": average the owners' 2-expert models -> [public FFN, mean owner FFN] with the
                   mean owner router row and bias (the owners' shared weights are identical, so
                   this is the plain parameter average of their whole models).
    mode="dense":  average the owners' FFNs into one dense FFN.
- ``BTMEnsemble``: Branch-Train-Merge output ensemble (Li et al. 2022). At each position the
  members' next-token distributions are mixed with weights softmax_i(log p_i(context) / T), where
  log p_i(context) is member i's log-likelihood of the tokens seen so far in the window (uniform
  at the first position).

Shapes: M members, B batch, S sequence, V vocabulary, E experts, F ffn width, D d_model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import FlexOlmoLM, shared_state_dict

_FFN_PARTS = ("gate_proj", "up_proj", "down_proj")


def _num_experts(model: FlexOlmoLM) -> int:
    layers = model.moe_layers()
    if not layers:
        raise ValueError("expected a merged (MoE) model, got a dense one")
    return layers[0].num_experts


def _new_like(model: FlexOlmoLM, config) -> FlexOlmoLM:
    """A model with ``config`` carrying ``model``'s shared (non-FFN) weights."""
    ref = next(model.parameters())
    out = FlexOlmoLM(config).to(device=ref.device, dtype=ref.dtype)
    missing = out.load_state_dict(shared_state_dict(model), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"unexpected shared tensors: {missing.unexpected_keys}")
    return out.eval()


@torch.no_grad()
def expert_submodel(merged: FlexOlmoLM, experts: list[int], top_k: int | None = None) -> FlexOlmoLM:
    """The merged model with only ``experts`` (indices; 0 = public) kept, top_k = len(experts) by default."""
    E = _num_experts(merged)
    if not experts or len(set(experts)) != len(experts) or not all(0 <= e < E for e in experts):
        raise ValueError(f"experts must be distinct indices in [0, {E}), got {experts!r}")
    k = len(experts) if top_k is None else top_k
    out = _new_like(merged, merged.config.with_experts(len(experts), k))
    idx = torch.tensor(experts)
    for src, dst in zip(merged.moe_layers(), out.moe_layers()):
        for name in _FFN_PARTS:
            getattr(dst.experts, name).copy_(getattr(src.experts, name)[idx])
        dst.router.weight.copy_(src.router.weight[idx])
        if src.router.bias is not None:
            dst.router.bias.copy_(src.router.bias[idx])
    return out


@torch.no_grad()
def model_soup(merged: FlexOlmoLM, mode: str = "owners") -> FlexOlmoLM:
    """Uniform soup of the owners' models (experts 1..E-1 of ``merged``); see the module docstring."""
    E = _num_experts(merged)
    if E < 2:
        raise ValueError("model soup needs at least one owner expert besides the public one")
    if mode == "owners":
        out = _new_like(merged, merged.config.with_experts(2, 2))
        for src, dst in zip(merged.moe_layers(), out.moe_layers()):
            for name in _FFN_PARTS:
                w_EFD = getattr(src.experts, name)
                getattr(dst.experts, name).copy_(torch.stack([w_EFD[0], w_EFD[1:].mean(0)]))
            r_ED = src.router.weight
            dst.router.weight.copy_(torch.stack([r_ED[0], r_ED[1:].mean(0)]))
            if src.router.bias is not None:
                b_E = src.router.bias
                dst.router.bias.copy_(torch.stack([b_E[0], b_E[1:].mean()]))
        return out
    if mode == "dense":
        out = _new_like(merged, merged.config.dense())
        for src, block in zip(merged.moe_layers(), out.blocks):
            for name in _FFN_PARTS:
                getattr(block.ffn, name).weight.copy_(getattr(src.experts, name)[1:].mean(0))
        return out
    raise ValueError(f"mode must be 'owners' or 'dense', got {mode!r}")


def btm_log_weights(logprobs_MBSV: torch.Tensor, ids_BS: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position log ensemble weights (M, B, S) float32; exp sums to 1 over M.

    Position t predicts token t+1 from the context ids[:, :t+1]; the weight of member i is
    softmax over members of (sum_{s=1..t} log p_i(ids[s] | ids[:s])) / temperature.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    M, B, S, V = logprobs_MBSV.shape
    # log p_i of each next token that is already in the input: targets ids[:, 1:], (M, B, S-1)
    tok_MBS = logprobs_MBSV[:, :, :-1].gather(-1, ids_BS[None, :, 1:, None].expand(M, B, S - 1, 1))[..., 0]
    prefix_MBS = torch.cat([tok_MBS.new_zeros(M, B, 1), tok_MBS.cumsum(-1)], dim=-1)
    return torch.log_softmax(prefix_MBS.float() / temperature, dim=0)


def btm_weights(logprobs_MBSV: torch.Tensor, ids_BS: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position ensemble weights (M, B, S) float32, summing to 1 over M (see btm_log_weights)."""
    return btm_log_weights(logprobs_MBSV, ids_BS, temperature).exp()


class BTMEnsemble(nn.Module):
    """Output ensemble of language models; ``forward`` returns mixed log-probabilities (B, S, V)."""

    def __init__(self, models: list[nn.Module], temperature: float = 1.0):
        super().__init__()
        if not models:
            raise ValueError("BTMEnsemble needs at least one model")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.members = nn.ModuleList(models)
        self.temperature = temperature

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        out = []
        for b in range(ids_BS.shape[0]):  # one row at a time keeps M x S x V memory small
            ids_1S = ids_BS[b:b + 1]
            logp_MBSV = torch.stack([F.log_softmax(m(ids_1S).float(), dim=-1) for m in self.members])
            logw_MBS = btm_log_weights(logp_MBSV, ids_1S, self.temperature)
            out.append(torch.logsumexp(logp_MBSV + logw_MBS[..., None], dim=0))
        return torch.cat(out)


@torch.no_grad()
def member_and_btm_losses(members: dict[str, nn.Module], stream: torch.Tensor, seq_len: int,
                          max_tokens: int | None = None, temperature: float = 1.0) -> tuple[dict[str, float], float]:
    """Each member's mean loss and the BTM ensemble's on one stream, running every member once.

    Same windows and numbers as ``evaluate.stream_loss`` on each member and on ``BTMEnsemble``.
    """
    from .evaluate import stream_windows

    ids_NS = stream_windows(stream, seq_len, max_tokens)
    names = list(members)
    for m in members.values():
        m.eval()
    totals = dict.fromkeys(names + [None], 0.0)
    for row in ids_NS:
        ids_1S = row[None].to(next(members[names[0]].parameters()).device)
        inp, tgt = ids_1S[:, :-1], ids_1S[:, 1:]
        logp_MBSV = torch.stack([F.log_softmax(members[n](inp).float(), dim=-1) for n in names])
        nll_MBS = -logp_MBSV.gather(-1, tgt[None, ..., None].expand(len(names), *tgt.shape, 1))[..., 0]
        for n, nll in zip(names, nll_MBS):
            totals[n] += float(nll.sum())
        logw_MBS = btm_log_weights(logp_MBSV, inp, temperature)
        mix_BSV = torch.logsumexp(logp_MBSV + logw_MBS[..., None], dim=0)
        totals[None] -= float(mix_BSV.gather(-1, tgt[..., None]).sum())
    count = ids_NS[:, 1:].numel()
    return {n: totals[n] / count for n in names}, totals[None] / count
