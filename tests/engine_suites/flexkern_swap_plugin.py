"""A pytest plugin that runs an engine's own MoE tests with flexkern swapped in:

    PYTHONPATH=tests/engine_suites python -m pytest -p flexkern_swap_plugin <the engine's tests>

Every OLMo-core DroplessMoEMLP / MoEMLP and torchtitan GroupedExperts constructed during the run
gets ``use_flexkern(self)`` right after construction (flexkern_swap.py). Per test it records: how
many expert modules were swapped / refused, how many times flexkern's
``experts_swiglu_grouped`` ran (the spy) and how many expert forwards ran on flexkern vs the
engine's own forward, also from spawned worker processes (swap_site/sitecustomize.py, via
PYTHONPATH). Results: $FLEXKERN_SWAP_RESULTS (JSON), and a table at the end of the run.
FLEXKERN_SWAP_ENGINES (default both) names the engines to patch. run.sh runs a suite both ways.
"""
import json
import os
import sys
import tempfile
from collections import defaultdict

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flexkern_swap  # noqa: E402

ENGINES = tuple(os.environ.get("FLEXKERN_SWAP_ENGINES", "olmo_core,torchtitan").split(","))
os.environ["FLEXKERN_SWAP_ENGINES"] = ",".join(ENGINES)
# a fresh event log per run (never a file the user had); spawned children inherit its path
LOG = os.environ["FLEXKERN_SWAP_LOG"] = os.path.join(tempfile.mkdtemp(prefix="flexkern-swap-"), "events.jsonl")
open(LOG, "x").close()
# spawned children must import sitecustomize from swap_site
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(HERE, "swap_site")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

flexkern_swap.apply(ENGINES)

RESULTS = {}


def _child_stats(nodeid):
    """Counters reported by spawned worker processes (other pids) during this test."""
    out = defaultdict(int)
    refused = []
    with open(LOG) as f:
        for line in f:
            r = json.loads(line)
            if r["pid"] == os.getpid() or not r["test"].startswith(nodeid + " "):
                continue
            key = {"swapped": "swapped", "op_call": "op_calls", "fk_forwards": "fk_forwards",
                   "engine_forwards": "engine_forwards"}.get(r["event"])
            if key:
                out[key] += 1
            elif r["event"] == "refused":
                refused.append(r["reason"])
    return out, refused


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    flexkern_swap.reset()
    yield
    s = dict(flexkern_swap.STATS)
    child, child_refused = _child_stats(item.nodeid)
    rec = {k: s[k] for k in ("swapped", "op_calls", "fk_forwards", "engine_forwards")}
    rec["refused"] = sorted(set(s["refused"]))
    rec["child"] = dict(child)
    rec["child_refused"] = sorted(set(child_refused))
    rec["outcome"] = RESULTS.get(item.nodeid, {}).get("outcome")
    RESULTS[item.nodeid] = rec


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    cur = RESULTS.setdefault(item.nodeid, {})
    if rep.when == "call" or rep.outcome != "passed":
        if cur.get("outcome") in (None, "passed"):
            cur["outcome"] = rep.outcome


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section(f"flexkern swap ({','.join(ENGINES)})")
    tr.write_line("swapped op_calls fk_fwd eng_fwd | child: swapped op_calls fk_fwd eng_fwd | outcome test")
    for nodeid, r in RESULTS.items():
        c = r.get("child", {})
        tr.write_line(f"{r['swapped']:7d} {r['op_calls']:8d} {r['fk_forwards']:6d} {r['engine_forwards']:7d} | "
                      f"{c.get('swapped', 0):7d} {c.get('op_calls', 0):8d} {c.get('fk_forwards', 0):6d} "
                      f"{c.get('engine_forwards', 0):7d} | {r.get('outcome')} {nodeid}")
        for reason in r["refused"] + r["child_refused"]:
            tr.write_line(f"        refused: {reason}")
    path = os.environ.get("FLEXKERN_SWAP_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
