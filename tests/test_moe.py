"""FlexMoE: the public module contract against an independent per-token implementation."""
import pytest
import torch
import torch.utils._python_dispatch
from hypothesis import given, settings, strategies as st

import flexkern
from flexkern.nn.balance import z_loss
from oracle import moe_per_token


def make_moe(D=8, F=12, E=5, K=2, dtype=torch.float64, **kw):
    moe = flexkern.FlexMoE(D, F, E, K, dtype=dtype, **kw)
    with torch.no_grad():  # non-trivial biases, some positive (clamped away) and some negative
        if moe.router.bias is not None:
            moe.router.bias.copy_(torch.randn(E, dtype=dtype))
        moe.router.weight.mul_(20)
        for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            w.mul_(10)
    return moe


def oracle(moe, x):
    return moe_per_token(
        x.reshape(-1, moe.d_model), moe.router.weight, moe.router.bias, moe.experts.gate_proj,
        moe.experts.up_proj, moe.experts.down_proj, moe.expert_mask, moe.top_k, moe.mask_mode,
        moe.renormalize,
    ).view(x.shape)


def assert_rel(a, b, tol=1e-10):
    err = float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))
    assert err <= tol, err


@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("router_bias", [True, False])
def test_module_matches_independent_implementation(mask_mode, renormalize, router_bias):
    moe = make_moe(mask_mode=mask_mode, renormalize=renormalize, router_bias=router_bias)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    assert_rel(moe(x), oracle(moe, x))
    moe.expert_mask[2] = False  # opt-out at run time, no rebuild
    assert_rel(moe(x), oracle(moe, x))


def test_reroute_mask_equals_deleting_the_expert():
    moe = make_moe(E=6, K=2)
    x = torch.randn(40, 8, dtype=torch.float64)
    moe.expert_mask[4] = False
    masked = moe(x)
    moe.remove_expert(4)
    assert moe.num_experts == 5 and moe.experts.down_proj.shape == (5, 8, 12)
    torch.testing.assert_close(moe(x), masked, rtol=1e-12, atol=1e-12)


def test_drop_mode_keeps_routing_and_zeroes_masked_slots():
    moe = make_moe(E=4, K=2, mask_mode="drop")
    x = torch.randn(30, 8, dtype=torch.float64)
    full = moe(x)
    moe.expert_mask[1] = False
    dropped = moe(x)
    assert_rel(dropped, oracle(moe, x))
    _, experts, _ = flexkern.route(x, moe.router.weight, 2, moe.effective_bias())
    untouched = ~(experts == 1).any(-1)  # tokens that never chose expert 1 are unchanged
    torch.testing.assert_close(dropped[untouched], full[untouched], rtol=0, atol=0)


@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_nan_poisoned_masked_experts_do_not_change_anything(mask_mode):
    moe = make_moe(E=5, K=2, mask_mode=mask_mode)
    moe.expert_mask[[1, 3]] = False
    x = torch.randn(25, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    with torch.no_grad():
        for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            w[[1, 3]] = float("nan")
    y2 = moe(x)
    (gx2,) = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)


def test_z_loss_of_last_forward():
    moe = make_moe()
    x = torch.randn(10, 8, dtype=torch.float64)
    moe(x)
    logits = x @ moe.router.weight.T + moe.effective_bias()
    torch.testing.assert_close(moe.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    moe.expert_mask[0] = False
    moe(x)
    torch.testing.assert_close(moe.z_loss, (torch.logsumexp(logits[:, 1:], -1) ** 2).mean())


def test_public_expert_has_no_bias():
    moe = make_moe(E=3)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([-5.0, 3.0, -2.0], dtype=torch.float64))
    assert moe.effective_bias().tolist() == [0.0, 0.0, -2.0]


def _former_forward(moe, x):
    """FlexMoE's forward as it was written before the inference extras were removed (zeros + clamp
    + cat bias, router ``where`` and z-loss whenever grad mode is on): the bit-exact reference."""
    w, b, frozen, mask = moe.router.weight, moe.router.bias, moe.expert_frozen, moe.expert_mask
    bias = torch.cat([b.new_zeros(1), torch.clamp(b[1:], max=0)])
    router = torch.where(frozen[:, None], w.detach(), w)
    bias = torch.where(frozen, bias.detach(), bias)
    weights, experts, logits = flexkern.route(x, router, moe.top_k, bias, mask, moe.mask_mode,
                                              moe.renormalize)
    disp = flexkern.dispatch(experts, moe.num_experts, mask)
    y = flexkern.experts_swiglu(x, moe.experts.gate_proj, moe.experts.up_proj,
                                moe.experts.down_proj, disp, weights, frozen)
    return y, z_loss(logits, mask, moe.mask_mode == "reroute")


@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_forward_and_gradients_bit_identical_to_the_former_formula(mask_mode):
    moe = make_moe(E=5, K=2, dtype=torch.float32, mask_mode=mask_mode)
    with torch.no_grad():  # expert 0's bias negative (ignored), a zero (clamp edge) and a -0.0
        moe.router.bias.copy_(torch.tensor([-3.0, 0.0, -0.0, 1.5, -0.7]))
    moe.expert_frozen[1] = True
    moe.expert_mask[3] = False
    x = torch.randn(13, 8, requires_grad=True)
    params = [x, moe.router.weight, moe.router.bias, moe.experts.gate_proj, moe.experts.up_proj,
              moe.experts.down_proj]
    dy = torch.randn(13, 8)
    y = moe(x)
    z = moe.z_loss
    y_old, z_old = _former_forward(moe, x)
    assert torch.equal(y, y_old) and torch.equal(z, z_old)
    got = torch.autograd.grad((y * dy).sum() + z, params)
    want = torch.autograd.grad((y_old * dy).sum() + z_old, params)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert float(got[2][0]) == 0.0  # expert 0's bias: no gradient
    assert bool((got[1][1] == 0).all())  # frozen router row
    # Without gradient: the same output, and no z-loss.
    with torch.no_grad():
        assert torch.equal(moe(x), y_old) and moe.z_loss is None
    for p in moe.parameters():
        p.requires_grad_(False)
    assert torch.equal(moe(x.detach()), y_old.detach()) and moe.z_loss is None
    moe(x)  # the input wants a gradient: the z-loss has one
    assert moe.z_loss is not None and moe.z_loss.requires_grad


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The top-level ops a forward runs (a custom op counts once, its insides not at all)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__ if func.namespace == "aten" else str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("router_bias", [True, False])
def test_inference_forward_runs_no_router_extras(router_bias):
    """A forward without gradient runs the bias clamp/fill and the route op, no ``where`` and no
    z-loss (no_grad, and grad mode with nothing requiring grad)."""
    moe = make_moe(dtype=torch.float32, router_bias=router_bias)
    moe.expert_frozen[1] = True
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        moe(x)  # the mask check reads the mask once after each change; not part of the count
    want = ["view"] + (["clamp", "slice", "zero_"] if router_bias else []) + [
        "flexkern.route.default", "flexkern.dispatch.default", "flexkern.experts_swiglu.default", "view"]
    with torch.no_grad(), _CountOps() as counted:
        moe(x)
    assert counted.ops == want
    for p in moe.parameters():
        p.requires_grad_(False)
    with _CountOps() as counted:
        moe(x)
    assert counted.ops == want


def test_gradients_match_oracle_gradients():
    moe = make_moe(E=4, K=2)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    params = [x, moe.router.weight, moe.router.bias, moe.experts.gate_proj, moe.experts.up_proj,
              moe.experts.down_proj]
    dy = torch.randn(6, 8, dtype=torch.float64)
    got = torch.autograd.grad(moe(x), params, dy)
    want = torch.autograd.grad(oracle(moe, x), params, dy)
    for g, w in zip(got, want):
        assert_rel(g, w, 1e-9)


def test_frozen_expert_and_router_row_get_no_gradient():
    moe = make_moe(E=2, K=2)
    moe.expert_frozen[0] = True
    moe(torch.randn(12, 8, dtype=torch.float64)).sum().backward()
    for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        assert bool((w.grad[0] == 0).all()) and bool((w.grad[1] != 0).any())
    assert bool((moe.router.weight.grad[0] == 0).all()) and bool((moe.router.weight.grad[1] != 0).any())


def test_gradcheck_module():
    moe = make_moe(D=4, F=5, E=3, K=2)
    with torch.no_grad():
        moe.router.weight.div_(20)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe, (x,))


def test_empty_batch_and_single_token():
    moe = make_moe()
    y = moe(torch.randn(0, 8, dtype=torch.float64, requires_grad=True))
    assert y.shape == (0, 8)
    y.sum().backward()
    x = torch.randn(1, 1, 8, dtype=torch.float64)
    assert_rel(moe(x), oracle(moe, x))


def test_add_and_remove_expert():
    moe = make_moe(E=3, K=2)
    x = torch.randn(20, 8, dtype=torch.float64)
    before = moe(x)
    idx = moe.add_expert(router_row=torch.zeros(8, dtype=torch.float64), bias=-1e4)  # never chosen
    assert idx == 3 and moe.num_experts == 4
    assert moe.router.bias.shape == (4,) and moe.expert_mask.shape == (4,)
    torch.testing.assert_close(moe(x), before, rtol=1e-12, atol=1e-12)
    moe.remove_expert(3)
    assert moe.experts.gate_proj.shape == (3, 12, 8)
    with pytest.raises(ValueError, match="public expert"):
        moe.remove_expert(0)
    with pytest.raises(ValueError, match="public expert"):
        moe.remove_expert(-3)
    moe.remove_expert(2)
    with pytest.raises(ValueError, match="fewer than top_k"):
        moe.remove_expert(1)
    with pytest.raises(ValueError, match="shape"):
        moe.add_expert(gate_proj=torch.zeros(3, 3))


@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_compile_fullgraph_matches_eager(mask_mode):
    torch._dynamo.reset()
    moe = make_moe(dtype=torch.float32, mask_mode=mask_mode)
    moe.expert_mask[1] = False
    x = torch.randn(2, 9, 8, requires_grad=True)

    def step(x):
        y = moe(x)
        return y, moe.z_loss

    y_e, z_e = step(x)
    g_e = torch.autograd.grad((y_e ** 2).sum() + z_e, [x, moe.router.weight, moe.experts.up_proj])
    compiled = torch.compile(step, fullgraph=True)
    y_c, z_c = compiled(x)
    g_c = torch.autograd.grad((y_c ** 2).sum() + z_c, [x, moe.router.weight, moe.experts.up_proj])
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(z_c, z_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
    moe.expert_mask[1] = True  # a mask change needs no recompile and is honoured
    torch.testing.assert_close(compiled(x)[0], moe(x))


def test_bad_module_input():
    moe = flexkern.FlexMoE(8, 12, 4, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        moe(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moe([1.0] * 8)
    moe.expert_mask[:3] = False
    with pytest.warns(UserWarning, match="fewer than top_k"):  # defined (weight 0), so only a warning
        assert bool(torch.isfinite(moe(torch.randn(3, 8))).all())
    moe.mask_mode = "drop"
    assert moe(torch.randn(3, 8)).shape == (3, 8)  # drop mode needs no minimum
    with pytest.raises(ValueError, match="top_k"):
        flexkern.FlexMoE(8, 12, 4, 5)
    with pytest.raises(ValueError, match="mask_mode"):
        flexkern.FlexMoE(8, 12, 4, 2, mask_mode="off")
    with pytest.raises(ValueError, match="d_ff"):
        flexkern.FlexMoE(8, 0, 4, 2)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 12), D=st.integers(1, 6), F=st.integers(1, 6), E=st.integers(1, 6), data=st.data())
def test_module_property(T, D, F, E, data):
    K = data.draw(st.integers(1, E))
    mode = data.draw(st.sampled_from(["reroute", "drop"]))
    mask = data.draw(st.lists(st.booleans(), min_size=E, max_size=E))
    if mode == "reroute" and sum(mask) < K:
        mask = [True] * E
    moe = make_moe(D, F, E, K, mask_mode=mode, renormalize=data.draw(st.booleans()))
    moe.expert_mask.copy_(torch.tensor(mask))
    x = torch.randn(T, D, dtype=torch.float64)
    assert_rel(moe(x), oracle(moe, x)) if T else None


def test_recompute_activations_gives_the_same_gradients():
    moe = make_moe(E=4, K=2)
    x = torch.randn(15, 8, dtype=torch.float64, requires_grad=True)
    params = [x, moe.router.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj]
    dy = torch.randn(15, 8, dtype=torch.float64)
    saved = torch.autograd.grad(moe(x), params, dy)
    moe.recompute_activations = True
    recomputed = torch.autograd.grad(moe(x), params, dy)
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
