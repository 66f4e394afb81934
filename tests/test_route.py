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
