"""Optional router tuning (FlexOlmo "RT"): only the router rows and biases train, all experts active.

Each owner contributes a small *proxy set*: the public documents closest to its domain embedding
(the paper trains a classifier for this; cosine similarity to the mean domain embedding is the
dependency-free stand-in). Tuning then runs a few steps of cross-entropy + router z-loss on the
proxy sets plus a slice of public data, sampled uniformly, with every expert active (top_k = n),
so no owner data is needed after the merge.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .embed import domain_embedding, embed_texts, sample_documents
from .model import FlexOlmoLM, lm_loss
from .tokenizer import encode_documents

Z_LOSS_WEIGHT = 1e-3


def select_proxy_documents(candidates: list[str], candidate_emb_ND: torch.Tensor, domain_emb_D: torch.Tensor,
                           num_docs: int) -> list[str]:
    """The ``num_docs`` candidates whose embeddings have the highest cosine to ``domain_emb_D``."""
    if candidate_emb_ND.shape[0] != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {candidate_emb_ND.shape[0]} embeddings")
    if candidate_emb_ND.shape[-1] != domain_emb_D.shape[-1]:
        raise ValueError(f"embedding widths differ: {candidate_emb_ND.shape[-1]} vs {domain_emb_D.shape[-1]}")
    if num_docs < 1:
        raise ValueError(f"num_docs must be positive, got {num_docs}")
    cos_N = F.normalize(candidate_emb_ND.float(), dim=-1) @ F.normalize(domain_emb_D.float(), dim=0)
    top = torch.topk(cos_N, min(num_docs, len(candidates))).indices.sort().values
    return [candidates[i] for i in top.tolist()]


def proxy_streams(tokenizer, public: list[str], owners: dict[str, list[str]], proxy_docs: int = 4,
                  public_docs: int = 16, candidates: int = 96, embed_docs: int = 48, method: str = "minilm",
                  model=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token streams for router tuning: {owner: its proxy set, "public": a public sample}.

    A seeded sample of ``candidates`` public documents is embedded once; each owner's proxy set is
    the ``proxy_docs`` of them closest to the mean embedding of ``embed_docs`` of its documents
    (computed on the owner's side; only the chosen public documents leave it).
    """
    if not public:
        raise ValueError("router tuning needs public documents")
    pool = sample_documents(public, candidates, seed)
    pool_emb = embed_texts(pool, method, model, tokenizer)
    out = {}
    for name, docs in owners.items():
        dom = domain_embedding(docs, method, model, tokenizer, num_docs=embed_docs, seed=seed)
        out[name] = encode_documents(tokenizer, select_proxy_documents(pool, pool_emb, dom, proxy_docs))
    out["public"] = encode_documents(tokenizer, sample_documents(public, public_docs, seed + 1))
    return out


def _router_params(model: FlexOlmoLM) -> list[torch.nn.Parameter]:
    params = []
    for m in model.moe_layers():
        params.append(m.router.weight)
        if m.router.bias is not None:
            params.append(m.router.bias)
    return params


def _sample_batch(streams: list[torch.Tensor], batch_size: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    rows = []
    for _ in range(batch_size):
        s = streams[rng.randrange(len(streams))]
        start = rng.randrange(max(1, s.numel() - seq_len - 1))
        rows.append(s[start:start + seq_len + 1])
    n = min(r.numel() for r in rows)
    return torch.stack([r[:n] for r in rows])


def tune_router(model: FlexOlmoLM, streams: dict[str, torch.Tensor], steps: int = 50, batch_size: int = 8,
                seq_len: int | None = None, lr: float = 2e-3, z_loss_weight: float = Z_LOSS_WEIGHT,
                seed: int = 0, progress: bool = True) -> list[float]:
    """Tune the router rows/biases of ``model`` in place on token ``streams`` (proxy sets + public).

    Every other tensor keeps its value bit for bit. top_k is n during tuning and restored after.
    Returns the training loss per step.
    """
    layers = model.moe_layers()
    if not layers:
        raise ValueError("router tuning needs a merged (MoE) model")
    streams_l = [s for s in streams.values() if s.numel() >= 3]
    if not streams_l:
        raise ValueError("router tuning needs at least one non-empty token stream")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    seq_len = model.config.seq_len if seq_len is None else min(seq_len, model.config.seq_len)
    device = next(model.parameters()).device
    router = _router_params(model)
    router_ids = {id(p) for p in router}
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_frozen = [m.expert_frozen.clone() for m in layers]
    saved_k = layers[0].top_k
    for p in model.parameters():
        p.requires_grad_(id(p) in router_ids)
    for m in layers:
        m.expert_frozen.zero_()  # frozen experts would also freeze their router rows
    model.set_top_k(layers[0].num_experts)
    opt = torch.optim.AdamW(router, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="router tuning", leave=False)
    model.train()
    try:
        for step in range(steps):
            ids_BS = _sample_batch(streams_l, batch_size, seq_len, rng).to(device)
            loss = lm_loss(model, ids_BS)
            total = loss + z_loss_weight * model.router_z_loss()
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(router, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n])
        for m, f in zip(layers, saved_frozen):
            m.expert_frozen.copy_(f)
        model.set_top_k(saved_k)
    return losses
