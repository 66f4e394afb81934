"""The report's findings: what the diagnostics and ablations say about the goals, from the numbers.

Each finding is stated only when the rows it needs were run (``demo --variant rt-ceiling --variant
routing --variant proxy-sweep`` and the owner-training variants), and its wording follows the
measured signs and intervals, so a run where the numbers differ says something different. Input:
the demo's results dict (``suite``, ``ablations``, ``versus_btm``, ``probe``, ``routing``,
``proxy_sweep``, ``headline``, ``sets``).
"""
from __future__ import annotations

ORACLE = "oracle: best single model per document (hindsight)"


def _fmt(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" + (" *" if c["significant"] else "")


def _per_set(cells: dict, sets) -> str:
    return ", ".join(f"{s} {_fmt(cells[s])}" for s in sets if s in cells)


def _better(c: dict) -> bool:  # significantly lower loss
    return c["significant"] and c["diff"] < 0


def _worse(c: dict) -> bool:
    return c["significant"] and c["diff"] > 0


def _find(rows, *parts: str) -> str | None:
    return next((r for r in rows if all(p in r for p in parts)), None)


def findings(results: dict) -> list[str]:
    """Markdown bullet lines (empty when the diagnostics were not run)."""
    head, sets = results.get("headline"), list(results.get("sets", {}))
    vs = results.get("versus_btm") or {}
    abl = {a["row"]: a["sets"] for a in results.get("ablations") or []}
    out = []
    if ORACLE in vs and ORACLE in abl:
        wins = [s for s in sets if _better(vs[ORACLE][s])]
        verdict = ("the experts themselves are good enough to beat BTM top-2 on " + ", ".join(wins)
                   + "; the gap is which expert the router picks") if wins else \
            "even perfect per-document selection does not beat BTM top-2: the experts themselves hold it back"
        out.append(f"**Experts or routing?** The best single model per document, chosen in hindsight, minus "
                   f"BTM top-2: {_per_set(vs[ORACLE], sets)}; minus `{head}`: {_per_set(abl[ORACLE], sets)}. "
                   f"So {verdict}.")
    closed_long = _find(abl, "diagnostic: RT for", "closed data")
    proxy_long = _find(abl, "diagnostic: RT for", "on the proxy sets")
    wide = _find(abl, "diagnostic: RT for", "larger ranked proxy sets")
    closed = _find(abl, "diagnostic: RT on the owners' closed data")
    if closed_long and proxy_long:
        parts = [f"10x the steps on the same proxy sets: {_per_set(abl[proxy_long], sets)}"]
        if wide:
            parts.append(f"10x larger ranked proxy sets (10x steps): {_per_set(abl[wide], sets)}")
        if closed:
            parts.append(f"the owners' closed data, same steps: {_per_set(abl[closed], sets)}")
        parts.append(f"closed data, 10x steps: {_per_set(abl[closed_long], sets)}")
        lost = [s for s in sets if closed_long in vs and _worse(vs[closed_long][s])]
        steps_help = any(_better(abl[proxy_long][s]) for s in sets)
        data_help = any(_better(abl[closed_long][s]) for s in sets)
        verdict = []
        if data_help and not steps_help:
            verdict.append("router tuning is limited by what its data says about the owners, not by its steps")
        if lost:
            verdict.append("even a router tuned on the closed data still loses to BTM top-2 on "
                           + ", ".join(f"{s} ({_fmt(vs[closed_long][s])})" for s in lost)
                           + ", so no router-tuning data the method could use would close the gap at this scale")
        out.append(f"**Router tuning's data or budget?** Each minus `{head}`: " + "; ".join(parts) + "."
                   + (" So " + "; and ".join(verdict) + "." if verdict else ""))
    probe = results.get("probe")
    if probe and "layers" in probe:
        tok = max(probe["layers"], key=lambda r: r["token_macro"])
        ctx = max(probe["layers"], key=lambda r: r["context_macro"])
        out.append(f"**Can a per-token router tell the domains apart?** A linear probe of the router's input "
                   f"reaches {100 * tok['token_macro']:.0f}% macro accuracy from one token's h (best layer "
                   f"{tok['layer']}) and {100 * ctx['context_macro']:.0f}% from the running mean of h over the "
                   f"window (layer {ctx['layer']}), against {100 * probe['chance_macro']:.0f}% by chance "
                   f"({len(probe['domains'])} domains): a linear per-token router works from a domain "
                   f"signal that is wrong for about {100 * (1 - tok['token_macro']):.0f}% of tokens, while "
                   "BTM weighs each owner by its model's likelihood of the whole prefix.")
    routing = results.get("routing") or {}
    base = head.replace("+ RT", "(no RT)") if head else None
    if base in routing:
        pub = [v["public"] for v in routing[base].values()]
        line = (f"**Who wins the routing?** In `{base}` the public expert gets {min(pub):.2f}-{max(pub):.2f} "
                "of each domain's FFN output" + (
                    ": every owner's row learned to beat the frozen public row on all it saw (its own data "
                    "only), so owners also win off their domain." if max(pub) < 0.1 else "."))
        for label in routing:
            if label.startswith("extension") and "(no RT)" in label:
                p = [v["public"] for v in routing[label].values()]
                line += f" `{label}`: public share {min(p):.2f}-{max(p):.2f}."
        out.append(line)
    nb = abl.get(_find(abl, "no router bias", "(no RT)") or "")
    if nb and all(abs(c["diff"]) < 1e-3 for c in nb.values()):
        out.append("**The router bias does nothing here:** without it the model is the same to 1e-3 nats "
                   "(it starts at 0, is clamped to <= 0, and the owner's gradient pushes it up, so it stays 0).")
    sweep = _sweep_finding(results.get("proxy_sweep"), sets)
    if sweep:
        out.append(sweep)
    bal = _find(vs, "two-sided", "+ RT")
    if bal:
        out.append(f"**The two-sided extension** (owners' rows trained as own-vs-public classifiers on public "
                   f"data and their own) minus `{head}`: {_per_set(abl.get(bal, {}), sets)}; minus BTM top-2: "
                   f"{_per_set(vs[bal], sets)}.")
    return [f"- {line}" for line in out]


def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _sweep_finding(sw: dict | None, sets: list[str]) -> str | None:
    """The proxy-budget sweep (proxy_sweep.py): where the loss is lowest and what beats this run's budget."""
    if not sw:
        return None
    rows = sw["rows"]
    ranked = [r for r in rows if r["selection"] == "ranked"]
    run = next((r for r in rows if r["is_run"]), None)
    if not ranked or run is None:
        return None
    best = {s: min(ranked, key=lambda r: r["loss"][s]) for s in sets}
    line = (f"**How large a proxy set?** Router tuning with ranked proxy sets of "
            f"{_pct(ranked[0]['fraction'])}-{_pct(ranked[-1]['fraction'])} of each owner's bytes, over "
            f"{sw['seeds']} seeds: the lowest mean loss is at " + ", ".join(
                f"{_pct(best[s]['fraction'])} ({s})" for s in sets) + ". This run's "
            f"`{run['label']}` minus no RT: {_per_set(run['vs_no_rt'], sets)}; minus BTM top-2: "
            f"{_per_set(run['vs_btm2'], sets)}.")
    wins = [(r, [s for s in sets if _better(r["vs_run"][s])]) for r in rows if not r["is_run"]]
    wins = [(r, w) for r, w in wins if w]
    if wins:
        line += " Significantly better than it: " + "; ".join(
            f"{r['label']} on " + ", ".join(f"{s} ({_fmt(r['vs_run'][s])})" for s in w) for r, w in wins) + "."
    else:
        line += " No other point of the sweep is significantly better than it on any set."
    other = [r for r in rows if r["selection"] != run["selection"] and r["fraction"] == run["fraction"]]
    if other:
        line += f" `{other[0]['label']}` minus it: {_per_set(other[0]['vs_run'], sets)}."
    one = next((r for r in ranked if r["fraction"] == 0.01), None)
    if one and max(b["fraction"] for b in best.values()) > 0.01:
        docs = sum(p["proxy_docs"] for p in one["proxy"].values()) / len(one["proxy"])
        line += (f" The best budgets are above the paper's |proxy| << 1% of the owner's data: at 1% an owner "
                 f"here gets {docs:.1f} documents on average.")
    return line
