"""How large should a proxy set be? Router tuning over proxy budgets (``flexkern demo --variant proxy-sweep``).

    points       ranked proxy sets (the method's selection) of SWEEP_FRACTIONS of each owner's bytes
                 (and of the run's own budget), plus the thresholded selection at the run's budget
    per point    the proxy sets picked from one classifier fit per owner (``router_tuning.owner_rankings``),
                 then every owner-training seed's merged model router-tuned exactly as the demo's RT
                 (``router_tuning.tune_router_with``: same steps, lr, public sample and seed), so the point
                 at the run's own budget and selection reproduces the run's RT rows
    evaluation   the demo's suite (held-out, short-context, mixed-domain); per point and set the mean loss
                 over seeds and, over seeds (two-level bootstrap, ``eval_suite.seeds_paired``), the
                 differences with each seed's merged model without RT, its BTM top-2 and the run's RT
    output       results.json["proxy_sweep"], a report section (``sweep_section``), proxy_sweep.png; the
                 tuned routers are cached in proxy_sweep.pt, so a rerun only evaluates

The seeds are the demo's (``--seeds N``: merged/, merged_seed1/, ...; trained here when missing),
so the sweep costs one router tuning and one evaluation per point and seed, not any training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

SWEEP_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # of each owner's bytes
CACHE = "proxy_sweep.pt"
PLOT = "proxy_sweep.png"


@dataclass(frozen=True)
class Point:
    selection: str   # proxy.PROXY_SELECTIONS
    fraction: float  # budget: share of the owner's bytes

    @property
    def key(self) -> str:
        return f"{self.selection}@{self.fraction:g}"

    @property
    def label(self) -> str:
        return f"{self.selection} {self.fraction:.1%}"


def sweep_points(cfg) -> list[Point]:
    """Ranked at every budget of the grid and the run's, then thresholded at the run's budget."""
    fractions = sorted(set(SWEEP_FRACTIONS) | {cfg.rt_proxy_fraction})
    return [Point("ranked", f) for f in fractions] + [Point("thresholded", cfg.rt_proxy_fraction)]


def run_point(cfg) -> Point:
    return Point(cfg.rt_proxy_selection, cfg.rt_proxy_fraction)


def seed_label(row: str, seed: int) -> str:
    """A demo row of owner-training seed ``seed`` (seed 0 is the base run: no prefix)."""
    return row if seed == 0 else f"seed {seed}: {row}"


def router_state(model) -> dict[str, torch.Tensor]:
    """The router rows and biases of every MoE layer (all that router tuning changes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".router." in k}


@torch.no_grad()
def set_router(model, state: dict[str, torch.Tensor]) -> None:
    params, expected = dict(model.named_parameters()), set(router_state(model))
    if set(state) != expected:
        raise ValueError("the cached router does not fit this model: " + ", ".join(sorted(set(state) ^ expected)))
    for k, v in state.items():
        params[k].copy_(v)


def _count(xs: list[str]) -> dict[str, int]:
    return {x: xs.count(x) for x in sorted(set(xs))}


def _cache(path) -> dict:
    if path.exists():
        return torch.load(path, weights_only=True)
    return {"info": {}, "routers": {}}


def _save(path, cache: dict) -> None:
    from .checkpoint import atomic_path
    with atomic_path(path) as tmp:
        torch.save(cache, tmp)


def proxy_sweep_stage(st: dict):
    """Tune what is missing (module docstring); returns (evaluate(ev), {}): the sweep adds no rows to
    the main tables, only results["proxy_sweep"] and its own section."""
    from .demo import rt_config
    from .merge import load_model
    from .router_tuning import owner_rankings, tune_router_with, tuning_streams
    from .tokenizer import load_tokenizer

    out, cfg, log, timer, corpora = st["out"], st["cfg"], st["log"], st["timer"], st["corpora"]
    dirs = [out / "merged"]
    for s in range(1, cfg.seeds):  # the seeds' own models (the `seeds` rows use the same folders)
        pk = st["experts"](out, st["anchor_dir"], cfg, corpora, timer, log, folder=f"experts_seed{s}", seed=s)
        dirs.append(st["merged"](out, st["anchor_dir"], pk, cfg, timer, log, name=f"merged_seed{s}"))
    points = sweep_points(cfg)
    cache = _cache(out / CACHE)
    todo = [p for p in points
            if p.key not in cache["info"] or any(f"{p.key}/{s}" not in cache["routers"] for s in range(cfg.seeds))]
    if todo:
        tok = load_tokenizer(st["anchor_dir"] / "tokenizer.json")
        base = rt_config(cfg)
        public = corpora.public_docs()
        sources = [s for s, docs in corpora.public.items() for _ in docs]  # as demo._rt_streams
        with timer("proxy sweep (proxy sets)"):
            rankings = owner_rankings(tok, public, corpora.owners, base)  # one fit per owner for every budget
        for p in todo:
            c = dataclasses.replace(base, proxy_fraction=p.fraction, proxy_selection=p.selection)
            streams, info = tuning_streams(tok, public, corpora.owners, c, rankings=rankings)
            cache["info"][p.key] = {n: {**{k: v for k, v in i.items() if k != "proxy_indices"},
                                        "proxy_tokens": int(streams[n].numel()),
                                        "proxy_sources": _count([sources[j] for j in i["proxy_indices"]])}
                                    for n, i in info.items()}
            if log:
                print(f"== proxy sweep {p.label}: " + ", ".join(
                    f"{n} {i['proxy_docs']} docs {i['proxy_tokens']} tokens" for n, i in cache["info"][p.key].items()),
                    flush=True)
            for s, d in enumerate(dirs):
                if f"{p.key}/{s}" in cache["routers"]:
                    continue
                model, _ = load_model(d, cfg.device)
                with timer("proxy sweep (router tuning)"):
                    tune_router_with(model, streams, c, progress=log)
                cache["routers"][f"{p.key}/{s}"] = {k: v.cpu() for k, v in router_state(model).items()}
                _save(out / CACHE, cache)  # an interrupted sweep keeps what it tuned
        _save(out / CACHE, cache)

    def evaluate(ev):
        from .eval_suite import score_model
        h = cfg.headline_top_k
        refs = {}
        for key, row in (("no_rt", f"FlexOlmo top-{h} (no RT)"), ("btm2", "BTM top-2"),
                         ("run", f"FlexOlmo top-{h} + RT")):
            labels = [seed_label(row, s) for s in range(cfg.seeds)]
            missing = [x for x in labels if x not in ev.scores]
            if missing:
                raise RuntimeError(f"the proxy sweep pairs with rows not evaluated: {missing}")
            refs[key] = [ev.scores[x] for x in labels]
        scores = {p.key: [] for p in points}
        for s, d in enumerate(dirs):
            model, _ = load_model(d, cfg.device)
            for p in points:
                set_router(model, cache["routers"][f"{p.key}/{s}"])
                with ev.timer("proxy sweep (evaluation)"):
                    scores[p.key].append(score_model(model, ev.sets, cfg.batch_size))
        sweep = summarize(points, scores, refs, ev.boot, list(ev.sets), cache["info"], cfg)
        ev.extra_results["proxy_sweep"] = sweep
        plot_sweep(sweep, out / PLOT)
    return evaluate, {}


def summarize(points: list[Point], scores: dict, refs: dict, boot, sets: list[str], info: dict, cfg) -> dict:
    """results["proxy_sweep"]: per point the mean loss over seeds and its paired differences over seeds.

    ``scores``: {point key: [per-seed Scores]}; ``refs``: {"no_rt" | "btm2" | "run": [per-seed Scores]}.
    """
    from .eval_suite import seeds_paired
    rows = []
    for p in points:
        per = scores[p.key]
        summ = [boot.summarize(sc) for sc in per]
        rows.append({
            "key": p.key, "label": p.label, "selection": p.selection, "fraction": p.fraction,
            "is_run": p == run_point(cfg), "proxy": info[p.key],
            "loss": {s: sum(x[s]["avg"][0] for x in summ) / len(summ) for s in sets},
            "loss_per_seed": {s: [x[s]["avg"][0] for x in summ] for s in sets},
            **{f"vs_{k}": {s: seeds_paired(per, ref, boot, s) for s in sets} for k, ref in refs.items()},
        })
    return {"seeds": len(next(iter(scores.values()))), "sets": sets, "steps": cfg.rt_steps,
            "run": run_point(cfg).label, "rows": rows}


def _diff(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" + (" *" if c["significant"] else "")


def proxy_size(row: dict) -> str:
    """'docs / tokens per owner (share of the documents from the owner's own domain)', means over owners."""
    p = row["proxy"]
    text = (f"{sum(x['proxy_docs'] for x in p.values()) / len(p):.1f} / "
            f"{sum(x['proxy_tokens'] for x in p.values()) / len(p):,.0f}")
    if all("proxy_sources" in x for x in p.values()):  # the demo's owners are named by their domain
        own = sum(x["proxy_sources"].get(n, 0) / x["proxy_docs"] for n, x in p.items()) / len(p)
        text += f" ({own:.0%})"
    return text


def sweep_section(sweep: dict) -> list[str]:
    """Markdown: the sweep's tables (loss, minus no RT, minus BTM top-2, minus the run's RT)."""
    sets, rows = sweep["sets"], sweep["rows"]
    head = "| proxy sets | docs / tokens per owner (own domain) | " + " | ".join(sets) + " |"
    rule = "|---|---|" + "---|" * len(sets)
    name = lambda r: f"**{r['label']}** (this run's)" if r["is_run"] else r["label"]  # noqa: E731
    out = ["## Proxy-set budget sweep", "",
           f"Router tuning ({sweep['steps']} steps, as the run's) of every owner-training seed's merged model "
           f"({sweep['seeds']} seeds) with proxy sets of several budgets (share of each owner's bytes): "
           "'ranked' takes the public documents the owner's classifier scores highest, 'thresholded' only those "
           "it puts on the owner's side. Loss: mean over seeds; differences: mean over seeds with a two-level "
           "bootstrap interval (seeds, then documents), `*` = excludes 0.", "",
           "**Loss**", "", head, rule]
    out += [f"| {name(r)} | {proxy_size(r)} | " + " | ".join(f"{r['loss'][s]:.3f}" for s in sets) + " |" for r in rows]
    for key, title in (("vs_no_rt", "minus the same seed's merged model without RT"),
                       ("vs_btm2", "minus the same seed's BTM top-2"),
                       ("vs_run", "minus this run's RT (same seed)")):
        out += ["", f"**{title}**", "", head, rule]
        out += [f"| {name(r)} | {proxy_size(r)} | " + " | ".join(_diff(r[key][s]) for s in sets) + " |"
                for r in rows]
    return out + ["", f"![proxy sweep]({PLOT})", ""]


def plot_sweep(sweep: dict, path) -> None:
    """Loss minus no RT against the budget (log scale), per set, with BTM top-2's level dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _atomic_savefig

    ranked = [r for r in sweep["rows"] if r["selection"] == "ranked"]
    others = [r for r in sweep["rows"] if r["selection"] != "ranked"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, s in enumerate(sweep["sets"]):
        color = f"C{i}"
        x = [100 * r["fraction"] for r in ranked]
        c = [r["vs_no_rt"][s] for r in ranked]
        y = [d["diff"] for d in c]
        err = [[d["diff"] - d["low"] for d in c], [d["high"] - d["diff"] for d in c]]
        ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, label=f"{s}: ranked")
        btm = sum(r["vs_no_rt"][s]["diff"] - r["vs_btm2"][s]["diff"] for r in ranked) / len(ranked)
        ax.axhline(btm, color=color, linestyle="--", linewidth=1, label=f"{s}: BTM top-2")
        for r in others:
            ax.plot([100 * r["fraction"]], [r["vs_no_rt"][s]["diff"]], marker="x", color=color, markersize=9,
                    linestyle="none", label=f"{s}: {r['selection']}")
    ax.axhline(0.0, color="k", linewidth=0.8)
    run = next(r for r in sweep["rows"] if r["is_run"])
    ax.axvline(100 * run["fraction"], color="gray", linestyle=":", linewidth=1, label=f"this run's: {run['label']}")
    ax.set_xscale("log")
    ticks = sorted({100 * r["fraction"] for r in sweep["rows"]})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("proxy budget (% of each owner's bytes)")
    ax.set_ylabel("loss minus no RT (nats/token)")
    ax.set_title(f"Router tuning vs proxy budget, mean over {sweep['seeds']} seeds (95% intervals)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _atomic_savefig(fig, path)
    plt.close(fig)
