"""Triton experts_swiglu kernels compiled on CUDA: bf16/fp16/fp32 against the fp64 reference with
tolerances relative to PyTorch's own error in the dtype, determinism, CUDA-graph capture, and
row offsets past 2^31 elements. Each config regime of the launch table (decode, medium, large rows
per expert) is exercised once in bf16."""
import pytest
import torch

from flexkern.ops import Dispatch, backend, dispatch_ref, experts_bwd_ref, experts_fwd_ref

pytestmark = pytest.mark.gpu
NAMES = ("y", "dx", "d_w_gate", "d_w_up", "d_w_down", "d_weights")


def triton_fns():
    if "triton" not in backend.available("experts_swiglu"):
        pytest.skip("triton backend not registered")
    dev = torch.device("cuda")
    return (backend.lookup("experts_swiglu", "triton", dev)[1],
            backend.lookup("experts_swiglu_backward", "triton", dev)[1])


def random_experts(T, E, K, device="cpu"):
    return torch.rand(T, E, device=device).argsort(-1)[:, :K].to(torch.int32)


def make_case(T, D, F, E, K, mask_E=None, frozen_E=None):
    """fp64 CPU inputs plus the dispatch; idle experts (no rows) get NaN weights in the kernel run."""
    d = Dispatch(*dispatch_ref(random_experts(T, E, K), E, mask_E))
    ws = [torch.randn(E, F, D, dtype=torch.float64) / D**0.5,
          torch.randn(E, F, D, dtype=torch.float64) / D**0.5,
          torch.randn(E, D, F, dtype=torch.float64) / F**0.5]
    return dict(x=torch.randn(T, D, dtype=torch.float64), ws=ws, d=d, weights=torch.rand(T, K),
                dy=torch.randn(T, D, dtype=torch.float64), frozen=frozen_E,
                idle=d.offsets_E1[1:] == d.offsets_E1[:-1])


def rounded(case, dtype):
    """The case with x, weights and dy rounded to dtype (kept in fp64): every run sees one input."""
    r = lambda t: t.to(dtype).double()
    return dict(case, x=r(case["x"]), ws=[r(w) for w in case["ws"]], dy=r(case["dy"]))


def run(case, fwd, bwd, dtype, device, nan_idle, saved):
    ws = [w.to(device, dtype) for w in case["ws"]]
    if nan_idle:
        ws = [torch.where(case["idle"].to(device)[:, None, None], float("nan"), w) for w in ws]
    d = [t.to(device) for t in case["d"].tensors()]
    w = case["weights"].to(device)
    frozen = None if case["frozen"] is None else case["frozen"].to(device)
    x = case["x"].to(device, dtype)
    y, g, u = fwd(x, *ws, *d, w, frozen, save_activations=saved)
    gu = dict(g_NF=g, u_NF=u) if saved else {}  # saved: the backward loads g, u
    grads = bwd(case["dy"].to(device, dtype), x, *ws, *d, w, frozen, **gu)
    return [t.double().cpu() for t in (y, *grads)]


def rel_err(a, ref):
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,regime", [
    (torch.bfloat16, "decode"), (torch.bfloat16, "medium"), (torch.bfloat16, "large"),
    (torch.float16, "medium"), (torch.float32, "medium"),
])
@pytest.mark.parametrize("saved", [True, False])
def test_triton_vs_reference_relative_to_torch(dtype, regime, saved, monkeypatch):
    monkeypatch.setenv("FLEXKERN_TRITON_POISON", "1")
    fwd, bwd = triton_fns()
    E = 8
    mask = torch.ones(E, dtype=torch.bool)
    mask[[1, 6]] = False  # drop mode: these experts get no rows and NaN weights
    frozen = torch.zeros(E, dtype=torch.bool)
    frozen[[0, 3]] = True
    shape = {"decode": dict(T=7, D=256, F=192), "medium": dict(T=300, D=200, F=296),
             "large": dict(T=1100, D=512, F=384)}[regime]
    case = rounded(make_case(E=E, K=2, mask_E=mask, frozen_E=frozen, **shape), dtype)
    got = run(case, fwd, bwd, dtype, "cuda", nan_idle=True, saved=saved)
    plain = run(case, experts_fwd_ref, experts_bwd_ref, dtype, "cuda", nan_idle=False, saved=saved)
    ref = run(case, experts_fwd_ref, experts_bwd_ref, torch.float64, "cpu", nan_idle=False, saved=saved)
    torch.cuda.synchronize()
    for name, g, p, r in zip(NAMES, got, plain, ref):
        assert bool(torch.isfinite(g).all()), name
        err, base = rel_err(g, r), rel_err(p, r)
        assert err <= 2 * base + 1e-6, f"{name}: rel err {err:.3g} vs torch {base:.3g}"
    for g in got[2:5]:
        assert bool((g[[0, 1, 3, 6]] == 0).all())  # frozen and masked experts: zero dW


def test_deterministic_and_cuda_graph_capture():
    """Forward + backward captured in one CUDA graph: replays with new routing and inputs match
    eager runs bit for bit (no host sync, no data-dependent allocation, no atomics)."""
    fwd, bwd = triton_fns()
    T, D, F, E, K, dt = 257, 128, 192, 8, 2, torch.bfloat16
    dev = "cuda"
    ws = [(torch.randn(E, F, D, device=dev) / D**0.5).to(dt), (torch.randn(E, F, D, device=dev) / D**0.5).to(dt),
          (torch.randn(E, D, F, device=dev) / F**0.5).to(dt)]
    mask = torch.ones(E, dtype=torch.bool, device=dev)
    mask[5] = False
    frozen = torch.zeros(E, dtype=torch.bool, device=dev)
    frozen[2] = True
    s_d = [t.clone() for t in dispatch_ref(random_experts(T, E, K, dev), E, mask)]
    s_x, s_dy = torch.randn(T, D, device=dev, dtype=dt), torch.randn(T, D, device=dev, dtype=dt)
    s_w = torch.rand(T, K, device=dev)

    def step():
        y, g, u = fwd(s_x, *ws, *s_d, s_w, frozen, save_activations=True)
        return (y, *bwd(s_dy, s_x, *ws, *s_d, s_w, frozen, g_NF=g, u_NF=u))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        first, second = step(), step()
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # deterministic
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        for s, new in zip(s_d, dispatch_ref(random_experts(T, E, K, dev), E, mask)):
            s.copy_(new)
        s_x.copy_(torch.randn(T, D, device=dev, dtype=dt))
        s_dy.copy_(torch.randn(T, D, device=dev, dtype=dt))
        s_w.copy_(torch.rand(T, K, device=dev))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for name, a, b in zip(NAMES, outs, eager):
            assert torch.equal(a, b), name


def test_row_offsets_past_2_pow_31_elements():
    """N*D > 2^31: o_ND and dx_ND rows past 2^31 elements; the last tokens are checked against a
    per-token computation (fp32 vs bf16 torch error)."""
    fwd, bwd = triton_fns()
    T, D, F, E, K, dt, dev = 140_000, 2048, 128, 8, 8, torch.bfloat16, "cuda"
    assert T * K * D > 2**31
    ws = [(torch.randn(E, F, D, device=dev) / D**0.5).to(dt), (torch.randn(E, F, D, device=dev) / D**0.5).to(dt),
          (torch.randn(E, D, F, device=dev) / F**0.5).to(dt)]
    experts = torch.arange(E, device=dev, dtype=torch.int32).repeat(T, 1)  # every token to all experts
    d = dispatch_ref(experts, E, None)  # the last expert's rows start past 2^31 / D
    x, dy = torch.randn(T, D, device=dev, dtype=dt), torch.randn(T, D, device=dev, dtype=dt)
    w = torch.rand(T, K, device=dev)
    y, g, u = fwd(x, *ws, *d, w, None, save_activations=True)
    dx, *_, dwt = bwd(dy, x, *ws, *d, w, None, g_NF=g, u_NF=u)
    del _
    tail = torch.arange(T - 8, T, device=dev)

    def per_token(cd):
        xt = x[tail].to(cd).requires_grad_()
        wt = w[tail].to(cd).requires_grad_()
        g = torch.einsum("td,efd->tef", xt, ws[0].to(cd))
        u = torch.einsum("td,efd->tef", xt, ws[1].to(cd))
        o = torch.einsum("tef,edf->ted", torch.nn.functional.silu(g) * u, ws[2].to(cd))
        yt = (o * wt[..., None]).sum(1)
        yt.backward(dy[tail].to(cd))
        return [t.detach().double() for t in (yt, xt.grad, wt.grad)]

    ref, plain = per_token(torch.float64), per_token(dt)
    for name, g, p, r in zip(("y", "dx", "d_weights"), (y[tail], dx[tail], dwt[tail]), plain, ref):
        err, base = rel_err(g.double(), r), rel_err(p, r)
        assert err <= 2 * base + 1e-6, f"{name}: rel err {err:.3g} vs torch {base:.3g}"
