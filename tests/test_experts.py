"""experts_swiglu: the reference grouped MLP against a per-token oracle, gradients, edge cases."""
import pytest
import torch

import flexkern
from flexkern.ops import backend, experts_bwd_ref, experts_fwd_ref
from oracle import moe_per_token


def make(T, D, F, E, K, dtype=torch.float64, mask=None):
    x = torch.randn(T, D, dtype=dtype)
    ws = [torch.randn(E, F, D, dtype=dtype) / D**0.5, torch.randn(E, F, D, dtype=dtype) / D**0.5,
          torch.randn(E, D, F, dtype=dtype) / F**0.5]
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32) if T else \
        torch.empty(0, K, dtype=torch.int32)
    weights = torch.rand(T, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, ws, experts, weights, flexkern.dispatch(experts, E, mask)


def per_slot_oracle(x, ws, experts, weights, mask=None):
    """y_t = sum_k w_tk * FFN_{e_tk}(x_t), skipping masked experts; written per token."""
    y = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            if mask is not None and not mask[e]:
                continue
            g = ws[0][e].double() @ x[t].double()
            h = g * torch.sigmoid(g) * (ws[1][e].double() @ x[t].double())
            y[t] += float(weights[t, k]) * (ws[2][e].double() @ h)
    return y


@pytest.mark.parametrize("T,D,F,E,K", [(0, 4, 6, 3, 2), (1, 4, 6, 3, 2), (13, 8, 12, 5, 2), (9, 6, 4, 4, 4)])
@pytest.mark.parametrize("sync_free", [False, True])
def test_forward_matches_oracle(T, D, F, E, K, sync_free):
    mask = torch.rand(E) > 0.3
    x, ws, experts, weights, d = make(T, D, F, E, K, mask=mask)
    y, g, u = experts_fwd_ref(x, *ws, *d.tensors(), weights, None, sync_free=sync_free)
    torch.testing.assert_close(y, per_slot_oracle(x, ws, experts, weights, mask), rtol=1e-10, atol=1e-10)
    assert g.shape == u.shape == (0, F)  # nothing saved unless asked


@pytest.mark.parametrize("sync_free", [False, True])
def test_saved_activations_are_the_preactivations_and_give_the_same_backward(sync_free):
    E, F = 5, 7
    mask = torch.tensor([True, False, True, True, True])
    x, ws, experts, weights, d = make(11, 6, F, E, 2, mask=mask)
    y0, _, _ = experts_fwd_ref(x, *ws, *d.tensors(), weights, None, sync_free=sync_free)
    y, g, u = experts_fwd_ref(x, *ws, *d.tensors(), weights, None, sync_free=sync_free,
                              save_activations=True)
    assert torch.equal(y, y0) and g.shape == u.shape == (d.token_of_row_N.shape[0], F)
    offs = d.offsets_E1.tolist()
    for e in range(E):
        x_rD = x[d.token_of_row_N[offs[e]:offs[e + 1]].long()]
        torch.testing.assert_close(g[offs[e]:offs[e + 1]], x_rD @ ws[0][e].t(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u[offs[e]:offs[e + 1]], x_rD @ ws[1][e].t(), rtol=1e-12, atol=1e-12)
    # rows past offsets[E] are never read by the backward
    g[offs[-1]:], u[offs[-1]:] = float("nan"), float("nan")
    dy = torch.randn_like(x)
    frozen = torch.tensor([False, False, True, False, False])
    recomputed = experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, frozen, sync_free=sync_free)
    loaded = experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, frozen, sync_free=sync_free, g_NF=g, u_NF=u)
    for a, b in zip(recomputed, loaded):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="both"):
        experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, None, g_NF=g)
    with pytest.raises(ValueError, match="shape"):
        experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, None, g_NF=g[:3], u_NF=u[:3])


def test_public_op_saves_activations_only_when_a_gradient_is_wanted(monkeypatch):
    x, ws, experts, weights, d = make(5, 4, 6, 3, 2)
    seen = []

    def spy(*args, save_activations):
        seen.append(save_activations)
        return experts_fwd_ref(*args, save_activations=save_activations)

    monkeypatch.setitem(backend._REGISTRY["experts_swiglu"], "reference", spy)
    flexkern.experts_swiglu(x, *ws, d, weights, backend="reference")
    w = weights.clone().requires_grad_()
    with torch.no_grad():
        flexkern.experts_swiglu(x, *ws, d, w, backend="reference")
    y = flexkern.experts_swiglu(x, *ws, d, w, backend="reference")
    assert seen == [False, False, True]
    assert y.requires_grad
    y.sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize("sync_free", [False, True])
def test_gradcheck(sync_free):
    x, ws, experts, weights, d = make(7, 4, 5, 4, 2, mask=torch.tensor([True, True, False, True]))
    inputs = [t.requires_grad_() for t in (x, *ws, weights)]

    # gradcheck the custom op's registered backward (through the public function) ...
    assert torch.autograd.gradcheck(
        lambda x, wg, wu, wd, w: flexkern.experts_swiglu(x, wg, wu, wd, d, w), inputs)
    # ... and that both formulations of the reference backward agree with it
    dy = torch.randn_like(x)
    a = experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, None, sync_free=sync_free)
    b = torch.autograd.grad(flexkern.experts_swiglu(*inputs[:4], d, inputs[4]), inputs, dy)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sync_free", [False, True])
def test_frozen_experts_get_zero_weight_gradients(sync_free):
    E = 4
    x, ws, experts, weights, d = make(20, 6, 8, E, 2)
    frozen = torch.tensor([True, False, False, True])
    dy = torch.randn_like(x)
    full = experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, None, sync_free=sync_free)
    part = experts_bwd_ref(dy, x, *ws, *d.tensors(), weights, frozen, sync_free=sync_free)
    for i in (1, 2, 3):
        assert bool((part[i][frozen] == 0).all())
        torch.testing.assert_close(part[i][~frozen], full[i][~frozen], rtol=0, atol=0)
    for i in (0, 4):  # dx and d weights do not depend on freezing
        torch.testing.assert_close(part[i], full[i], rtol=0, atol=0)


@pytest.mark.parametrize("sync_free", [False, True])
def test_masked_experts_are_never_read(sync_free):
    E = 5
    mask = torch.tensor([True, False, True, False, True])
    x, ws, experts, weights, d = make(16, 6, 8, E, 2, mask=mask)
    clean, _, _ = experts_fwd_ref(x, *ws, *d.tensors(), weights, None, sync_free=sync_free)
    poisoned = [w.clone() for w in ws]
    for w in poisoned:
        w[~mask] = float("nan")
    y, g, u = experts_fwd_ref(x, *poisoned, *d.tensors(), weights, None, sync_free=sync_free,
                              save_activations=True)
    assert torch.equal(y, clean)
    for gu in ({}, dict(g_NF=g, u_NF=u)):
        grads = experts_bwd_ref(torch.randn_like(x), x, *poisoned, *d.tensors(), weights, None,
                                sync_free=sync_free, **gu)
        for dw in grads:
            assert bool(torch.isfinite(dw).all())


def rel_err(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_is_bounded_by_torch_own_error(dtype):
    x, ws, experts, weights, d = make(64, 32, 48, 6, 2, dtype=torch.float32)
    ref = per_slot_oracle(x, ws, experts, weights)
    y = flexkern.experts_swiglu(x.to(dtype), *(w.to(dtype) for w in ws), d, weights)
    assert y.dtype == dtype
    # "Plain torch in that dtype": the same math with every matmul in dtype, the combine in fp32.
    plain = torch.zeros(64, 32)
    for t in range(64):
        for k in range(2):
            e = int(experts[t, k])
            xt = x[t].to(dtype)
            h = torch.nn.functional.silu(ws[0][e].to(dtype) @ xt) * (ws[1][e].to(dtype) @ xt)
            plain[t] += weights[t, k] * (ws[2][e].to(dtype) @ h).float()
    assert rel_err(y, ref) <= 2 * rel_err(plain.to(dtype), ref) + 1e-6


def test_bad_expert_input():
    x, ws, experts, weights, d = make(5, 4, 6, 3, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match="w_gate"):
        flexkern.experts_swiglu(x, ws[0].double(), ws[1], ws[2], d, weights)
    with pytest.raises(ValueError, match="w_down"):
        flexkern.experts_swiglu(x, ws[0], ws[1], ws[2].transpose(1, 2), d, weights)
    with pytest.raises(ValueError, match="width"):
        flexkern.experts_swiglu(torch.randn(5, 5), *ws, d, weights)
    with pytest.raises(ValueError, match="row_of_slot"):
        flexkern.experts_swiglu(x, *ws, d, weights[:, :1])
    with pytest.raises(ValueError, match="weights"):
        flexkern.experts_swiglu(x, *ws, d, weights[:4])
    with pytest.raises(TypeError, match="Dispatch"):
        flexkern.experts_swiglu(x, *ws, d.tensors(), weights)
    with pytest.raises(ValueError, match="offsets"):
        flexkern.experts_swiglu(x, *(w[:2] for w in ws), d, weights)


@pytest.mark.parametrize("save", [True, False])
def test_experts_opcheck(save):
    x, ws, experts, weights, d = make(6, 4, 6, 3, 2, dtype=torch.float32)
    args = (x, *ws, *d.tensors(), weights, None, "reference", save)
    torch.library.opcheck(torch.ops.flexkern.experts_swiglu.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    _, g, u = torch.ops.flexkern.experts_swiglu(*args)
    gu = (g, u) if save else (None, None)
    torch.library.opcheck(torch.ops.flexkern.experts_swiglu_backward.default,
                          (torch.randn_like(x), *args[:-1], *gu), test_utils=("test_schema", "test_faketensor"))
