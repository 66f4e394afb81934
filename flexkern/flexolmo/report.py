"""Markdown + PNG report of an evaluation run.

``results`` (also written as results.json) is a plain dict:
    domains:       [domain, ...]                      evaluation domains, in column order
    models:        {label: {domain: loss}}            held-out loss (nats/token) per model, row order
    opt_out:       {expert: {domain: loss}}           merged model with that expert removed (optional)
    opt_out_base:  label in ``models`` that opt-out is compared against (optional)
    owner_domain:  {expert: domain}                   which domain each expert's owner holds (optional)
    timings:       {step: seconds}                    (optional)
    notes:         [str, ...]                         (optional) lines printed under the tables
    suite:         {label: {set: {group: [point, low, high]}}}  (optional) the evaluation suite's
                   numbers with 95% intervals (``eval_suite``); then also comparisons, headline,
                   opt_out_detail, seed_comparisons, rt_proxy, attribution, variant_rows
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import atomic_path


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _avg(losses: dict[str, float], domains) -> float:
    return sum(losses[d] for d in domains) / len(domains)


def _check(results: dict) -> tuple[list[str], dict]:
    domains, models = results.get("domains"), results.get("models")
    if not domains or not models:
        raise ValueError("results needs non-empty 'domains' and 'models'")
    for label, losses in models.items():
        missing = [d for d in domains if d not in losses]
        if missing:
            raise ValueError(f"model {label!r} has no loss for {missing}")
    return list(domains), models


def loss_table(results: dict) -> str:
    """Markdown table: one row per model, loss per domain, average loss and average perplexity."""
    domains, models = _check(results)
    best = min(_avg(v, domains) for v in models.values())
    head = "| model | " + " | ".join(domains) + " | avg loss | avg ppl |"
    rows = [head, "|" + "---|" * (len(domains) + 3)]
    for label, losses in models.items():
        a = _avg(losses, domains)
        ppl = math.exp(a)
        cells = [f"{losses[d]:.3f}" for d in domains]
        avg = f"**{a:.3f}**" if math.isclose(a, best) else f"{a:.3f}"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {avg} | {ppl:.1f} |")
    return "\n".join(rows)


def opt_out_table(results: dict) -> str:
    """Markdown table: per removed expert, loss per domain and its change vs the full merged model."""
    domains, models = _check(results)
    base_label = results.get("opt_out_base")
    if not results.get("opt_out") or base_label not in models:
        return ""
    base = models[base_label]
    owner_domain = results.get("owner_domain", {})
    rows = ["| removed expert | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    rows.append(f"| none ({base_label}) | " + " | ".join(f"{base[d]:.3f}" for d in domains) + " |")
    for name, losses in results["opt_out"].items():
        cells = []
        for d in domains:
            cell = f"{losses[d]:.3f} ({losses[d] - base[d]:+.3f})"
            cells.append(f"**{cell}**" if owner_domain.get(name) == d else cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_losses(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, models = _check(results)
    cols = domains + ["average"]
    n = len(models)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cols) + 0.25 * n), 4.5))
    cmap = plt.get_cmap("tab20")
    for i, (label, losses) in enumerate(models.items()):
        vals = [losses[d] for d in domains] + [_avg(losses, domains)]
        ax.bar([c + (i - (n - 1) / 2) * width for c in range(len(cols))], vals, width, label=label, color=cmap(i % 20))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("held-out loss (nats/token), lower is better")
    lo = min(min(v.values()) for v in models.values())
    ax.set_ylim(bottom=max(0.0, lo - 0.5))
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Per-domain held-out loss")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def plot_opt_out(results: dict, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, models = _check(results)
    base_label = results.get("opt_out_base")
    if not results.get("opt_out") or base_label not in models:
        return None
    base = models[base_label]
    names = list(results["opt_out"])
    delta = [[results["opt_out"][n][d] - base[d] for d in domains] for n in names]
    lim = max(1e-6, max(abs(x) for row in delta for x in row))
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2, 0.6 * len(names) + 1.5))
    im = ax.imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(names)), [f"without {n}" for n in names])
    for i, row in enumerate(delta):
        for j, x in enumerate(row):
            ax.text(j, i, f"{x:+.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"loss change vs {base_label}")
    ax.set_title("Opt-out: loss change when one expert is removed")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir, title: str = "FlexOlmo demo report") -> Path:
    """Write report.md, results.json, losses.png and (with opt-out data) opt_out.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check(results)
    _atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plot_losses(results, out_dir / "losses.png")
    has_opt_out = plot_opt_out(results, out_dir / "opt_out.png") is not None
    parts = [f"# {title}", ""]
    if results.get("suite"):
        parts += suite_sections(results)
    parts += ["## Held-out loss per domain" if results.get("suite") else "",
              "Held-out next-token loss (nats/token, lower is better) per domain; "
              "the average is unweighted over domains.", "", loss_table(results), "",
              "![per-domain loss](losses.png)", ""]
    if has_opt_out:
        parts += ["## Opt-out", "",
                  f"Each row removes one expert from `{results['opt_out_base']}`; in brackets the change "
                  "vs the full model, the owner's own domain in bold.", "",
                  opt_out_table(results), "", "![opt-out](opt_out.png)", ""]
    if results.get("routing"):
        parts += routing_section(results["routing"])
    if results.get("probe"):
        from .probe import probe_table
        parts += ["## Can one token's router input tell its domain?", "",
                  f"A linear probe (multinomial logistic regression) of each held-out token's domain from "
                  f"the router's input h in `{results['probe']['model']}`, per layer: from the token's h "
                  "alone (what a per-token router sees) and from the running mean of h over the window so "
                  "far (context, which BTM's sequence likelihoods use); test documents disjoint from the "
                  "probe's training documents.", "",
                  *(probe_table(results["probe"]) if "skipped" not in results["probe"]
                    else [f"Not run: {results['probe']['skipped']}"]), ""]
    if results.get("attribution"):
        parts += attribution_section(results["attribution"])
    if results.get("timings"):
        parts += ["## Timings", "", "| step | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()] + [""]
        if results.get("timings_note"):
            parts += [results["timings_note"] + (f"; this invocation took {results['this_invocation_s']:.0f} s."
                                                 if "this_invocation_s" in results else "."), ""]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    path = out_dir / "report.md"
    _atomic_write_text(path, "\n".join(parts))
    return path


# ---- the evaluation suite's sections -----------------------------------------------------------------
def _cell(c, digits: int = 3) -> str:
    return f"{c[0]:.{digits}f} [{c[1]:.{digits}f}, {c[2]:.{digits}f}]"


def _diff(c: dict) -> str:
    mark = " *" if c["significant"] else ""
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{mark}"


def suite_sections(results: dict) -> list[str]:
    """Markdown: headline table (3 sets, intervals), comparisons, per-domain short-context, opt-out goals."""
    suite, head = results["suite"], results.get("headline")
    sets = [s for s in ("heldout", "short", "mixed") if any(s in v for v in suite.values())]
    info = results.get("sets", {})
    out = ["## Summary: three evaluations, 95% bootstrap intervals", "",
           "Loss in nats/token (lower is better), averaged over domains; in brackets the 95% interval "
           "(bootstrap over documents). " + "; ".join(
               f"**{s}**: {info[s]['tokens']} predicted tokens" for s in sets if s in info) + ".", "",
           "| model | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for label, v in suite.items():
        cells = [_cell(v[s]["avg"]) if s in v else "" for s in sets]
        name = f"**{label}**" if label == head else label
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    goals = results.get("goals") or []
    if goals:
        out += ["## Goals", "", "| goal | met | evidence |", "|---|---|---|"]
        met = {True: "yes", False: "**no**", None: "not measured"}
        out += [f"| {g['goal']} | {met[g['met']]} | {g['evidence']} |" for g in goals] + [""]
    comps = results.get("comparisons") or []
    if comps:
        out += ["## Paired differences", "",
                f"`{head}` minus each row (negative: `{head}` is better), paired bootstrap over the same "
                "documents; `*` = the 95% interval excludes 0.", "",
                "| compared with | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        by = {}
        for c in comps:
            by.setdefault(c["b"], {})[c["set"]] = c
        for b, cs in by.items():
            out.append(f"| {b} | " + " | ".join(_diff(cs[s]) if s in cs else "" for s in sets) + " |")
        out.append("")
    seeds = results.get("seed_comparisons") or []
    if seeds:
        out += [f"### Over {seeds[0]['seeds']} owner-training seeds", "",
                "Mean over seeds of the paired difference; interval from a two-level bootstrap (seeds, "
                "then documents).", "", "| a − b | set | diff | per seed |", "|---|---|---|---|"]
        for c in seeds:
            out.append(f"| {c['a']} − {c['b']} | {c['set']} | {_diff(c)} | "
                       + ", ".join(f"{x:+.3f}" for x in c["per_seed"]) + " |")
        out.append("")
    from .findings import findings
    lines = findings(results)
    if lines:
        out += ["## Findings: what the diagnostics say", "",
                "Stated from this run's numbers (differences with 95% intervals, `*` = significant).", "",
                *lines, ""]
    out += ablation_section(results.get("ablations") or [], sets)
    domains = results["domains"]
    if "short" in sets:
        out += ["## Short-context loss per domain", "",
                "The first tokens of every held-out document (no earlier context).", "",
                "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for label, v in suite.items():
            if "short" in v:
                out.append(f"| {label} | " + " | ".join(_cell(v["short"][d], 2) for d in domains) + " |")
        out.append("")
    detail = results.get("opt_out_detail")
    if detail:
        out += ["## Opt-out goals", "",
                f"Each owner masked in `{results.get('opt_out_base')}`. Goal: its domain within 5% of the "
                "public model, every other domain moving less than half the width of its 95% interval.", "",
                "| removed | own domain loss (public) | within 5% | largest move elsewhere | all others within |",
                "|---|---|---|---|---|"]
        for n, r in detail.items():
            own = r["own"]
            worst = max(r["others"].items(), key=lambda kv: abs(kv[1]["delta"]))
            allin = all(m["within"] for m in r["others"].values())
            own_cell = f"{own['loss']:.3f} ({own['public']:.3f})" if own else "—"
            out.append(f"| {n} | {own_cell} | {own.get('within_5pct_of_public', '—')} | {worst[0]} "
                       f"{worst[1]['delta']:+.3f} (half-width {worst[1]['base_half_width']:.3f}) | {allin} |")
        out.append("")
    proxy = results.get("rt_proxy")
    if proxy:
        out += ["## Proxy sets for router tuning", "", "| owner | documents | bytes (budget) | from | classifier train acc |",
                "|---|---|---|---|---|"]
        for n, p in proxy.items():
            src = ", ".join(f"{s} {p['proxy_sources'].count(s)}" for s in sorted(set(p.get("proxy_sources", []))))
            out.append(f"| {n} | {p['proxy_docs']} | {p['proxy_bytes']} ({p['budget_bytes']}) | {src} | "
                       f"{p['classifier_train_accuracy']:.2f} |")
        out.append("")
    if results.get("proxy_sweep"):
        from .proxy_sweep import sweep_section
        out += sweep_section(results["proxy_sweep"])
    return out


def ablation_section(ablations: list[dict], sets: list[str]) -> list[str]:
    """Markdown: each ablation's / diagnostic's row minus its reference (the paper's Table 1 as differences)."""
    if not ablations:
        return []
    out = ["## Ablations and diagnostics", "",
           "Each row minus its reference, paired over the same documents (positive: the row is worse); "
           "`*` = the 95% interval excludes 0. '(no RT)' rows are compared with the method without router "
           "tuning, the others with the method with it. Diagnostics are not the method: they use what "
           "it may not (the owners' closed data, hindsight) to locate the gap.", "",
           "| row | reference | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for a in ablations:
        out.append(f"| {a['row']} | {a['reference']} | "
                   + " | ".join(_diff(a["sets"][s]) if s in a["sets"] else "" for s in sets) + " |")
    return out + [""]


def attribution_section(att: dict) -> list[str]:
    out = ["## Provenance per token", "", f"Share of each expert in a token's FFN output: {att['definition']}.", ""]
    for dom, d in att["domains"].items():
        top = max(d["mean_share"], key=d["mean_share"].get)
        out += [f"**{dom}** (mean share: " + ", ".join(f"{k} {v:.2f}" for k, v in d["mean_share"].items())
                + f"; largest: {top}) — [page]({d['html']})", "", f"![{dom}]({d['png']})", ""]
    if att.get("opt_out"):
        o = att["opt_out"]
        out += [f"With `{o['removed']}` opted out its share goes from {o['share_before']:.2f} (mean) to "
                f"{o['share_after']:.2f} (max over tokens):", "", f"![opted out]({o['png']})", ""]
    return out


def routing_section(routing: dict) -> list[str]:
    out = ["## Where the FFN output comes from", "",
           "Mean share of each expert in the tokens' FFN output (see Provenance below) over the first tokens "
           "of the first held-out documents of each domain.", ""]
    for label, doms in routing.items():
        names = list(next(iter(doms.values())))
        out += [f"**{label}**", "", "| domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        out += [f"| {d} | " + " | ".join(f"{v[n]:.2f}" for n in names) + " |" for d, v in doms.items()] + [""]
    return out
