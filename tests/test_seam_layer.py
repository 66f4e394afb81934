"""FlexMoE rules: the public expert stays in slot 0, the mask and frozen flags live in state_dict,
and fewer active experts than top_k is defined (no NaN) the same in eager and compiled code."""
import io

import pytest
import torch

import flexkern
from oracle import moe_per_token


def make_moe(E=4, K=3, dtype=torch.float64, **kw):
    moe = flexkern.FlexMoE(8, 12, E, K, dtype=dtype, **kw)
    with torch.no_grad():
        moe.router.bias.copy_(torch.randn(E, dtype=dtype))
    return moe


def reference(moe, x, top_k=None):
    return moe_per_token(x, moe.router.weight, moe.router.bias, moe.experts.gate_proj,
                         moe.experts.up_proj, moe.experts.down_proj, moe.expert_mask,
                         top_k or moe.top_k, moe.mask_mode, moe.renormalize)


# ------------------------------------------------------------------------------ expert 0

def test_public_expert_cannot_be_removed_but_can_be_masked():
    moe = make_moe(E=4, K=2)
    for index in (0, -4):
        with pytest.raises(ValueError, match="public expert"):
            moe.remove_expert(index)
    assert moe.num_experts == 4
    moe.expert_mask[0] = False
    x = torch.randn(10, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-10, atol=1e-12)
    moe.remove_expert(2)  # any other expert can go; expert 0 keeps slot 0 and its mask
    assert moe.num_experts == 3 and moe.expert_mask.tolist() == [False, True, True]


# ---------------------------------------------------------------------------- state_dict

def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_mask_and_frozen_survive_save_and_load():
    moe = make_moe()
    moe.expert_mask[2] = False
    moe.expert_frozen[1] = True
    state = _roundtrip(moe.state_dict())
    assert state["expert_mask"].tolist() == [True, True, False, True]
    fresh = make_moe()
    fresh.load_state_dict(state)  # strict
    assert fresh.expert_mask.tolist() == [True, True, False, True]
    assert fresh.expert_frozen.tolist() == [False, True, False, False]
    x = torch.randn(7, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), moe(x))  # the opted-out expert stays out


def test_older_state_dicts_without_them_still_load():
    moe = make_moe()
    old = {k: v for k, v in moe.state_dict().items() if k not in ("expert_mask", "expert_frozen")}
    fresh = make_moe()
    result = fresh.load_state_dict(old)  # strict: no missing keys reported
    assert not result.missing_keys
    assert fresh.expert_mask.all() and not fresh.expert_frozen.any()
    # a partial load (router rows only) leaves the current mask alone
    fresh.expert_mask[3] = False
    fresh.load_state_dict({k: v for k, v in old.items() if "router" in k}, strict=False)
    assert fresh.expert_mask.tolist() == [True, True, True, False]


def test_mask_assignment_is_checked():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"expert_frozen must have shape \(4,\)"):
        moe.expert_frozen = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="expert_mask must have shape"):
        moe.expert_mask = torch.ones(5, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        moe.expert_mask = torch.ones(4)
    moe.expert_mask = [True, False, True, True]  # a list of bools is fine
    assert moe.expert_mask.dtype == torch.bool and moe.expert_mask.tolist() == [True, False, True, True]
    idx = moe.add_expert()  # growing keeps the buffers one per expert
    assert idx == 4 and moe.expert_mask.shape == (5,) and moe.expert_frozen.shape == (5,)


# --------------------------------------------------------------- fewer active than top_k

def test_route_with_fewer_active_experts_than_k_has_no_nan():
    x, r = torch.randn(6, 8), torch.randn(5, 8)
    mask = torch.tensor([False, True, False, True, False])
    w, e, _ = flexkern.route(x, r, 4, expert_mask_E=mask)
    assert torch.isfinite(w).all()
    assert mask[e[:, :2].long()].all() and (w[:, 2:] == 0).all()  # the two active ones first
    torch.testing.assert_close(w[:, :2].sum(-1), torch.ones(6))
    w, e, _ = flexkern.route(x, r, 3, expert_mask_E=torch.zeros(5, dtype=torch.bool), renormalize=True)
    assert (w == 0).all() and e.tolist() == [[0, 1, 2]] * 6
    d = flexkern.dispatch(e, 5, torch.zeros(5, dtype=torch.bool))
    assert (d.row_of_slot_TK == -1).all()  # and dispatch with the mask drops every slot


@pytest.mark.parametrize("renormalize", [False, True])
def test_layer_with_fewer_active_experts_equals_top_active(renormalize):
    moe = make_moe(E=4, K=3, renormalize=renormalize)
    moe.expert_mask[1:3] = False
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="weight 0"):
        y = moe(x)
    # the documented result: the slots past the 2 active experts add nothing
    torch.testing.assert_close(y, reference(moe, x, top_k=2), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(moe.z_loss)


def test_every_expert_masked_gives_zeros_and_a_finite_z_loss():
    moe = make_moe(E=3, K=2)
    moe.expert_mask.zero_()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="every expert is masked"):
        y = moe(x)
    assert torch.equal(y, torch.zeros_like(y)) and float(moe.z_loss.detach()) == 0.0
    grads = torch.autograd.grad(y.sum() + moe.z_loss, [x, moe.router.weight, moe.router.bias])
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


@pytest.mark.parametrize("active", [2, 0])
def test_fewer_active_experts_compiled_matches_eager(active):
    torch._dynamo.reset()
    moe = make_moe(E=4, K=3, dtype=torch.float32)
    moe.expert_mask[active:] = False

    def step(x):
        return moe(x), moe.z_loss

    x = torch.randn(2, 6, 8, requires_grad=True)
    with pytest.warns(UserWarning):
        y_e, z_e = step(x)
    compiled = torch.compile(step, fullgraph=True)
    y_c, z_c = compiled(x)
    assert torch.isfinite(y_c).all() and torch.isfinite(z_c)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(z_c, z_e)
    g_c = torch.autograd.grad((y_c ** 2).sum() + z_c, [x, moe.router.weight])
    g_e = torch.autograd.grad((y_e ** 2).sum() + z_e, [x, moe.router.weight])
    for a, b in zip(g_c, g_e):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    moe.expert_mask.zero_()  # a mask change the compiled graph never reads on the host
    y0, z0 = compiled(x)
    assert torch.equal(y0, torch.zeros_like(y0)) and float(z0) == 0.0


def test_z_loss_is_skipped_when_no_gradient_is_wanted():
    moe = make_moe()
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        moe(x)
    assert moe.z_loss is None
    moe(x)
    assert moe.z_loss is not None and moe.z_loss.requires_grad
    assert flexkern.Z_LOSS_WEIGHT == 1e-3


@pytest.mark.gpu
def test_fewer_active_experts_in_a_cuda_graph():
    moe = flexkern.FlexMoE(64, 96, 8, 4, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    moe.expert_mask[2:] = False
    with pytest.warns(UserWarning):
        moe(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = moe(x)
    moe.expert_mask.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.zeros_like(y))
    moe.expert_mask[:2] = True
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, moe(x))


def test_layer_copies_after_a_training_forward():
    import copy
    import pickle

    moe = flexkern.FlexMoE(16, 32, 4, 2)
    moe(torch.randn(5, 16)).sum().backward()
    assert moe.z_loss is not None and moe.z_loss.grad_fn is not None
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert clone.z_loss is None
        x = torch.randn(3, 16)
        torch.testing.assert_close(clone(x), moe(x), rtol=0, atol=0)
    assert moe.z_loss is not None  # the original keeps its own
