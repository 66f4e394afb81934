"""Domain probe: does the router's input h say which domain a token is from?

The merged FlexOlmo model routes per token with a linear router on the residual stream h entering
each FFN; BTM weights owners by the likelihood of the whole context. ``domain_probe`` measures how
much domain information each has: per layer, a multinomial logistic regression on h of one token
(what a per-token router sees) and on the causal running mean of h over the window so far (context
evidence a sequence-level method can use), both scored on held-out documents.

Split: each domain's documents are shuffled (seeded) and halved; each half becomes its own token
stream (doc EOS doc EOS ...) cut into windows of seq_len, so no document, hence no window, is in
both train and test.

Shapes: N windows, S seq_len, T tokens (N*S), D d_model, C domains, L layers.
Deterministic: same inputs, seed and thread count give the same numbers (seeded generator, zero
init, full-batch LBFGS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import encode_documents


@dataclass(frozen=True)
class ProbeWindows:
    windows_NS: torch.Tensor  # int64 token ids
    domain_N: torch.Tensor    # int64 domain index of each window
    test_N: torch.Tensor      # bool: window is in the test half
    doc_NS: torch.Tensor      # int64 document index (within its domain) of each token
    domains: tuple[str, ...]


def probe_windows(tokenizer, docs_by_domain: dict[str, list[str]], seq_len: int,
                  tokens_per_domain: int = 4096, seed: int = 0) -> ProbeWindows:
    """Windows of each domain's train and test halves (split by document), up to
    ``tokens_per_domain // 2`` tokens per half."""
    if not isinstance(docs_by_domain, dict) or len(docs_by_domain) < 2:
        raise ValueError("docs_by_domain must be a dict of at least two domains")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(tokens_per_domain, int) or tokens_per_domain < 2 * seq_len:
        raise ValueError(f"tokens_per_domain must be an int >= 2 * seq_len = {2 * seq_len}, got {tokens_per_domain!r}")
    gen = torch.Generator().manual_seed(seed)
    want = tokens_per_domain // (2 * seq_len)
    rows, doms, tests, docs_of = [], [], [], []
    for c, (dom, docs) in enumerate(docs_by_domain.items()):
        if isinstance(docs, str) or len(docs) < 2:
            raise ValueError(f"domain {dom!r} needs a list of at least two documents (the split is by document)")
        perm = torch.randperm(len(docs), generator=gen).tolist()
        half = len(docs) // 2
        for is_test, idx in ((False, perm[:half]), (True, perm[half:])):
            parts = [encode_documents(tokenizer, [docs[i]]) for i in idx]
            stream = torch.cat(parts)
            doc_of = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in zip(idx, parts)])
            n = min(want, stream.numel() // seq_len)
            if n < 1:
                raise ValueError(f"the {'test' if is_test else 'train'} half of domain {dom!r} has "
                                 f"{stream.numel()} tokens, fewer than one window of {seq_len}")
            rows.append(stream[:n * seq_len].view(n, seq_len))
            docs_of.append(doc_of[:n * seq_len].view(n, seq_len))
            doms.append(torch.full((n,), c, dtype=torch.long))
            tests.append(torch.full((n,), is_test, dtype=torch.bool))
    return ProbeWindows(torch.cat(rows), torch.cat(doms), torch.cat(tests), torch.cat(docs_of),
                        tuple(docs_by_domain))


@torch.no_grad()
def ffn_inputs(model: nn.Module, windows_NS: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """The FFN input h (N, S, D) float32 on the CPU of every block (MoE or dense): the router's input."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [b.ffn.register_forward_pre_hook(lambda m, args, i=i: captured[i].append(args[0].float().cpu()))
             for i, b in enumerate(model.blocks)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for s in range(0, windows_NS.shape[0], batch_size):
            model.hidden_states(windows_NS[s:s + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [torch.cat(c) for c in captured]


def fit_probe(x_train_TD, y_train_T, x_test_TD, y_test_T, num_classes: int, steps: int = 300,
              l2: float = 1e-3) -> dict:
    """Multinomial logistic regression (standardised features, L2 ``l2``, full-batch LBFGS from zero);
    test accuracy and macro-averaged (per-class mean) accuracy."""
    mean, std = x_train_TD.mean(0), x_train_TD.std(0).clamp_min(1e-6)
    xtr, xte = (x_train_TD - mean) / std, (x_test_TD - mean) / std
    W = torch.zeros(xtr.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, y_train_T) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ W + b).argmax(1)
    return {"acc": float((pred == y_test_T).float().mean()), "macro": _macro(pred, y_test_T, num_classes)}


def _macro(pred_T, y_T, num_classes):
    per = [float((pred_T[y_T == c] == c).float().mean()) for c in range(num_classes) if (y_T == c).any()]
    return sum(per) / len(per)


def domain_probe(model, tokenizer, docs_by_domain: dict[str, list[str]], seq_len: int,
                 tokens_per_domain: int = 4096, seed: int = 0, steps: int = 300) -> dict:
    """Per-layer test accuracy of a per-token and a context-mean (causal running mean of h) domain
    probe on the FFN input h; JSON-able. ``chance`` is the majority-class test accuracy,
    ``chance_macro`` 1 / C."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 <= seq_len <= model.config.seq_len:
        raise ValueError(f"seq_len must be an int in [1, model seq_len={model.config.seq_len}], got {seq_len!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    pw = probe_windows(tokenizer, docs_by_domain, seq_len, tokens_per_domain, seed)
    C, (N, S) = len(pw.domains), pw.windows_NS.shape
    y_T = pw.domain_N[:, None].expand(N, S).reshape(-1)
    test_T = pw.test_N[:, None].expand(N, S).reshape(-1)
    y_tr, y_te = y_T[~test_T], y_T[test_T]
    counts = torch.bincount(y_te, minlength=C)
    layers = []
    for i, h_NSD in enumerate(ffn_inputs(model, pw.windows_NS)):
        ctx_NSD = h_NSD.cumsum(1) / torch.arange(1, S + 1, dtype=h_NSD.dtype)[None, :, None]
        row = {"layer": i}
        for name, x in (("token", h_NSD), ("context", ctx_NSD)):
            x_TD = x.reshape(N * S, -1)
            r = fit_probe(x_TD[~test_T], y_tr, x_TD[test_T], y_te, C, steps)
            row[f"{name}_acc"], row[f"{name}_macro"] = r["acc"], r["macro"]
        layers.append(row)
    return {
        "layers": layers,
        "chance": float(counts.max()) / float(counts.sum()),
        "chance_macro": 1.0 / C,
        "domains": list(pw.domains),
        "seq_len": S,
        "tokens": {"train": int((~test_T).sum()), "test": int(test_T.sum()),
                   "test_per_domain": {d: int(counts[c]) for c, d in enumerate(pw.domains)}},
    }


def probe_table(result: dict) -> list[str]:
    """Markdown lines: one row per layer, accuracies in percent, chance in the header line."""
    t = result["tokens"]
    lines = [f"Domain probe on the FFN input h ({len(result['domains'])} domains: {', '.join(result['domains'])}; "
             f"{t['train']} train / {t['test']} test tokens, split by document; chance "
             f"{100 * result['chance']:.1f}% (macro {100 * result['chance_macro']:.1f}%))", "",
             "| layer | per-token acc | per-token macro | context-mean acc | context-mean macro |",
             "|---:|---:|---:|---:|---:|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {100 * r['token_acc']:.1f}% | {100 * r['token_macro']:.1f}% | "
                     f"{100 * r['context_acc']:.1f}% | {100 * r['context_macro']:.1f}% |")
    return lines
