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
