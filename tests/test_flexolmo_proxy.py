"""Proxy-set selection: the owner-vs-public classifier and the size budget."""
import pytest
import torch

from flexkern.flexolmo.proxy import (Ranking, fit_logistic, proxy_budget, select_by_score, select_from_ranking,
                                     select_proxy_set, selection_min_score)


def _clusters(n, center, gen, spread=0.3):
    return center + spread * torch.randn(n, center.numel(), generator=gen)


def test_logistic_regression_separates_and_is_deterministic():
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    pos, neg = _clusters(40, a, gen), _clusters(60, b, gen)
    clf = fit_logistic(pos, neg)
    assert (clf.logits(pos) > 0).float().mean() > 0.95 and (clf.logits(neg) < 0).float().mean() > 0.95
    again = fit_logistic(pos, neg)
    assert torch.equal(clf.w_D, again.w_D) and clf.b == again.b
    with pytest.raises(ValueError):
        fit_logistic(pos, neg[:, :4])


def test_select_by_score_respects_budget_and_order():
    scores = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    assert select_by_score(scores, [10] * 5, 30) == [1, 2, 4]
    assert select_by_score(scores, [10, 50, 10, 10, 10], 25) == [2, 4]  # doc 1 too big, skipped
    assert select_by_score(scores, [100] * 5, 10) == [1]  # at least one document
    assert select_by_score(torch.tensor([-1.0, -2.0, 1.0, -0.5]), [10] * 4, 100, min_score=0.0) == [2]  # owner side
    assert select_by_score(torch.tensor([-1.0, -2.0]), [10, 10], 100, min_score=0.0) == [0]
    assert proxy_budget(["ab", "cde"], 0.5) == 2
    with pytest.raises(ValueError):
        proxy_budget(["x"], 0.0)


def test_proxy_set_finds_owner_like_public_documents():
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    owner_c, pub_c = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    owner_emb = _clusters(30, owner_c, gen)
    # public: 50 ordinary documents and 5 that look like the owner's (the owner's public share)
    public_emb = torch.cat([_clusters(50, pub_c, gen), _clusters(5, owner_c, gen)])
    order = torch.randperm(55, generator=gen)
    public_emb = public_emb[order]
    planted = {i for i, j in enumerate(order.tolist()) if j >= 50}
    public_docs = [f"doc {i} " + "x" * 90 for i in range(55)]  # 100 bytes each
    owner_docs = ["y" * 1000] * 30  # 30 kB -> 1% = 300 bytes = 3 documents
    ps = select_proxy_set(owner_emb, public_emb, public_docs, owner_docs, proxy_fraction=0.01)
    assert len(ps.indices) == 3 and set(ps.indices) <= planted
    assert ps.train_accuracy >= 0.9 and ps.scores.shape == (55,)  # the planted 5 count as errors


def test_proxy_set_on_real_text():
    from flexkern.flexolmo.data import _installed, load_documents
    from flexkern.flexolmo.embed import minilm_available, minilm_embed
    if not (minilm_available() and _installed("gensim")):
        pytest.skip("needs the embedder and the encyclopedia corpus")
    code = load_documents("code", 20_000)
    wiki = load_documents("encyclopedia", 20_000)
    public = wiki + code[:2]
    ps = select_proxy_set(minilm_embed(code[2:], max_tokens=64), minilm_embed(public, max_tokens=64), public,
                          code[2:], proxy_fraction=0.2)
    assert ps.indices and set(ps.indices) <= {len(wiki), len(wiki) + 1}


def test_ranked_selection_ignores_the_owner_side_threshold():
    """The default (the paper's top-scoring public documents) ranks every document; min_score=0 keeps
    only those the classifier puts on the owner's side, falling back to the single top one."""
    scores = torch.tensor([-0.5, -2.0, -0.1, -3.0])
    sizes = [10, 10, 10, 10]
    assert select_by_score(scores, sizes, budget=25) == [0, 2]
    assert select_by_score(scores, sizes, budget=25, min_score=0.0) == [2]  # none above 0: the top one
    assert selection_min_score("ranked") == float("-inf") and selection_min_score("thresholded") == 0.0
    with pytest.raises(ValueError, match="unknown proxy selection 'top'"):
        selection_min_score("top")


def _greedy(scores, sizes, budget, min_score):
    """Reference: walk the documents best first, keep each one that still fits."""
    picked, used = [], 0
    for i in sorted(range(len(sizes)), key=lambda i: (-scores[i], i)):
        if scores[i] > min_score and used + sizes[i] <= budget:
            picked.append(i)
            used += sizes[i]
    return sorted(picked)


@pytest.mark.parametrize("selection", ["ranked", "thresholded"])
def test_selection_fills_the_budget_in_utf8_bytes(selection):
    """Random scores (mostly negative: a classifier that separates the owner from the public mix) and
    documents of multi-byte text: the set is the best-first greedy fill of the budget counted in UTF-8
    bytes, never over it unless it is the single top document."""
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    for _ in range(20):
        n = int(torch.randint(5, 40, (), generator=gen))
        scores = torch.randn(n, generator=gen, dtype=torch.float64) - 2.0
        docs = ["é" * int(k) + "x" * int(j) for k, j in torch.randint(1, 60, (n, 2), generator=gen)]
        sizes = [len(d.encode("utf-8")) for d in docs]
        owner = ["y" * int(torch.randint(500, 5000, (), generator=gen))]
        fraction = float(torch.rand((), generator=gen)) * 0.5 + 0.01
        budget = proxy_budget(owner, fraction)
        idx = select_from_ranking(Ranking(scores, 1.0), docs, owner, fraction, selection)
        want = _greedy(scores.tolist(), sizes, budget, selection_min_score(selection))
        top = int(torch.argmax(scores))
        assert idx == (want or [top])
        assert sum(sizes[i] for i in idx) <= budget or idx == [top]
        if selection == "ranked":  # nothing left out that would still fit, and no better one skipped
            used = sum(sizes[i] for i in idx)
            assert all(used + sizes[i] > budget for i in range(n) if i not in idx) or idx == [top]
        else:
            assert all(scores[i] > 0 for i in idx) or idx == [top]
    with pytest.raises(ValueError, match="3 public documents but 2 scores"):
        select_from_ranking(Ranking(torch.zeros(2), 1.0), ["a", "b", "c"], ["x"], 0.5)


def test_default_selection_is_ranked_everywhere():
    """Router tuning, the demo and both commands default to the ranked selection; a bad name fails early."""
    import inspect

    from flexkern.flexolmo import defaults
    from flexkern.flexolmo.commands import tune_router_dir
    from flexkern.flexolmo.demo import DemoConfig
    from flexkern.flexolmo.router_tuning import RouterTuningConfig
    assert defaults.PROXY_SELECTIONS[0] == "ranked" == defaults.DEMO.rt_proxy_selection
    assert RouterTuningConfig().proxy_selection == "ranked" == DemoConfig().rt_proxy_selection
    assert inspect.signature(tune_router_dir).parameters["proxy_selection"].default == "ranked"
    assert inspect.signature(select_proxy_set).parameters["selection"].default == "ranked"
    with pytest.raises(ValueError, match="unknown proxy selection"):
        RouterTuningConfig(proxy_selection="owner")
    with pytest.raises(ValueError, match="rt_proxy_selection"):
        DemoConfig(rt_proxy_selection="owner")
    from flexkern.cli import build_parser
    p = build_parser()
    tune = ["tune-router", "--model", "m", "--out", "o"]
    assert p.parse_args(tune).proxy_selection == "ranked"
    assert p.parse_args([*tune, "--proxy-selection", "thresholded"]).proxy_selection == "thresholded"
    assert p.parse_args(["demo"]).rt_proxy_selection == "ranked"
    a = p.parse_args(["demo", "--rt-proxy-selection", "thresholded", "--variant", "proxy-sweep"])
    assert a.rt_proxy_selection == "thresholded" and a.variant == ["proxy-sweep"]
    with pytest.raises(SystemExit):
        p.parse_args([*tune, "--proxy-selection", "owner"])


def test_tuning_streams_from_one_ranking_equal_a_fresh_fit():
    """Several budgets picked from one classifier fit (the sweep) equal separate runs; ranked sets grow
    with the budget and hold at most it; thresholded ones are a single document here."""
    import dataclasses

    from flexkern.flexolmo.embed import minilm_available
    from flexkern.flexolmo.router_tuning import RouterTuningConfig, owner_rankings, tuning_streams
    from flexkern.flexolmo.tokenizer import train_tokenizer
    from synthetic import synthetic_docs
    if not minilm_available():
        pytest.skip("needs the sentence embedder")
    seed = int(torch.seed() % 2**31)
    own = {"stars": synthetic_docs("star planet orbit comet galaxy nebula telescope moon", 30, seed),
           "food": synthetic_docs("bread butter cheese soup onion garlic pepper salt", 30, seed + 1)}
    public = (synthetic_docs("river mountain forest valley meadow lake hill stone", 40, seed + 2)
              + own["stars"][:3] + own["food"][:3])
    owners = {"stars": own["stars"][3:], "food": own["food"][3:]}
    tok = train_tokenizer(public + owners["stars"] + owners["food"], vocab_size=300)
    cfg = RouterTuningConfig(public_docs=4, owner_embed_docs=8)
    ranks = owner_rankings(tok, public, owners, cfg)
    last = {n: 0 for n in owners}
    for fraction in (0.01, 0.05, 0.2):
        c = dataclasses.replace(cfg, proxy_fraction=fraction)
        s1, i1 = tuning_streams(tok, public, owners, c, rankings=ranks)
        s2, i2 = tuning_streams(tok, public, owners, c)
        assert i1 == i2 and all(torch.equal(s1[k], s2[k]) for k in s2)
        for n, info in i1.items():
            assert info["budget_bytes"] == int(fraction * sum(len(d.encode()) for d in owners[n]))
            assert info["proxy_bytes"] <= info["budget_bytes"] or info["proxy_docs"] == 1
            assert info["proxy_bytes"] >= last[n]
            last[n] = info["proxy_bytes"]
    # the planted public documents (the owner's own words) rank first
    top = ranks["stars"].scores.argsort(descending=True)[:3].tolist()
    assert set(top) == {40, 41, 42}
