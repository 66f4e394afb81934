"""The op and module tests on CUDA: every available backend in fp32/fp16/bf16 against the fp64
CPU reference, with tolerances relative to PyTorch's own error in that dtype."""
import pytest
import torch

import flexkern
from flexkern.ops import backend

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(a, ref):
    return float((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))


def make_layer(T=300, D=64, F=96, E=8, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ws = [torch.randn(E, F, D, generator=g, dtype=torch.float64) / D**0.5,
          torch.randn(E, F, D, generator=g, dtype=torch.float64) / D**0.5,
          torch.randn(E, D, F, generator=g, dtype=torch.float64) / F**0.5]
    r = torch.randn(E, D, generator=g, dtype=torch.float64)
    return x, ws, r


def layer(x, ws, r, k, mask, backend_name, mode="reroute"):
    """The three ops on one backend; an op the backend does not implement uses "auto"."""
    def pick(op):
        return backend_name if backend_name in ("auto", *backend.available(op)) else "auto"

    w, e, _ = flexkern.route(x, r, k, None, mask, mode, backend=pick("route"))
    d = flexkern.dispatch(e, r.shape[0], mask, backend=pick("dispatch"), validate=False)
    return flexkern.experts_swiglu(x, *ws, d, w, backend=pick("experts_swiglu")), e


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["reference", "auto", "triton"])
@pytest.mark.parametrize("mode", ["reroute", "drop"])
def test_layer_on_cuda(dtype, name, mode):
    if name == "triton" and "triton" not in backend.available("experts_swiglu"):
        pytest.skip("triton backend not available")
    x, ws, r = make_layer()
    mask = torch.ones(8, dtype=torch.bool)
    mask[[2, 5]] = False
    ref, e_ref = layer(x, ws, r, 2, mask, "reference", mode)
    xc, wc, rc = x.cuda().to(dtype), [w.cuda().to(dtype) for w in ws], r.cuda().to(dtype)
    got, e_got = layer(xc, wc, rc, 2, mask.cuda(), name, mode)
    torch.cuda.synchronize()
    # PyTorch's own error in this dtype: the reference op run on CUDA in dtype.
    plain, _ = layer(xc, wc, rc, 2, mask.cuda(), "reference", mode)
    same_route = (e_got.cpu() == e_ref).all(-1)  # low precision may flip near-ties
    assert float(same_route.float().mean()) > 0.95
    err = rel_err(got[same_route.cuda()], ref[same_route])
    base = rel_err(plain[same_route.cuda()], ref[same_route])
    assert err <= 2 * base + 1e-6, (err, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_forward_backward_on_cuda(dtype):
    torch.manual_seed(0)
    moe = flexkern.FlexMoE(64, 96, 8, 2)
    x = torch.randn(4, 50, 64)
    moe_c = flexkern.FlexMoE(64, 96, 8, 2, device="cuda", dtype=dtype)
    moe_c.load_state_dict({k: v.to(dtype) for k, v in moe.state_dict().items()})
    xc = x.cuda().to(dtype).requires_grad_()
    y = moe_c(xc)
    y.float().square().sum().backward()
    assert torch.isfinite(xc.grad).all() and torch.isfinite(moe_c.experts.gate_proj.grad).all()
    moe_c.expert_mask[3] = False
    assert torch.isfinite(moe_c(xc)).all()


def test_module_cuda_graph_capture():
    moe = flexkern.FlexMoE(64, 96, 8, 2, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    moe(x)  # warm up (compiles kernels, checks the mask once)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = moe(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, moe(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_family_module_on_cuda(dtype):
    """FlexMoE with DeepSeek-V3 gating (sigmoid, score bias, groups, scaling), a gated shared
    expert and a mask, on the fast backends against the float64 CPU layer; the error is bounded
    by the reference backend's own on CUDA in that dtype. Losses and counts stay on the device."""
    kw = dict(scoring="sigmoid", n_group=4, topk_group=2, routed_scaling=2.5, renormalize=True,
              score_bias=True, shared_d_ff=48, shared_gate=True, router_bias=False)
    torch.manual_seed(0)
    ref = flexkern.FlexMoE(64, 96, 16, 4, dtype=torch.float64, **kw)
    with torch.no_grad():
        ref.score_bias.normal_(0, 0.05)
    ref.expert_mask[[3, 9]] = False
    x = torch.randn(300, 64, dtype=torch.float64)
    want = ref(x)

    def routes(layer, inp):
        _, e, _ = flexkern.route(inp.reshape(-1, 64), layer.router.weight, layer.top_k, None,
                                 layer.expert_mask, renormalize=True, backend=layer.backend,
                                 **layer._gating())
        return e.sort(-1).values.cpu()

    outs, same = {}, torch.ones(300, dtype=torch.bool)
    e_ref = routes(ref, x)
    for name in ("reference", None):
        moe = flexkern.FlexMoE(64, 96, 16, 4, device="cuda", dtype=dtype, backend=name, **kw)
        moe.load_state_dict({k: v.to(dtype) if v.is_floating_point() and k != "score_bias" else v
                             for k, v in ref.state_dict().items()})
        xc = x.cuda().to(dtype).requires_grad_()
        outs[name] = moe(xc)
        outs[name].float().square().sum().backward()
        assert torch.isfinite(xc.grad).all()
        assert moe.tokens_per_expert.is_cuda and int(moe.tokens_per_expert[[3, 9]].sum()) == 0
        assert moe.load_balancing_loss.is_cuda and moe.sequence_balance_loss.is_cuda
        same &= (routes(moe, xc.detach()) == e_ref).all(-1)  # low precision may flip near-ties
    assert float(same.float().mean()) > 0.95
    rows = same.cuda()
    err, base = rel_err(outs[None][rows], want[same]), rel_err(outs["reference"][rows], want[same])
    assert err <= 2 * base + 1e-6, (err, base)
