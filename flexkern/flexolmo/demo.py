"""The whole FlexOlmo story end to end on the six example domains (``flexkern demo``).

    corpora -> anchor (public = encyclopedia + literature) -> 4 owner experts (code, legal, math,
    scripture; each trained alone on its own data) -> merge -> router tuning on proxy data ->
    evaluation of every model and baseline on held-out data -> opt-out table -> report.md + PNGs

Every step writes its output atomically under ``out_dir`` and is skipped when that output is
already there, so an interrupted or repeated run only does what is missing (``force=True``
starts over). The default settings fit a 2-core CPU in about 10 minutes.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_public_embedding
from .baselines import expert_submodel, member_and_btm_losses, model_soup
from .data import DOMAINS, OWNER_DOMAINS, PUBLIC_DOMAINS, ensure_corpora, load_documents, split_documents
from .evaluate import average_loss, domain_losses, heldout_streams
from .merge import load_model, mask_experts, merge, opt_out
from .report import write_report
from .router_tuning import proxy_streams, tune_router
from .tokenizer import load_tokenizer


@dataclass
class DemoConfig:
    preset: str = "tiny"
    max_bytes: int = 300_000        # per domain (train + held-out)
    anchor_steps: int = 300
    expert_steps: int = 50
    batch_size: int = 8
    seq_len: int = 128
    anchor_lr: float = 3e-3
    expert_lr: float = 2e-3
    embed_docs: int = 32            # documents per domain embedding
    eval_tokens: int = 4096         # held-out tokens per domain
    rt_steps: int = 20              # router tuning
    rt_proxy_docs: int = 4          # public documents per owner in its proxy set
    rt_public_docs: int = 16        # plus this many public documents
    rt_lr: float = 2e-3
    headline_top_k: int = 2         # the "merged" row and opt-out base (= `flexkern merge` default)
    device: str = "cpu"
    embed_method: str = "minilm"
    seed: int = 0


def _say(log: bool, *msg) -> None:
    if log:
        print(*msg, flush=True)


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t0
        return _Ctx()


def _train_step_outputs(out: Path, cfg: DemoConfig, timer: _Timer, log: bool) -> tuple[Path, list[Path], Path]:
    from .train import train_anchor, train_expert

    anchor_dir = out / "anchor"
    common = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_bytes=cfg.max_bytes, device=cfg.device,
                  seed=cfg.seed, log=log, embed_docs=cfg.embed_docs)
    if not (anchor_dir / "config.json").exists():
        _say(log, f"== anchor: public data {', '.join(PUBLIC_DOMAINS)}, {cfg.anchor_steps} steps")
        with timer("anchor"):
            train_anchor(anchor_dir, preset=cfg.preset, data=PUBLIC_DOMAINS, steps=cfg.anchor_steps,
                         lr=cfg.anchor_lr, embed_method=cfg.embed_method, **common)
    else:
        _say(log, f"== anchor: {anchor_dir} exists, skipped")
    packages = []
    for domain in OWNER_DOMAINS:
        pkg = out / "experts" / f"{domain}.flexpert"
        if not (pkg / "manifest.json").exists():
            _say(log, f"== owner {domain}: trains its expert on its own data only, {cfg.expert_steps} steps")
            with timer(f"expert {domain}"):
                train_expert(anchor_dir, domain, pkg, name=domain, steps=cfg.expert_steps, lr=cfg.expert_lr,
                             **common)
        else:
            _say(log, f"== owner {domain}: {pkg} exists, skipped")
        packages.append(pkg)
    merged_dir = out / "merged"
    if not (merged_dir / "experts.json").exists():
        _say(log, "== merge: anchor + " + ", ".join(p.name for p in packages))
        with timer("merge"):
            merge(anchor_dir, packages, merged_dir, top_k=cfg.headline_top_k)
    return anchor_dir, packages, merged_dir


def _router_tuned(out: Path, anchor_dir: Path, merged_dir: Path, cfg: DemoConfig, tok, timer: _Timer,
                  log: bool) -> torch.nn.Module:
    """The merged model after router tuning (cached as rt_router.pt: only the router tensors)."""
    model, names = load_model(merged_dir, cfg.device)
    cache = out / "rt_router.pt"
    if cache.exists():
        state = torch.load(cache, map_location=cfg.device, weights_only=True)
        model.load_state_dict(state, strict=False)
        _say(log, f"== router tuning: {cache} exists, loaded")
        return model
    with timer("router tuning"):
        public = [d for src in PUBLIC_DOMAINS for d in split_documents(load_documents(src, cfg.max_bytes))[0]]
        owners = {n: split_documents(load_documents(n, cfg.max_bytes))[0] for n in names[1:]}
        _, method = read_public_embedding(anchor_dir)  # the embedder the router rows came from
        embedder = load_model(anchor_dir, cfg.device)[0] if method == "anchor" else None
        streams = proxy_streams(tok, public, owners, proxy_docs=cfg.rt_proxy_docs,
                                public_docs=cfg.rt_public_docs, embed_docs=cfg.embed_docs,
                                method=method, model=embedder, seed=cfg.seed)
        n_proxy = sum(int(s.numel()) for k, s in streams.items() if k != "public")
        _say(log, f"== router tuning: {cfg.rt_steps} steps on proxy sets ({n_proxy} tokens of public documents "
                  f"closest to each owner's domain embedding) + {int(streams['public'].numel())} public tokens")
        tune_router(model, streams, steps=cfg.rt_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                    lr=cfg.rt_lr, seed=cfg.seed, progress=log)
    state = {k: v for k, v in model.state_dict().items() if ".router." in k}
    tmp = cache.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(cache)
    return model


def _evaluate_all(out: Path, anchor_dir: Path, merged_dir: Path, cfg: DemoConfig, timer: _Timer,
                  log: bool) -> dict:
    tok = load_tokenizer(anchor_dir / "tokenizer.json")
    streams = heldout_streams(tok, DOMAINS, cfg.max_bytes, seed=0)
    L, T = cfg.seq_len, cfg.eval_tokens
    models: dict[str, dict[str, float]] = {}

    def run(label, model):
        with timer("evaluation"):
            models[label] = domain_losses(model, streams, L, T)
        _say(log, f"   {label:28s} avg loss {average_loss(models[label]):.3f}")

    _say(log, f"== evaluation: held-out loss on {', '.join(DOMAINS)} ({T} tokens each)")
    anchor, _ = load_model(anchor_dir, cfg.device)
    run("public model", anchor)
    merged, names = load_model(merged_dir, cfg.device)
    owners = {n: expert_submodel(merged, [0, j]) for j, n in enumerate(names) if j}
    with timer("evaluation"):
        per_owner = {n: {} for n in owners}
        btm = {}
        for d, s in streams.items():
            losses, btm[d] = member_and_btm_losses(owners, s, L, T)
            for n in owners:
                per_owner[n][d] = losses[n]
    for n in owners:
        models[f"{n} owner alone"] = per_owner[n]
        _say(log, f"   {n + ' owner alone':28s} avg loss {average_loss(per_owner[n]):.3f}")
    run("model soup", model_soup(merged, "owners"))
    run("model soup (dense FFN avg)", model_soup(merged, "dense"))
    models["BTM ensemble"] = btm
    _say(log, f"   {'BTM ensemble':28s} avg loss {average_loss(btm):.3f}")
    E = len(names)
    for k in range(1, E + 1):
        merged.set_top_k(k)
        run(f"FlexOlmo top-{k}" + (" (merged)" if k == cfg.headline_top_k else ""), merged)
    tuned = _router_tuned(out, anchor_dir, merged_dir, cfg, tok, timer, log)
    for k in sorted({cfg.headline_top_k, E}):
        tuned.set_top_k(k)
        run(f"FlexOlmo top-{k} + RT", tuned)

    # opt-out: mask each owner in turn on the headline model; one removal is also written as a real
    # checkpoint without the expert and must give the same outputs as the mask
    merged.set_top_k(cfg.headline_top_k)
    base_label = f"FlexOlmo top-{cfg.headline_top_k} (merged)"
    opt = {}
    _say(log, f"== opt-out: remove each owner's expert from '{base_label}'")
    for n in names[1:]:
        mask_experts(merged, [n], names)
        with timer("evaluation"):
            opt[n] = domain_losses(merged, streams, L, T)
        merged.set_expert_mask(torch.ones(E, dtype=torch.bool))
        d = n if n in DOMAINS else None
        if d:
            _say(log, f"   without {n:10s} {d} loss {models[base_label][d]:.3f} -> {opt[n][d]:.3f} "
                      f"(public model {models['public model'][d]:.3f})")
    check = _check_opt_out_checkpoint(out, merged_dir, merged, names, names[1], cfg)
    return {"models": models, "opt_out": opt, "opt_out_base": base_label, "opt_out_check": check}


@torch.no_grad()
def _check_opt_out_checkpoint(out: Path, merged_dir: Path, merged, names, name: str, cfg: DemoConfig) -> float:
    """Max |logit difference| between masking ``name`` and loading a checkpoint written without it."""
    path = out / f"merged_without_{name}"
    if not (path / "experts.json").exists():
        opt_out(merged_dir, name, path)
    removed, _ = load_model(path, cfg.device)
    removed.set_top_k(cfg.headline_top_k)
    ids = torch.randint(0, merged.config.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    mask_experts(merged, [name], names)
    diff = float((merged(ids) - removed(ids)).abs().max())
    merged.set_expert_mask(torch.ones(len(names), dtype=torch.bool))
    return diff


def _summary(results: dict) -> list[str]:
    m = results["models"]
    avg = {k: average_loss(v, results["domains"]) for k, v in m.items()}
    base = results["opt_out_base"]
    others = {k: v for k, v in avg.items() if "FlexOlmo" not in k}
    best_other = min(others, key=others.get)
    lines = [f"merged ({base}) average held-out loss {avg[base]:.3f}; best non-FlexOlmo model: "
             f"{best_other} {avg[best_other]:.3f}; public model {avg['public model']:.3f}"]
    beats = [k for k in others if avg[base] < avg[k]]
    lines.append(f"merged beats {len(beats)}/{len(others)} of: {', '.join(others)}")
    for n, losses in results["opt_out"].items():
        if n in results["domains"]:
            lines.append(f"opt-out {n}: {n} loss {m[base][n]:.3f} -> {losses[n]:.3f} "
                         f"(public {m['public model'][n]:.3f}); largest change elsewhere "
                         f"{max(abs(losses[d] - m[base][d]) for d in results['domains'] if d != n):.3f}")
    return lines


def run_demo(out_dir="runs/demo", preset: str = "tiny", *, install: bool = True, force: bool = False,
             log: bool = True, **overrides) -> dict:
    """Run (or finish) the demo in ``out_dir``; returns the results dict also saved as results.json.

    ``overrides``: any ``DemoConfig`` field (anchor_steps, expert_steps, max_bytes, eval_tokens, ...).
    """
    cfg = DemoConfig(preset=preset, **overrides)
    out = Path(out_dir)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "demo_config.json"
    if saved_cfg.exists() and json.loads(saved_cfg.read_text()) != dataclasses.asdict(cfg):
        raise ValueError(f"{out} holds a run with other settings ({saved_cfg}); use another out_dir or force=True")
    saved_cfg.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    timer = _Timer()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if install:
        with timer("install corpora"):
            ensure_corpora(quiet=not log)
    anchor_dir, _, merged_dir = _train_step_outputs(out, cfg, timer, log)
    results = {"domains": list(DOMAINS), "public_domains": list(PUBLIC_DOMAINS),
               "owner_domain": {d: d for d in OWNER_DOMAINS}, "config": dataclasses.asdict(cfg)}
    results.update(_evaluate_all(out, anchor_dir, merged_dir, cfg, timer, log))
    timer.timings["total (this invocation)"] = time.perf_counter() - t0
    results["timings"] = timer.timings
    results["notes"] = [
        f"Data: up to {cfg.max_bytes:,} bytes per domain, 10% of documents held out (deterministic split); "
        f"public model trained on {' + '.join(PUBLIC_DOMAINS)}; owners on one domain each.",
        "'X owner alone' is owner X's own 2-expert model [public FFN, X's FFN] exactly as trained.",
        "Model soup: uniform average of the owners' models; '(dense FFN avg)': the owners' FFNs averaged "
        "into one dense FFN. BTM: the owners' models' next-token distributions mixed per position with "
        "weights softmax(log-likelihood of the window so far).",
        f"RT: router tuning ({cfg.rt_steps} steps, router rows only, all experts active) on the "
        f"{cfg.rt_proxy_docs} public documents closest to each owner's domain embedding plus "
        f"{cfg.rt_public_docs} public documents. The public corpora here hold no code, legal, math or "
        "scripture text, so these proxy sets cannot show the router where an owner's expert helps; "
        "tuning on them mainly shifts tokens to the public expert.",
        f"Opt-out by masking; a checkpoint written without expert "
        f"'{OWNER_DOMAINS[0]}' gives the same logits (max |diff| {results['opt_out_check']:.2e}).",
    ]
    write_report(results, out, title="FlexOlmo demo: public model, 4 independent owners, merged")
    if log:
        print("\n".join(["", "== summary"] + _summary(results) + [f"report: {out / 'report.md'}"]), flush=True)
    return results
