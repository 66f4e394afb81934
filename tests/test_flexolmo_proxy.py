"""Proxy-set selection: the owner-vs-public classifier and the size budget."""
import pytest
import torch

from flexkern.flexolmo.proxy import fit_logistic, proxy_budget, select_by_score, select_proxy_set


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
    assert select_by_score(torch.tensor([-1.0, -2.0, 1.0, -0.5]), [10] * 4, 100) == [2]  # only owner-side ones
    assert select_by_score(torch.tensor([-1.0, -2.0]), [10, 10], 100) == [0]
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
    """min_score=-inf ranks every document (the paper's top-scoring public documents); the default
    keeps only those the classifier puts on the owner's side, falling back to the single top one."""
    scores = torch.tensor([-0.5, -2.0, -0.1, -3.0])
    sizes = [10, 10, 10, 10]
    assert select_by_score(scores, sizes, budget=25) == [2]  # none above 0: the top one
    assert select_by_score(scores, sizes, budget=25, min_score=float("-inf")) == [0, 2]
