"""Markdown + PNG report of an evaluation run.

``results`` (also written as results.json) is a plain dict:
    domains:       [domain, ...]                      evaluation domains, in column order
    models:        {label: {domain: loss}}            held-out loss (nats/token) per model, row order
    opt_out:       {expert: {domain: loss}}           merged model with that expert removed (optional)
    opt_out_base:  label in ``models`` that opt-out is compared against (optional)
    owner_domain:  {expert: domain}                   which domain each expert's owner holds (optional)
    timings:       {step: seconds}                    (optional)
    notes:         [str, ...]                         (optional) lines printed under the tables
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
    parts = [f"# {title}", "",
             "Held-out next-token loss (nats/token, lower is better) per domain; "
             "the average is unweighted over domains.", "", loss_table(results), "",
             "![per-domain loss](losses.png)", ""]
    if has_opt_out:
        parts += ["## Opt-out", "",
                  f"Each row removes one expert from `{results['opt_out_base']}`; in brackets the change "
                  "vs the full model, the owner's own domain in bold.", "",
                  opt_out_table(results), "", "![opt-out](opt_out.png)", ""]
    if results.get("timings"):
        parts += ["## Timings", "", "| step | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()] + [""]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    path = out_dir / "report.md"
    _atomic_write_text(path, "\n".join(parts))
    return path
