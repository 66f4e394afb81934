"""An independent, per-token implementation of the FlexMoE layer used as a test oracle.

It shares no code with flexkern.ops: routing, masking and the expert MLP are written out token by
token (differentiable, so its gradients are an oracle too)."""
import torch


def _ffn(x_D, gate_FD, up_FD, down_DF):
    g = gate_FD @ x_D
    return down_DF @ (g * torch.sigmoid(g) * (up_FD @ x_D))


def moe_per_token(x_TD, router_ED, bias_E, gate_EFD, up_EFD, down_EDF, mask_E, top_k,
                  mask_mode="reroute", renormalize=False):
    """bias_E is the raw router bias: applied as min(b, 0) to experts 1.. and not to expert 0."""
    T, E = x_TD.shape[0], router_ED.shape[0]
    active = [True] * E if mask_E is None else [bool(m) for m in mask_E]
    rows = []
    for t in range(T):
        logits = {}
        for e in range(E):
            if not active[e] and mask_mode == "reroute":
                continue  # rerouted: the expert does not exist for the softmax
            logit = router_ED[e] @ x_TD[t]
            if bias_E is not None and e > 0:
                logit = logit + torch.clamp(bias_E[e], max=0)
            logits[e] = logit
        top = max(float(v.detach()) for v in logits.values())
        exps = {e: torch.exp(v - top) for e, v in logits.items()}
        total = sum(exps.values())
        probs = {e: v / total for e, v in exps.items()}
        chosen = sorted(probs, key=lambda e: (-float(probs[e].detach()), e))[:top_k]
        norm = sum(probs[e] for e in chosen) if renormalize else 1.0
        y = torch.zeros_like(x_TD[t])
        for e in chosen:
            if active[e]:  # drop mode: a slot that chose a masked expert contributes nothing
                y = y + probs[e] / norm * _ffn(x_TD[t], gate_EFD[e], up_EFD[e], down_EDF[e])
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros_like(x_TD)
