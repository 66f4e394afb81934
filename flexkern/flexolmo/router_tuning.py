"""Router tuning (FlexOlmo "RT"): only the router rows (r_pub included) and biases train, on proxy
sets and public data, every expert active; the one implementation behind ``flexkern tune-router``
and ``flexkern demo``.

    proxy sets       per owner, the public documents an owner-vs-public classifier scores highest
                     (``proxy.rank_public`` then ``proxy.select_from_ranking``), at most
                     ``proxy_fraction`` of the owner's data, in score order ("ranked", the paper's)
                     or only those it puts on the owner's side ("thresholded"); the classifier is
                     fitted on the owner's side, only the chosen public documents leave it
    tuning data      {owner: its proxy set, "public": a seeded sample of public documents}; each step
                     draws every window from a uniformly chosen stream (so the proxy sets and the
                     public data weigh the same)
    tuning           cross-entropy + router z-loss, top_k = n (all experts active), AdamW; the
                     model's own top_k is restored afterwards (it is evaluated at the merged k)

No owner data is needed after the merge except for picking the proxy sets.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from ..nn import Z_LOSS_WEIGHT
from .defaults import DEMO
from .embed import embed_texts, minilm_available, minilm_embed, sample_documents
from .model import FlexOlmoLM, lm_loss
from .proxy import Ranking, proxy_budget, rank_public, select_from_ranking, selection_min_score
from .tokenizer import encode_documents


@dataclass
class RouterTuningConfig:
    steps: int = 20
    lr: float = 2e-3
    batch_size: int = 8
    seq_len: int | None = None     # default: the model's
    proxy_fraction: float = DEMO.rt_proxy_fraction  # a proxy set holds at most this share of its owner's bytes
    public_docs: int = 32          # public documents sampled beside the proxy sets
    owner_embed_docs: int = 32     # owner documents embedded for its classifier
    embed_max_tokens: int = 128    # tokens per document the classifier sees
    # "ranked": the top-scoring public documents (the paper's); "thresholded": only those the
    # classifier puts on the owner's side (proxy.PROXY_SELECTIONS)
    proxy_selection: str = DEMO.rt_proxy_selection
    seed: int = 0

    def __post_init__(self):
        selection_min_score(self.proxy_selection)  # a bad name fails here, not after the embeddings

    def to_dict(self) -> dict:
        return asdict(self)


def _classifier_embeddings(texts: list[str], cfg: RouterTuningConfig, fallback_model=None, tokenizer=None):
    """Features for the proxy classifier: MiniLM when installed, else the public model's hidden states."""
    if minilm_available():
        return minilm_embed(texts, max_tokens=cfg.embed_max_tokens)
    return embed_texts(texts, "anchor", fallback_model, tokenizer)


def owner_rankings(tokenizer, public: list[str], owners: dict[str, list[str]], cfg: RouterTuningConfig,
                   embedder=None) -> dict[str, Ranking]:
    """Per owner, its classifier's scores of every public document (fitted on a sample of its own
    documents; what any budget's selection starts from). ``embedder``: see ``tuning_streams``."""
    if not public:
        raise ValueError("router tuning needs public documents")
    public_emb = _classifier_embeddings(public, cfg, embedder, tokenizer)
    out = {}
    for name, docs in owners.items():
        if not docs:
            raise ValueError(f"owner {name!r} has no documents")
        own_emb = _classifier_embeddings(sample_documents(docs, cfg.owner_embed_docs, cfg.seed), cfg,
                                         embedder, tokenizer)
        out[name] = rank_public(own_emb, public_emb)
    return out


def tuning_streams(tokenizer, public: list[str], owners: dict[str, list[str]], cfg: RouterTuningConfig,
                   embedder=None, rankings: dict[str, Ranking] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Token streams {owner: its proxy set, "public": a public sample} and what was chosen.

    ``embedder``: a dense model for the classifier's features when MiniLM is not installed (the
    public model; ``baselines.expert_submodel(merged, [0])`` is exactly it).
    ``rankings``: ``owner_rankings`` of the same documents, to pick several budgets' sets from one fit.
    Returns (streams, info) with info[owner] = {"proxy_docs", "proxy_bytes", "budget_bytes",
    "classifier_train_accuracy", "proxy_indices"} (indices into ``public``).
    """
    if rankings is None:
        rankings = owner_rankings(tokenizer, public, owners, cfg, embedder)
    streams, info = {}, {}
    for name, docs in owners.items():
        idx = select_from_ranking(rankings[name], public, docs, cfg.proxy_fraction, cfg.proxy_selection)
        chosen = [public[i] for i in idx]
        streams[name] = encode_documents(tokenizer, chosen)
        info[name] = {"proxy_docs": len(chosen), "proxy_bytes": sum(len(d.encode()) for d in chosen),
                      "budget_bytes": proxy_budget(docs, cfg.proxy_fraction),
                      "classifier_train_accuracy": rankings[name].train_accuracy, "proxy_indices": idx}
    streams["public"] = encode_documents(tokenizer, sample_documents(public, cfg.public_docs, cfg.seed + 1))
    return streams, info


def run_router_tuning(model: FlexOlmoLM, tokenizer, public: list[str], owners: dict[str, list[str]],
                      cfg: RouterTuningConfig | None = None, embedder=None, progress: bool = True) -> dict:
    """Pick the proxy sets and tune ``model``'s router in place. Returns {"losses", "proxy", "config"}."""
    cfg = cfg or RouterTuningConfig()
    names = set(owners)
    if embedder is None and not minilm_available():
        from .baselines import expert_submodel
        embedder = expert_submodel(model, [0])
    streams, info = tuning_streams(tokenizer, public, owners, cfg, embedder)
    assert names <= set(streams)
    losses = tune_router_with(model, streams, cfg, progress)
    return {"losses": losses, "proxy": info, "config": cfg.to_dict()}


def tune_router_with(model: FlexOlmoLM, streams: dict[str, torch.Tensor], cfg: RouterTuningConfig,
                     progress: bool = True) -> list[float]:
    """``tune_router`` with ``cfg``'s steps, batch, window, lr and seed (the demo's RT, its sweep, tune-router)."""
    return tune_router(model, streams, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       lr=cfg.lr, seed=cfg.seed, progress=progress)


def proxy_streams(tokenizer, public: list[str], owners: dict[str, list[str]], proxy_docs: int = 4,
                  public_docs: int = 16, **_ignored) -> dict[str, torch.Tensor]:
    """Compatibility wrapper of ``tuning_streams`` (classifier-based proxy sets; proxy_docs is unused)."""
    return tuning_streams(tokenizer, public, owners, RouterTuningConfig(public_docs=public_docs))[0]


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


def tuning_data(owners: dict[str, str], public=None, max_bytes: int | None = None,
                public_share: float | None = None, heldout_fraction: float = 0.1,
                seed: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """(public documents, {owner: its documents}) for ``run_router_tuning`` from source names.

    ``public=None``: the demo's public mix (``data.build_corpora``: the public domains plus
    ``public_share`` of every owner domain); an owner whose source is a domain then gets that
    domain's closed documents. Otherwise the training splits of the named public sources and of
    each owner's source (a domain or a folder).
    """
    from .data import OWNER_DOMAINS, PUBLIC_SHARE, build_corpora, domain_split

    if public is None:
        share = PUBLIC_SHARE if public_share is None else public_share
        c = build_corpora(max_bytes, share, heldout_fraction=heldout_fraction, seed=seed)
        pub = c.public_docs()
        own = {n: c.owners[s] if s in OWNER_DOMAINS else domain_split(s, max_bytes, heldout_fraction, seed)[0]
               for n, s in owners.items()}
        return pub, own
    pub = [d for s in public for d in domain_split(s, max_bytes, heldout_fraction, seed)[0]]
    return pub, {n: domain_split(s, max_bytes, heldout_fraction, seed)[0] for n, s in owners.items()}
