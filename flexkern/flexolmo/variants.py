"""Variants of the demo's method: the extension, ablations and extra owner-training seeds.

    extension-balanced  the extension made two-sided: the same public-window term plus
                  softplus(r_pub.h - r_own.h - min(b_own, 0)) on windows of the owner's own data, so the
                  row is an explicit logistic classifier own-vs-public (the paper's App. D view of routing)
                  rather than a one-sided push down; still only public data and the owner's own.
    extension     during owner training, after every optimizer step, one more step on the owner's
                  router row and bias only: on a batch of *public* windows (public data, which every
                  owner has), a logistic loss softplus(r_own.h + min(b_own, 0) - r_pub.h) pushes the
                  owner's logit below the frozen public row's, so the row learns to lose off-domain.
                  The public expert and r_pub stay frozen (checked bit-identical before the package
                  is written) and the owner's private data stays private. Its own Adam state is
                  checkpointed with the run, so a resumed extension run equals an uninterrupted one.
    no-bias       the owner's bias is held at 0 during training (reset after every step).
    random-init   the owner's router row starts random (same norm as the domain embedding) instead
                  of the mean domain embedding (needs train_expert's own_row= keyword).
    bias-dropped  the base owners, merged with their biases set to 0 (what the released FlexOlmo
                  merge script does).
    no-coordination  each owner trains its FFN alone as a dense model (no frozen public expert beside
                  it, router not trained); the FFNs are merged afterwards with the domain-embedding rows.
    anchor-init   every router row (r_pub included) from the anchor's own mean hidden states instead
                  of the sentence embedder (the anchor re-saved with that public row: anchor_hidden/).
    rt-ceiling    diagnostics, not the method: the base merged model router-tuned on the owners'
                  *closed* data (which the method never may see; how good can a tuned router get?)
                  and for 10x the steps, on the proxy sets, on 10x larger ranked proxy sets and on
                  the closed data; plus the best single model per document chosen in hindsight (how
                  good are the experts?).
    proxy-sweep   router tuning with proxy sets of several budgets on every seed's merged model,
                  against no RT and BTM top-2 (proxy_sweep.py; a table and proxy_sweep.png).
    routing       evaluation only: the base models with renormalised top-k and with every expert, and
                  a linear probe of the router's input (can one token's h tell its domain? probe.py).
    seeds         the owners trained again with seeds 1..N-1 (merged and router-tuned each), for the
                  headline comparisons over seeds.

Every variant writes its own artifacts beside the base run (experts_<v>/, merged_<v>/,
merged_<v>_rt/) and adds rows to the report.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .tokenizer import encode_documents


class PublicRouterLoss:
    """The extension's step, as a ``train_expert`` callback(step, loss, model). Its Adam state is
    checkpointed with the owner's run (state_dict / load_state_dict), so a resumed run is exact."""

    def __init__(self, public_stream: torch.Tensor, weight: float, lr: float, batch_size: int, seq_len: int,
                 seed: int, own_stream: torch.Tensor | None = None):
        """``own_stream``: the owner's own tokens; given, the loss is two-sided (extension-balanced)."""
        for what, st in (("public", public_stream), ("own", own_stream)):
            if st is not None and (st.numel() - 1) // seq_len < 1:
                raise ValueError(f"the {what} stream is too short for one window")
        self.stream, self.own, self.weight, self.lr, self.batch_size, self.seq_len, self.seed = (
            public_stream, own_stream, weight, lr, batch_size, seq_len, seed)
        self.opt = None
        self._pending = None

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state.get("opt")

    def _optimizer(self, layers):
        if self.opt is None:
            params = [p for m in layers for p in (m.router.weight, m.router.bias)]
            self.opt = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.95))
            if self._pending is not None:
                self.opt.load_state_dict(self._pending)
                self._pending = None
        return self.opt

    def _router_inputs(self, model, layers, stream: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The router inputs h (T, D) of every MoE layer on a batch of windows of ``stream``."""
        L = self.seq_len
        idx = torch.randint(0, (stream.numel() - 1) // L, (self.batch_size,), generator=gen).tolist()
        ids = torch.stack([stream[i * L:(i + 1) * L] for i in idx]).to(layers[0].router.weight.device)
        h = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: h.append(args[0].detach().flatten(0, -2)))
                 for m in layers]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for hk in hooks:
                hk.remove()
        return h

    @staticmethod
    def _margins(layers, hs) -> list[torch.Tensor]:
        """r_own.h + min(b_own, 0) - r_pub.h per token, per layer."""
        out = []
        for m, h_TD in zip(layers, hs):
            logits_T2 = h_TD @ m.router.weight.T
            out.append(logits_T2[:, 1] + torch.clamp(m.router.bias[1], max=0) - logits_T2[:, 0])
        return out

    def __call__(self, step: int, loss: float, model) -> None:
        layers = model.moe_layers()
        opt = self._optimizer(layers)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        public = self._margins(layers, self._router_inputs(model, layers, self.stream, gen))
        total = sum(F.softplus(mg).mean() for mg in public)  # lose on public windows
        if self.own is not None:  # ... and win on the owner's own
            own = self._margins(layers, self._router_inputs(model, layers, self.own, gen))
            total = total + sum(F.softplus(-mg).mean() for mg in own)
        opt.zero_grad(set_to_none=True)
        (self.weight * total / len(layers)).backward()
        for m in layers:  # the public expert's row and bias stay exactly as they are
            m.router.weight.grad[0].zero_()
            m.router.bias.grad[0].zero_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m in layers:
                m.router.bias.clamp_(max=0.0)



def zero_bias_callback(step: int, loss: float, model) -> None:
    """no-bias ablation: the owner's bias stays 0 (so min(b, 0) contributes nothing)."""
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.bias.zero_()


def _random_row(anchor_dir, cfg, seed: int) -> torch.Tensor:
    from .checkpoint import read_public_embedding
    row, _ = read_public_embedding(anchor_dir)
    g = torch.Generator().manual_seed(10_000 + seed)
    r = torch.randn(row.shape, generator=g)
    return r / r.norm() * row.norm()


def owner_training_options(variant: str | None, corpora, anchor_dir, cfg, seed: int, domain: str = "") -> dict:
    """Extra ``train_expert`` keywords for a variant's owners (``domain``: the owner's)."""
    if variant in (None, "seeds", "bias-dropped", "anchor-init"):
        return {}
    if variant == "no-coordination":
        return {"dense_ffn": True}
    if variant == "no-bias":
        return {"callback": zero_bias_callback}
    if variant in ("extension", "extension-balanced"):
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(anchor_dir / "tokenizer.json")
        stream = encode_documents(tok, corpora.public_docs())
        own = encode_documents(tok, corpora.owners[domain]) if variant == "extension-balanced" else None
        return {"callback": PublicRouterLoss(stream, cfg.ext_weight, cfg.expert_lr, max(1, cfg.batch_size // 2),
                                             cfg.seq_len, seed, own_stream=own)}
    if variant == "random-init":
        from .train import train_expert
        if "own_row" not in inspect.signature(train_expert).parameters:
            raise NotImplementedError("random-init needs train_expert(own_row=...)")
        return {"own_row": _random_row(anchor_dir, cfg, seed)}
    raise ValueError(f"unknown variant {variant!r}")


@torch.no_grad()
def drop_router_bias(model_dir) -> None:
    """Rewrite a merged model directory with every router bias set to 0 (kept: eval_settings.json)."""
    from .checkpoint import TOKENIZER_FILE, read_json, read_public_embedding, write_model_dir
    from .merge import load_model

    model, _ = load_model(model_dir)
    for m in model.moe_layers():
        m.router.bias.zero_()
    row, method = read_public_embedding(model_dir)
    info = read_json(model_dir / "experts.json")
    import shutil
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / TOKENIZER_FILE
        shutil.copyfile(Path(model_dir) / TOKENIZER_FILE, tok)
        write_model_dir(model_dir, model, tok, row, method, info, overwrite=True)


@torch.no_grad()
def hidden_state_anchor(anchor_dir, out_dir, docs: list[str], num_docs: int):
    """The anchor re-saved in ``out_dir`` with its public row from its own mean hidden states (the
    anchor-init variant); the weights, and so the anchor fingerprint, are unchanged."""
    from pathlib import Path

    from .checkpoint import TOKENIZER_FILE, write_model_dir
    from .merge import load_model
    from .tokenizer import load_tokenizer
    from .train import _embedding

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    anchor, _ = load_model(anchor_dir)
    anchor.eval()
    tok = load_tokenizer(Path(anchor_dir) / TOKENIZER_FILE)
    row = _embedding(docs, "anchor", anchor, tok, anchor.config.d_model, num_docs)
    write_model_dir(out_dir, anchor, Path(anchor_dir) / TOKENIZER_FILE, row, "anchor")
    return out_dir


def hindsight_best(members: list[dict]) -> dict:
    """Scores of the best member per unit (document, or mixed window), chosen in hindsight: an
    optimistic bound on any method that picks one model per document."""
    out = {}
    for s, groups in members[0].items():
        out[s] = {}
        for g in groups:
            sums = torch.stack([m[s][g][0] for m in members])
            counts = members[0][s][g][1]
            best = (sums / counts).argmin(0)
            out[s][g] = (sums.gather(0, best[None]).squeeze(0), counts)
    return out


LABELS = {"extension": "extension (public-router loss)", "no-bias": "no router bias",
          "extension-balanced": "extension, two-sided (own vs public)",
          "random-init": "random router init", "bias-dropped": "bias dropped at merge",
          "no-coordination": "no coordinated training", "anchor-init": "router rows from anchor hidden states"}
ORACLE = "oracle: best single model per document (hindsight)"


def variant_label(variant: str, top_k: int, tuned: bool) -> str:
    """The report row of an owner-training variant's merged model, without or with RT."""
    return f"{LABELS[variant]}: top-{top_k} " + ("+ RT" if tuned else "(no RT)")


def closed_rt_label(top_k: int) -> str:
    """The rt-ceiling row of router tuning on the owners' closed data (default steps)."""
    return f"diagnostic: RT on the owners' closed data (not private), top-{top_k}"


def variant_stage(variant: str, st: dict):
    """Train/merge/tune what ``variant`` needs now; returns (evaluate(ev), {row label: variant})."""
    out, cfg, log, timer = st["out"], st["cfg"], st["log"], st["timer"]
    h = cfg.headline_top_k
    if variant == "seeds":
        runs = []
        for s in range(1, cfg.seeds):
            pk = st["experts"](out, st["anchor_dir"], cfg, st["corpora"], timer, log, folder=f"experts_seed{s}",
                               seed=s)
            md = st["merged"](out, st["anchor_dir"], pk, cfg, timer, log, name=f"merged_seed{s}")
            runs.append((s, md, st["router_tuned"](out, md, st["streams"], cfg, timer, log)))

        def evaluate_seeds(ev):
            from .eval_suite import seeds_paired
            from .merge import load_model
            headline, base = f"FlexOlmo top-{h} + RT", f"FlexOlmo top-{h} (no RT)"
            per = {"rt": [ev.scores[headline]], "nort": [ev.scores[base]], "btm2": [ev.scores["BTM top-2"]],
                   "public": [ev.scores["public model"]]}
            for s, md, rt in runs:
                merged, names = load_model(md, cfg.device)
                ev.add(f"seed {s}: {base}", merged)
                st["owners_and_btm"](ev, merged, names, prefix=f"seed {s}: ")
                tuned, _ = load_model(rt, cfg.device)
                ev.add(f"seed {s}: {headline}", tuned)
                per["rt"].append(ev.scores[f"seed {s}: {headline}"])
                per["nort"].append(ev.scores[f"seed {s}: {base}"])
                per["btm2"].append(ev.scores[f"seed {s}: BTM top-2"])
                per["public"].append(ev.scores["public model"])
            ev.seed_comparisons = [
                {"a": headline, "b": b_label, "set": set_name, "seeds": cfg.seeds,
                 **seeds_paired(per["rt"], per[key], ev.boot, set_name)}
                for key, b_label in (("btm2", "BTM top-2"), ("nort", base), ("public", "public model"))
                for set_name in ev.sets]
        return evaluate_seeds, {}

    if variant == "rt-ceiling":
        return _rt_ceiling_stage(st)
    if variant == "routing":
        return _routing_stage(st)
    if variant == "proxy-sweep":
        from .proxy_sweep import proxy_sweep_stage
        return proxy_sweep_stage(st)
    anchor_dir = st["anchor_dir"]
    if variant == "anchor-init":
        with timer("anchor_hidden (anchor-init)"):
            anchor_dir = hidden_state_anchor(anchor_dir, out / "anchor_hidden", st["corpora"].public_docs(),
                                             cfg.embed_docs)
    if variant == "bias-dropped":
        pk = [out / "experts" / f"{d}.flexpert" for d in st["corpora"].owners]
    else:
        pk = st["experts"](out, anchor_dir, cfg, st["corpora"], timer, log, folder=f"experts_{variant}",
                           variant=variant)
    md = st["merged"](out, anchor_dir, pk, cfg, timer, log, name=f"merged_{variant}",
                      drop_bias=variant == "bias-dropped")
    rt = st["router_tuned"](out, md, st["streams"], cfg, timer, log)
    rows = {variant_label(variant, h, False): variant, variant_label(variant, h, True): variant}

    def evaluate_variant(ev):
        from .merge import load_model
        merged, _ = load_model(md, cfg.device)
        ev.add(variant_label(variant, h, False), merged)
        tuned, _ = load_model(rt, cfg.device)
        ev.add(variant_label(variant, h, True), tuned)
    return evaluate_variant, rows


def _rt_ceiling_stage(st: dict):
    """rt-ceiling (module docstring): four more router tunings of the base merged model."""
    import dataclasses

    from .tokenizer import load_tokenizer

    out, cfg, log, timer = st["out"], st["cfg"], st["log"], st["timer"]
    h = cfg.headline_top_k
    tok = load_tokenizer(st["anchor_dir"] / "tokenizer.json")
    owners = st["corpora"].owners
    closed = {d: encode_documents(tok, docs) for d, docs in owners.items()}
    closed["public"] = st["streams"]["public"]
    long_cfg = dataclasses.replace(cfg, rt_steps=10 * cfg.rt_steps)
    base = out / "merged"
    wide = _wide_proxy_streams(out, tok, st["corpora"], cfg, timer)
    tuned = {
        closed_rt_label(h):
            st["router_tuned"](out, base, closed, cfg, timer, log, name="diag_rt_closed"),
        f"diagnostic: RT for {long_cfg.rt_steps} steps on the proxy sets, top-{h}":
            st["router_tuned"](out, base, st["streams"], long_cfg, timer, log, name="diag_rt_long"),
        f"diagnostic: RT for {long_cfg.rt_steps} steps on the closed data (not private), top-{h}":
            st["router_tuned"](out, base, closed, long_cfg, timer, log, name="diag_rt_closed_long"),
        wide_label(long_cfg.rt_steps, wide_fraction(cfg), h):
            st["router_tuned"](out, base, wide, long_cfg, timer, log, name="diag_rt_wide_proxy"),
    }

    def evaluate(ev):
        from .merge import load_model
        members = [ev.scores["public model"]] + [ev.scores[f"{n} owner alone"] for n in owners]
        ev.add(ORACLE, scores=hindsight_best(members))
        for label, path in tuned.items():
            ev.add(label, load_model(path, cfg.device)[0])
    return evaluate, {ORACLE: "rt-ceiling", **{label: "rt-ceiling" for label in tuned}}


WIDE_PROXY = 10  # the rt-ceiling's larger proxy sets: 10x the run's budget (at most all), ranked


def wide_fraction(cfg) -> float:
    return min(1.0, WIDE_PROXY * cfg.rt_proxy_fraction)


def wide_label(steps: int, fraction: float, top_k: int) -> str:
    """The rt-ceiling row of router tuning on the larger ranked proxy sets."""
    return (f"diagnostic: RT for {steps} steps on {WIDE_PROXY}x larger ranked proxy sets ({fraction:.0%} of the "
            f"owner's bytes), top-{top_k}")


def _wide_proxy_streams(out, tok, corpora, cfg, timer) -> dict:
    """Proxy sets picked as the method's, ranked, with a 10x budget (cached in diag_wide_proxy.pt)."""
    import dataclasses

    from .checkpoint import atomic_path
    from .router_tuning import tuning_streams

    cache = out / "diag_wide_proxy.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    from .demo import rt_config
    with timer("proxy sets (diag_wide_proxy)"):
        # ranked whatever the run's selection: thresholded, every owner here gets its single top
        # document, whatever the budget
        c = dataclasses.replace(rt_config(cfg), proxy_fraction=wide_fraction(cfg), proxy_selection="ranked")
        streams, _ = tuning_streams(tok, corpora.public_docs(), corpora.owners, c)
    with atomic_path(cache) as tmp:
        torch.save(streams, tmp)
    return streams


def routing_labels(top_k: int, num_experts: int) -> list[str]:
    """The routing rows, in the order ``routing_rows`` scores them."""
    return [f"FlexOlmo top-{k} {how} {tag}" for tag in ("(no RT)", "+ RT")
            for k, how in ((top_k, "renormalised"), (num_experts, "(all experts)"))]


def routing_rows(merged, tuned, top_k: int, add) -> None:
    """Evaluation-only routing ablations: ``add(label, model)`` for the merged model without and
    with RT at renormalised top-k and with every expert active (the models are restored after)."""
    labels = iter(routing_labels(top_k, merged.moe_layers()[0].num_experts))
    for model in (merged, tuned):
        model.set_top_k(top_k)
        for m in model.moe_layers():
            m.renormalize = True
        add(next(labels), model)
        for m in model.moe_layers():
            m.renormalize = False
        model.set_top_k(model.moe_layers()[0].num_experts)
        add(next(labels), model)
        model.set_top_k(top_k)


def _routing_stage(st: dict):
    out, cfg = st["out"], st["cfg"]
    h = cfg.headline_top_k
    labels = routing_labels(h, len(st["corpora"].owners) + 1)

    def evaluate(ev):
        from .merge import load_model
        merged, _ = load_model(out / "merged", cfg.device)
        tuned, _ = load_model(out / "merged_rt", cfg.device)
        routing_rows(merged, tuned, h, ev.add)
        from .probe import domain_probe
        from .tokenizer import load_tokenizer
        docs = {d: v for d, v in st["corpora"].heldout.items() if len(v) >= 2}  # the split is by document
        with ev.timer("domain probe"):
            try:
                ev.extra_results["probe"] = {
                    "model": f"FlexOlmo top-{h} (no RT)",
                    **domain_probe(merged, load_tokenizer(out / "merged" / "tokenizer.json"), docs, cfg.seq_len,
                                   tokens_per_domain=cfg.eval_tokens)}
            except ValueError as exc:  # too little held-out text (tiny settings): say so in the report
                ev.extra_results["probe"] = {"model": f"FlexOlmo top-{h} (no RT)", "skipped": str(exc)}
    return evaluate, {label: "routing" for label in labels}


def routing_ablations(run_dir, device: str = "cpu") -> dict:
    """Evaluation-only ablations of a finished demo run's merged models (no training): every expert
    active (top-n) and top-k with the kept weights renormalised to sum to one (owners trained with
    top-2 of 2, whose weights always sum to one; top-2 of n without renormalising scales their FFN
    output down). Same sets and bootstrap replicates as the run's report; differences are paired
    against the report's headline model. Returns {"rows": {label: summary}, "paired": {label: {set: diff}}}.
    """
    import json
    from pathlib import Path

    from .data import DOMAINS, build_corpora
    from .eval_suite import Bootstrap, EvalSettings, build_eval_sets, load_settings, score_model
    from .merge import load_model
    from .tokenizer import load_tokenizer

    run = Path(run_dir)
    cfg = json.loads((run / "demo_config.json").read_text())
    settings = load_settings(run / "merged_rt") or EvalSettings()
    corpora = build_corpora(cfg["max_bytes"], cfg["public_share"], seed=0)
    tok = load_tokenizer(run / "anchor" / "tokenizer.json")
    sets = build_eval_sets(tok, {d: corpora.heldout[d] for d in DOMAINS}, settings)
    h = cfg["headline_top_k"]
    merged, _ = load_model(run / "merged", device)
    tuned, _ = load_model(run / "merged_rt", device)
    merged.set_top_k(h)
    tuned.set_top_k(h)
    scores = {f"FlexOlmo top-{h} + RT": score_model(tuned, sets, settings.batch_size),
              f"FlexOlmo top-{h} (no RT)": score_model(merged, sets, settings.batch_size)}
    routing_rows(merged, tuned, h, lambda label, m: scores.update({label: score_model(m, sets, settings.batch_size)}))
    head = f"FlexOlmo top-{h} + RT"
    boot = Bootstrap(scores[head], settings.bootstrap, settings.bootstrap_seed)
    return {"rows": {k: boot.summarize(v) for k, v in scores.items()},
            "paired": {k: {s: boot.paired(v, scores[head], s) for s in sets} for k, v in scores.items() if k != head}}
