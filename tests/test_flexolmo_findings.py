"""The report's findings follow the numbers: their verdicts change when the measured signs do."""
from flexkern.flexolmo.findings import ORACLE, findings

SETS = ("heldout", "short", "mixed")
HEAD = "FlexOlmo top-2 + RT"
CLOSED = "diagnostic: RT for 200 steps on the closed data (not private), top-2"
PROXY = "diagnostic: RT for 200 steps on the proxy sets, top-2"


def _c(diff, half=0.01):
    return {"diff": diff, "low": diff - half, "high": diff + half, "significant": abs(diff) > half}


def _results(oracle_vs_btm, closed_vs_btm, proxy_vs_head, closed_vs_head, public_share):
    return {"headline": HEAD, "sets": {s: {} for s in SETS},
            "versus_btm": {ORACLE: {s: _c(oracle_vs_btm) for s in SETS}, CLOSED: {s: _c(closed_vs_btm) for s in SETS}},
            "ablations": [{"row": ORACLE, "sets": {s: _c(-0.3) for s in SETS}},
                          {"row": CLOSED, "sets": {s: _c(closed_vs_head) for s in SETS}},
                          {"row": PROXY, "sets": {s: _c(proxy_vs_head) for s in SETS}},
                          {"row": "no router bias: top-2 (no RT)", "sets": {s: _c(0.0, 1e-9) for s in SETS}}],
            "routing": {"FlexOlmo top-2 (no RT)": {"code": {"public": public_share}, "legal": {"public": 0.0}}},
            "probe": {"layers": [{"layer": 0, "token_macro": 0.4, "context_macro": 0.7}], "chance_macro": 1 / 6,
                      "domains": list("abcdef")}}


def test_findings_follow_the_numbers():
    text = "\n".join(findings(_results(-0.06, +0.04, 0.0, -0.2, 0.01)))
    assert "good enough to beat BTM top-2 on heldout, short, mixed" in text
    assert "limited by what its data says" in text and "still loses to BTM top-2" in text
    assert "owners also win off their domain" in text and "does nothing here" in text
    assert "40% macro accuracy from one token's h" in text and "70% from the running mean" in text
    text = "\n".join(findings(_results(+0.06, -0.04, -0.1, -0.2, 0.3)))
    assert "does not beat BTM top-2: the experts themselves hold it back" in text
    assert "limited by what its data says" not in text and "still loses" not in text
    assert "owners also win off their domain" not in text


def test_no_diagnostics_no_findings():
    assert findings({"headline": HEAD, "sets": {s: {} for s in SETS}, "suite": {}}) == []


def _sweep(losses: dict, vs_run: dict, run: float = 0.01):
    """A proxy_sweep block: ranked points at the given {fraction: loss}, each vs this run's point."""
    rows = []
    for f, loss in losses.items():
        rows.append({"key": f"ranked@{f:g}", "label": f"ranked {f:.1%}", "selection": "ranked", "fraction": f,
                     "is_run": f == run, "proxy": {"a": {"proxy_docs": 1 if f <= 0.01 else 5}},
                     "loss": {s: loss for s in SETS}, "vs_no_rt": {s: _c(loss - 6.0) for s in SETS},
                     "vs_btm2": {s: _c(loss - 5.6) for s in SETS}, "vs_run": {s: _c(vs_run.get(f, 0.0)) for s in SETS}})
    rows.append({**rows[[r["is_run"] for r in rows].index(True)], "key": f"thresholded@{run:g}",
                 "label": f"thresholded {run:.1%}", "selection": "thresholded", "is_run": False,
                 "vs_run": {s: _c(0.05) for s in SETS}})
    return {"seeds": 3, "sets": list(SETS), "steps": 20, "run": f"ranked {run:.1%}", "rows": rows}


def test_sweep_finding_follows_the_numbers():
    base = {"headline": HEAD, "sets": {s: {} for s in SETS}}
    text = "\n".join(findings({**base, "proxy_sweep": _sweep({0.005: 5.95, 0.01: 5.9, 0.05: 5.8}, {0.05: -0.1})}))
    assert "lowest mean loss is at 5% (heldout), 5% (short), 5% (mixed)" in text
    assert "`ranked 1.0%` minus no RT: heldout -0.100 [-0.110, -0.090] *" in text
    assert "Significantly better than it: ranked 5.0% on heldout (-0.100" in text
    assert "`thresholded 1.0%` minus it: heldout +0.050 [+0.040, +0.060] *" in text
    assert "above the paper's |proxy| << 1%" in text and "gets 1.0 documents" in text
    text = "\n".join(findings({**base, "proxy_sweep": _sweep({0.005: 5.95, 0.01: 5.8, 0.05: 5.9}, {0.05: 0.1})}))
    assert "lowest mean loss is at 1% (heldout)" in text
    assert "No other point of the sweep is significantly better than it on any set." in text
    assert "Significantly better" not in text and "above the paper's" not in text
