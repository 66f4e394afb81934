"""route: gating semantics, gradients and bad input on the reference backend."""
import pytest
import torch

import flexkern


def make(T=12, D=8, E=6, dtype=torch.float64):
    return torch.randn(T, D, dtype=dtype), torch.randn(E, D, dtype=dtype), torch.randn(E, dtype=dtype)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_route_matches_softmax_then_topk(renormalize, mask_mode):
    x, r, b = make()
    mask = torch.tensor([True, False, True, True, False, True])
    w, e, logits = flexkern.route(x, r, 2, b, mask, mask_mode, renormalize)
    assert w.dtype == torch.float64 and e.dtype == torch.int32 and logits.shape == (12, 6)
    torch.testing.assert_close(logits, x @ r.T + b, rtol=1e-12, atol=1e-12)
    masked_logits = logits.masked_fill(~mask, float("-inf")) if mask_mode == "reroute" else logits
    p = torch.softmax(masked_logits, -1)
    pw, pe = p.topk(2, -1)
    if renormalize:
        pw = pw / pw.sum(-1, keepdim=True)
    torch.testing.assert_close(w, pw, rtol=1e-12, atol=1e-12)
    assert torch.equal(e.long(), pe)
    if mask_mode == "reroute":
        assert bool(mask[e.long()].all())


def test_ties_go_to_the_lower_expert_id():
    x = torch.zeros(3, 4)
    r = torch.randn(5, 4)
    w, e, _ = flexkern.route(x, r, 3)  # all logits equal
    assert e.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 0.2))


def test_nan_logits_give_in_range_ids():
    x = torch.randn(4, 4)
    x[1] = float("nan")
    _, e, _ = flexkern.route(x, torch.randn(6, 4), 2)
    assert bool(((e >= 0) & (e < 6)).all())


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_gradcheck(renormalize):
    x, r, b = make(T=5, D=4, E=5)
    x.requires_grad_(), r.requires_grad_(), b.requires_grad_()
    mask = torch.tensor([True, True, False, True, True])

    def f(x, r, b):
        w, _, logits = flexkern.route(x, r, 3, b, mask, "reroute", renormalize)
        return w, logits

    assert torch.autograd.gradcheck(f, (x, r, b))


def test_route_empty_batch():
    w, e, logits = flexkern.route(torch.randn(0, 8), torch.randn(4, 8), 2)
    assert w.shape == (0, 2) and e.shape == (0, 2) and logits.shape == (0, 4)


def test_route_bad_input():
    x, r, _ = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        flexkern.route(x, r, 7)
    with pytest.raises(ValueError, match="top_k"):
        flexkern.route(x, r, 0)
    with pytest.raises(ValueError, match="width"):
        flexkern.route(x, torch.randn(6, 9), 2)
    with pytest.raises(ValueError, match="dimensions"):
        flexkern.route(x[0], r, 2)
    with pytest.raises(TypeError, match="dtype"):
        flexkern.route(x.long(), r, 2)
    with pytest.raises(ValueError, match="mask_mode"):
        flexkern.route(x, r, 2, mask_mode="skip")
    with pytest.raises(ValueError, match="expert_mask"):
        flexkern.route(x, r, 2, expert_mask_E=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="expert_mask"):
        flexkern.route(x, r, 2, expert_mask_E=torch.ones(6))
    with pytest.raises(ValueError, match="backend"):
        flexkern.route(x, r, 2, backend="fastest")


def test_route_opcheck():
    x, r, b = make(dtype=torch.float32)
    mask = torch.ones(6, dtype=torch.bool)
    args = (x, r, 2, b, mask, True, False, "reference")
    torch.library.opcheck(torch.ops.flexkern.route.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- the router family: sigmoid scoring, score bias, group-limited top-k, routed scaling -------

def deepseek_v3_gate(logits, k, score_bias, n_group, topk_group, renormalize, scaling):
    """DeepSeek-V3's router written out independently (transformers' DeepseekV3TopkRouter)."""
    T, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + score_bias
    group = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group, k=topk_group, dim=-1)[1]
    group_mask = torch.zeros_like(group).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(T, E)
    ids = torch.topk(choice.masked_fill(~score_mask.bool(), float("-inf")), k=k, dim=-1)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, ids


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_sigmoid_group_limited_routing_matches_deepseek_v3(renormalize, n_group, topk_group):
    x, r = torch.randn(64, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    score_bias = torch.randn(16, dtype=torch.float64) * 0.1
    w, e, logits = flexkern.route(x, r, 4, scoring="sigmoid", score_bias_E=score_bias,
                                  n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                                  routed_scaling=2.5)
    w_ds, e_ds = deepseek_v3_gate(x @ r.T, 4, score_bias, n_group, topk_group, renormalize, 2.5)
    assert torch.equal(e.long(), e_ds)  # both in descending choice order
    torch.testing.assert_close(w, w_ds, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, x @ r.T, rtol=1e-12, atol=1e-12)


def test_score_bias_only_selects():
    x, r, _ = make(T=40, E=6)
    plain_w, plain_e, _ = flexkern.route(x, r, 2)
    bias = torch.zeros(6, dtype=torch.float64)
    bias[5] = 10.0  # expert 5 always chosen, with its softmax probability as weight
    w, e, _ = flexkern.route(x, r, 2, score_bias_E=bias)
    assert bool((e[:, 0] == 5).all())
    probs = torch.softmax(x @ r.T, -1)
    torch.testing.assert_close(w[:, 0], probs[:, 5], rtol=1e-12, atol=1e-12)
    assert not torch.equal(e, plain_e)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reroute_mask_equals_deleting_experts(scoring, renormalize):
    """Opt-out is defined for every scoring: a masked expert behaves as if its row were deleted."""
    x, r, b = make(T=30, E=7)
    score_bias = torch.randn(7, dtype=torch.float64) * 0.1
    mask = torch.tensor([True, False, True, True, False, True, True])
    keep = mask.nonzero().flatten()
    kw = dict(scoring=scoring, renormalize=renormalize, routed_scaling=1.5)
    w, e, _ = flexkern.route(x, r, 3, b, mask, score_bias_E=score_bias, **kw)
    w_del, e_del, _ = flexkern.route(x, r[keep], 3, b[keep], score_bias_E=score_bias[keep], **kw)
    torch.testing.assert_close(w, w_del, rtol=1e-12, atol=1e-12)
    assert torch.equal(e.long(), keep[e_del.long()])


def test_group_scores_use_the_active_experts():
    """A group with one active expert is scored by it alone; with none it is chosen last."""
    E, k = 8, 2  # groups {0,1} {2,3} {4,5} {6,7}
    logits = torch.tensor([[0.0, 0.0, 3.0, -9.0, 1.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    x, r = logits, torch.eye(E, dtype=torch.float64)
    mask = torch.tensor([False, False, True, False, True, True, True, True])
    w, e, _ = flexkern.route(x, r, k, None, mask, scoring="sigmoid", n_group=4, topk_group=1)
    s = torch.sigmoid(logits[0])
    # group {2,3} -> sigmoid(3) alone = 0.953 < group {6,7} = 2 * sigmoid(2) = 1.76: {6,7} wins
    assert e.tolist() == [[6, 7]]
    torch.testing.assert_close(w[0], s[[6, 7]])
    mask_all_but_2 = torch.zeros(E, dtype=torch.bool)
    mask_all_but_2[2] = True  # only group {2,3} has an active expert: it is chosen, its 3 masked
    w, e, _ = flexkern.route(x, r, k, None, mask_all_but_2, scoring="sigmoid", n_group=4, topk_group=1)
    assert e.tolist() == [[2, 0]] and float(w[0, 1]) == 0.0
    torch.testing.assert_close(w[0, 0], s[2])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_family_gradcheck(scoring, renormalize):
    x, r, b = make(T=6, D=4, E=8)
    x.requires_grad_(), r.requires_grad_(), b.requires_grad_()
    mask = torch.tensor([True, True, False, True, True, True, True, False])
    score_bias = torch.randn(8, dtype=torch.float64) * 0.1

    def f(x, r, b):
        w, _, logits = flexkern.route(x, r, 3, b, mask, "reroute", renormalize, scoring=scoring,
                                      score_bias_E=score_bias, n_group=4, topk_group=2,
                                      routed_scaling=2.5)
        return w, logits

    assert torch.autograd.gradcheck(f, (x, r, b))


def test_route_family_bad_input():
    x, r, _ = make(E=8, dtype=torch.float32)
    for kw, match in [(dict(scoring="relu"), "scoring"), (dict(n_group=3), "n_group"),
                      (dict(n_group=8), "n_group"), (dict(n_group=4, topk_group=5), "topk_group"),
                      (dict(topk_group=2), "topk_group"), (dict(n_group=4, topk_group=1), "top_k"),
                      (dict(routed_scaling=0.0), "routed_scaling"),
                      (dict(routed_scaling=float("nan")), "routed_scaling"),
                      (dict(n_group=0), "n_group")]:
        with pytest.raises(ValueError, match=match):
            flexkern.route(x, r, 3, **kw)
    with pytest.raises(ValueError, match="score_bias"):
        flexkern.route(x, r, 3, score_bias_E=torch.zeros(7))
    with pytest.raises(TypeError, match="score_bias"):
        flexkern.route(x, r, 3, score_bias_E=torch.zeros(8, dtype=torch.long))


def test_route_family_opcheck():
    x, r, b = make(E=8, dtype=torch.float32)
    mask = torch.ones(8, dtype=torch.bool)
    args = (x, r, 3, b, mask, True, True, "reference", "sigmoid", torch.randn(8) * 0.1, 4, 2, 2.5)
    torch.library.opcheck(torch.ops.flexkern.route.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
