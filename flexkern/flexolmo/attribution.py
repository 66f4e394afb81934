"""Provenance per token: how much of each token's FFN output came from each owner's expert.

Definition. In MoE layer l the layer's output for token t is y_l(t) = sum_e w_le(t) * FFN_e(h_l(t)),
with w_le(t) the routing weight (softmax over the active experts' logits, then top-k, zero for
experts not chosen or masked; renormalised only if the layer renormalises). The contribution of
expert e is c_le(t) = w_le(t) * ||FFN_e(h_l(t))||_2, and the token's share of expert e is

    share_e(t) = sum_l c_le(t) / sum_l sum_e' c_le'(t)

so the shares of a token are >= 0 and sum to one (a token whose every contribution is 0 gets all
its share on the public expert). An opted-out (masked) expert has w = 0 everywhere, so its share
is exactly 0.

    attribute(model, ids)          -> shares (S, E) float32 for one sequence
    attribute_text(...)            -> tokens (strings) and shares
    write_html / write_heatmap     the page (tokens shaded by their largest owner share) and the PNG
"""
from __future__ import annotations

import html
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import FlexOlmoLM

# colours per expert index (public first): matplotlib tab10
_COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf"]


def routing_weights(moe, x_TD: torch.Tensor) -> torch.Tensor:
    """The layer's routing weights (T, E) float32, zero for experts not chosen (FlexMoE's rule)."""
    logits = x_TD.float() @ moe.router.weight.float().T
    bias = moe.effective_bias()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits.masked_fill(~moe.expert_mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    w, e = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        w = w / w.sum(-1, keepdim=True)
    if moe.mask_mode != "reroute":
        w = w * moe.expert_mask[e].float()
    return torch.zeros_like(probs).scatter_(-1, e, w)


def expert_outputs(moe, x_TD: torch.Tensor, experts) -> dict[int, torch.Tensor]:
    """{e: FFN_e(x) (T, D)} for the given expert indices."""
    ex = moe.experts
    return {e: F.silu(x_TD @ ex.gate_proj[e].T) * (x_TD @ ex.up_proj[e].T) @ ex.down_proj[e].T for e in experts}


@torch.no_grad()
def attribute(model: FlexOlmoLM, ids_S: torch.Tensor) -> torch.Tensor:
    """Per-token expert shares (S, E) float32 of a merged model on one token sequence (see the module doc)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("attribution needs a merged (MoE) model")
    if ids_S.dim() != 1 or ids_S.numel() < 1:
        raise ValueError("ids must be a non-empty 1-D tensor of token ids")
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach())) for m in layers]
    try:
        model(ids_S[None].to(layers[0].router.weight.device))
    finally:
        for h in hooks:
            h.remove()
    S, E = ids_S.numel(), layers[0].num_experts
    total = torch.zeros(S, E)
    for m, x in zip(layers, inputs):
        x_TD = x.reshape(-1, x.shape[-1])
        w_TE = routing_weights(m, x_TD)
        used = [int(e) for e in torch.nonzero(w_TE.sum(0) > 0).flatten()]
        for e, y in expert_outputs(m, x_TD, used).items():
            total[:, e] += (w_TE[:, e] * y.float().norm(dim=-1)).cpu()
    denom = total.sum(-1, keepdim=True)
    shares = torch.where(denom > 0, total / denom.clamp_min(1e-30), F.one_hot(torch.zeros(S, dtype=torch.long), E).float())
    return shares


def attribute_text(model: FlexOlmoLM, tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(token strings, shares (S, E)) of ``text`` (truncated to ``max_tokens``, default the model's seq_len)."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = enc.ids[: max_tokens or model.config.seq_len]
    if not ids:
        raise ValueError("the text has no tokens")
    toks = [tokenizer.decode([i]) for i in ids]
    return toks, attribute(model, torch.tensor(ids, dtype=torch.long))


def write_html(tokens: list[str], shares_SE: torch.Tensor, names: list[str], path, title: str = "") -> Path:
    """Tokens shaded by the expert with the largest share (opacity = that share); hover shows all shares."""
    from .checkpoint import atomic_path

    legend = " ".join(f'<span style="background:{_COLORS[e % 10]};color:white;padding:1px 4px">{html.escape(n)}</span>'
                      for e, n in enumerate(names))
    spans = []
    for tok, sh in zip(tokens, shares_SE.tolist()):
        e = max(range(len(sh)), key=sh.__getitem__)
        alpha = int(40 + 215 * sh[e])
        tip = ", ".join(f"{n} {s:.2f}" for n, s in zip(names, sh))
        spans.append(f'<span title="{html.escape(tip)}" style="background:{_COLORS[e % 10]}{alpha:02x}">'
                     f"{html.escape(tok).replace(chr(10), '&#x21b5;<br>')}</span>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h3>{html.escape(title)}</h3><p>largest share per token: {legend}</p>"
            f"<pre style='white-space:pre-wrap;font-size:14px'>{''.join(spans)}</pre>")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def write_heatmap(tokens: list[str], shares_SE: torch.Tensor, names: list[str], path, title: str = "") -> Path:
    """PNG: experts (rows) x tokens (columns), cell = share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_path

    S = len(tokens)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * S), 0.45 * len(names) + 1.4))
    im = ax.imshow(shares_SE.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(S), [t.replace("\n", "\\n")[:8] for t in tokens], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="share of the token's FFN output")
    ax.set_title(title, fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def demo_figures(model: FlexOlmoLM, names: list[str], tokenizer, corpora, out, cfg, tokens: int = 48) -> dict:
    """One heatmap + HTML page per domain (the start of its first held-out document), and the same
    text of the first owner domain with that owner opted out (its share must be 0)."""
    from .merge import mask_experts

    folder = Path(out) / "attribution"
    folder.mkdir(parents=True, exist_ok=True)
    res = {"definition": "share_e(t) = sum_l w_le(t)*||FFN_e(h_l(t))|| / sum_l sum_e' (same)", "domains": {}}
    for dom, docs in corpora.heldout.items():
        toks, sh = attribute_text(model, tokenizer, docs[0], tokens)
        title = f"{dom}: expert shares per token"
        write_heatmap(toks, sh, names, folder / f"{dom}.png", title)
        write_html(toks, sh, names, folder / f"{dom}.html", title)
        res["domains"][dom] = {"png": f"attribution/{dom}.png", "html": f"attribution/{dom}.html",
                               "mean_share": dict(zip(names, sh.mean(0).tolist()))}
    owner = next((n for n in names[1:] if n in corpora.heldout), None)
    if owner is not None:
        text = corpora.heldout[owner][0]
        mask_experts(model, [owner], names)
        try:
            toks, sh = attribute_text(model, tokenizer, text, tokens)
        finally:
            model.set_expert_mask(torch.ones(len(names), dtype=torch.bool))
        title = f"{owner} text with the {owner} expert opted out"
        write_heatmap(toks, sh, names, folder / f"{owner}_opted_out.png", title)
        write_html(toks, sh, names, folder / f"{owner}_opted_out.html", title)
        res["opt_out"] = {"removed": owner, "png": f"attribution/{owner}_opted_out.png",
                          "share_before": res["domains"][owner]["mean_share"][owner],
                          "share_after": float(sh[:, names.index(owner)].max())}
    return res


def attribute_dir(model_dir, text: str, out_prefix, *, opt_out=(), top_k: int | None = None,
                  device: str = "cpu", max_tokens: int | None = None) -> dict:
    """Attribute ``text`` with a model directory; writes OUT_PREFIX.html and OUT_PREFIX.png.

    Returns {"tokens", "names", "shares" (list of per-token lists), "html", "png", "mean_share"}."""
    from .checkpoint import TOKENIZER_FILE
    from .merge import load_model, mask_experts
    from .tokenizer import load_tokenizer

    model, names = load_model(model_dir, device)
    if not model.moe_layers():
        raise ValueError(f"{model_dir} is a dense model: every token comes from the public FFN")
    if opt_out:
        mask_experts(model, list(opt_out), names)
    if top_k is not None:
        model.set_top_k(top_k)
    toks, sh = attribute_text(model, load_tokenizer(Path(model_dir) / TOKENIZER_FILE), text, max_tokens)
    prefix = Path(out_prefix)
    title = f"expert shares per token ({Path(model_dir).name}" + (f", without {', '.join(opt_out)})" if opt_out else ")")
    h = write_html(toks, sh, names, prefix.with_name(prefix.name + ".html"), title)
    p = write_heatmap(toks, sh, names, prefix.with_name(prefix.name + ".png"), title)
    return {"tokens": toks, "names": names, "shares": sh.tolist(), "html": str(h), "png": str(p),
            "mean_share": dict(zip(names, sh.mean(0).tolist()))}


def routing_table(models: dict, names: list[str], tokenizer, heldout: dict[str, list[str]], docs: int = 4,
                  tokens: int = 48) -> dict:
    """{model label: {domain: {expert: mean share}}} over the first ``tokens`` tokens of the first
    ``docs`` held-out documents of each domain: where each model's FFN output comes from."""
    out = {}
    for label, model in models.items():
        out[label] = {}
        for dom, texts in heldout.items():
            shares = [attribute_text(model, tokenizer, t, tokens)[1] for t in texts[:docs]]
            out[label][dom] = dict(zip(names, torch.cat(shares).mean(0).tolist()))
    return out
