"""The CUDA kernels of flexkern._C (route, dispatch) against the references, on a GPU.

Kernels write into buffers poisoned beforehand (NaN / -7), so an element they skip is caught.
Routing ids are compared exactly where probabilities are exactly tied or well separated, and
otherwise through the float64 probabilities they select (near-ties may round either way)."""
import pytest
import torch

import flexkern
from flexkern.ops import dispatch_ref, route_ref

pytestmark = pytest.mark.gpu
POISON = -7


@pytest.fixture(scope="module")
def cu():
    try:
        import flexkern.cuda as cuda_backend
    except ImportError as exc:
        pytest.fail(f"flexkern._C is not built on this CUDA machine: {exc}")
    return cuda_backend


def _C():
    from flexkern import _C
    return _C


def stream():
    return torch.cuda.current_stream().cuda_stream


def ptr(t):
    return 0 if t is None else t.data_ptr()


# ----------------------------------------------------------------------------------------- route

def route_kernel(logits_TE, k, mask_E=None, reroute=True, renormalize=False, bias_E=None):
    """Direct launch into poisoned outputs: (weights_TK, experts_TK, lse_T, counts_E)."""
    C = _C()
    T, E = logits_TE.shape
    dev = logits_TE.device
    dt = {torch.float32: C.FLOAT32, torch.float16: C.FLOAT16, torch.bfloat16: C.BFLOAT16}
    w = torch.full((T, k), float("nan"), device=dev)
    e = torch.full((T, k), POISON, dtype=torch.int32, device=dev)
    lse = torch.full((T,), float("nan"), device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    C.route_topk(ptr(logits_TE), dt[logits_TE.dtype], ptr(bias_E), ptr(mask_E), T, E, k, reroute,
                 renormalize, ptr(w), ptr(e), ptr(lse), ptr(counts), stream())
    return w, e, lse, counts


def gate_ref(logits_TE, k, mask_E, reroute, renormalize):
    """route_ref's gate (module docstring of flexkern/ops/route.py) on given float32 logits."""
    if reroute and mask_E is not None:
        logits_TE = logits_TE.masked_fill(~mask_E, float("-inf"))
    probs, order = torch.sort(torch.softmax(logits_TE, -1), dim=-1, descending=True, stable=True)
    w, e = probs[:, :k], order[:, :k].int()
    if renormalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return w, e


def check_gate(logits_TE, k, mask_E, reroute, renormalize, w, e, exact_ids=False):
    """Kernel (w, e) against route_ref on the same float32 logits, errors measured in float64."""
    T, E = logits_TE.shape
    w_ref, e_ref = gate_ref(logits_TE.float(), k, mask_E, reroute, renormalize)
    assert w.shape == (T, k) and e.shape == (T, k) and e.dtype == torch.int32
    assert bool(((e >= 0) & (e < E)).all()), "expert id out of range"
    if exact_ids:
        assert torch.equal(e, e_ref)
    if T == 0:
        return
    assert bool((e.long().sort(-1).values.diff(dim=-1) != 0).all()), "an expert picked twice"
    l64 = logits_TE.double()
    if reroute and mask_E is not None:
        l64 = l64.masked_fill(~mask_E, float("-inf"))
    p64 = torch.softmax(l64, -1)
    nan_T = p64.isnan().any(-1)
    # rows with a NaN/inf logit (or nothing active): torch's NaN probabilities pick 0..K-1 in order
    assert torch.equal(e[nan_T], e_ref[nan_T])
    assert bool(w[nan_T].isnan().all()) and bool(w_ref[nan_T].isnan().all())
    ok = ~nan_T

    def truth(ids):
        s = p64.gather(1, ids.long())
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20) if renormalize else s

    if not bool(ok.any()):
        return
    err_torch = float((w_ref[ok].double() - truth(e_ref)[ok]).abs().max())
    tol = 2 * err_torch + 1e-6
    err = float((w[ok].double() - truth(e)[ok]).abs().max())
    assert err <= tol, f"weights off by {err:.3g} (torch float32: {err_torch:.3g})"
    # the kernel's picks are the top-k, in order, up to float32 rounding of near-ties
    gap = float((p64.gather(1, e.long())[ok] - p64.gather(1, e_ref.long())[ok]).abs().max())
    assert gap <= tol, f"picked probabilities differ from the reference's by {gap:.3g}"


ROUTE_SIZES = [(1, 1, 1), (0, 8, 2), (1, 8, 8), (5, 3, 2), (257, 64, 8), (300, 33, 5),
               (1000, 256, 16), (777, 128, 4), (64, 16, 16)]


@pytest.mark.parametrize("T,E,K", ROUTE_SIZES)
@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_op_matches_reference(cu, T, E, K, mask_mode, renormalize):
    x = torch.randn(T, 48, device="cuda")
    r = torch.randn(E, 48, device="cuda") / 7
    b = torch.randn(E, device="cuda")
    mask = torch.rand(E, device="cuda") > 0.3
    mask[torch.randperm(E, device="cuda")[:K]] = True  # at least K active experts
    w, e, logits = flexkern.route(x, r, K, b, mask, mask_mode, renormalize, backend="cuda")
    _, _, logits_ref = route_ref(x, r, K, b, mask, mask_mode == "reroute", renormalize)
    assert torch.equal(logits, logits_ref)
    check_gate(logits_ref, K, mask, mask_mode == "reroute", renormalize, w, e)
    if mask_mode == "reroute" and T:
        assert bool(mask[e.long()].all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E,K", [(1, 1), (7, 7), (64, 8), (256, 16)])
def test_route_kernel_bias_lse_counts(cu, dtype, E, K):
    T = 513
    logits = (torch.randn(T, E, device="cuda") * 3).to(dtype)
    bias = torch.randn(E, device="cuda")
    w, e, lse, counts = route_kernel(logits, K, bias_E=bias)
    full = logits.float() + bias
    check_gate(full, K, None, True, False, w, e)
    lse_ref = torch.logsumexp(full, -1)
    lse_err_torch = float((lse_ref.double() - torch.logsumexp(full.double(), -1)).abs().max())
    assert float((lse.double() - torch.logsumexp(full.double(), -1)).abs().max()) <= 2 * lse_err_torch + 1e-5
    assert torch.equal(counts, torch.bincount(e.long().flatten(), minlength=E).int())


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_ties_go_to_the_lower_id(cu, renormalize):
    # small-integer logits: many exact ties, and distinct values are far apart -> exact ids
    for E, K in [(8, 8), (64, 8), (256, 16), (5, 3)]:
        logits = torch.randint(0, 3, (400, E), device="cuda").float()
        mask = torch.rand(E, device="cuda") > 0.5
        for m in (None, mask):
            w, e, _, _ = route_kernel(logits, K, m, True, renormalize)
            check_gate(logits, K, m, True, renormalize, w, e, exact_ids=True)
    w, e, _ = flexkern.route(torch.zeros(3, 4, device="cuda"), torch.randn(5, 4, device="cuda"), 3,
                             backend="cuda")
    assert e.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 0.2, device="cuda"))


def test_route_masks(cu):
    T, E, K = 300, 12, 4
    logits = torch.randn(T, E, device="cuda")
    only_k = torch.zeros(E, dtype=torch.bool, device="cuda")
    only_k[torch.randperm(E)[:K]] = True
    w, e, _, _ = route_kernel(logits, K, only_k)  # all masked but K: exactly those K, any order
    check_gate(logits, K, only_k, True, False, w, e)
    assert torch.equal(e.sort(-1).values, only_k.nonzero().int().flatten().expand(T, K))
    fewer = torch.zeros(E, dtype=torch.bool, device="cuda")
    fewer[[3, 9]] = True  # 2 active < K: the rest are probability-0 ties, lowest ids first
    w, e, _, _ = route_kernel(logits, K, fewer)
    check_gate(logits, K, fewer, True, False, w, e)
    assert torch.equal(e[:, 2:], torch.tensor([[0, 1]], dtype=torch.int32, device="cuda").expand(T, 2))
    nothing = torch.zeros(E, dtype=torch.bool, device="cuda")  # NaN probabilities, ids 0..K-1
    w, e, _, _ = route_kernel(logits, K, nothing)
    check_gate(logits, K, nothing, True, False, w, e)
    w, e, _, _ = route_kernel(logits, K, nothing, reroute=False)  # drop: routing ignores the mask
    check_gate(logits, K, nothing, False, False, w, e)


def test_route_nan_and_inf_logits(cu):
    T, E, K = 200, 40, 6
    logits = torch.randn(T, E, device="cuda")
    logits[3] = float("nan")
    logits[5, 7] = float("nan")
    logits[9, 0] = float("inf")
    logits[11] = float("-inf")
    logits[13, 30] = float("-inf")
    for renormalize in (False, True):
        w, e, lse, _ = route_kernel(logits, K, None, True, renormalize)
        check_gate(logits, K, None, True, renormalize, w, e)
        want = torch.logsumexp(logits, -1)
        torch.testing.assert_close(lse, want, equal_nan=True, rtol=1e-5, atol=1e-5)
    x = torch.randn(16, 8, device="cuda")
    x[1] = float("nan")
    _, e, _ = flexkern.route(x, torch.randn(6, 8, device="cuda"), 2, backend="cuda")
    assert bool(((e >= 0) & (e < 6)).all())


def test_route_large(cu):
    T, E, K = 65536, 64, 8
    x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(E, 128, device="cuda", dtype=torch.bfloat16)
    w, e, logits = flexkern.route(x, r, K, backend="cuda")
    check_gate(logits, K, None, True, False, w, e)


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_kernel_fewer_active_experts_than_k(cu, renormalize):
    """Masked experts get probability exactly 0 (all masked: all weights 0, ids 0..K-1), as in
    the reference: no NaN."""
    x, r = torch.randn(33, 16, device="cuda"), torch.randn(6, 16, device="cuda")
    for active in ([1, 4], []):
        mask = torch.zeros(6, dtype=torch.bool, device="cuda")
        mask[active] = True
        w, e, _ = flexkern.route(x, r, 4, None, mask, renormalize=renormalize, backend="cuda")
        w_ref, e_ref, _ = route_ref(x, r, 4, None, mask, True, renormalize)
        assert torch.isfinite(w).all()
        assert torch.equal(e, e_ref)
        torch.testing.assert_close(w, w_ref)
        assert (w[:, len(active):] == 0).all()


def test_route_float64_falls_back_to_reference(cu):
    x, r = torch.randn(9, 8, device="cuda", dtype=torch.float64), torch.randn(5, 8, device="cuda", dtype=torch.float64)
    got = flexkern.route(x, r, 2, backend="cuda")
    for a, b in zip(got, route_ref(x, r, 2)):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- dispatch

def dispatch_kernel(ids_TK, E, mask_E=None):
    """Direct launch into poisoned outputs; returns dispatch_ref's tuple layout."""
    C = _C()
    T, K = ids_TK.shape
    dev = ids_TK.device
    offsets = torch.full((E + 1,), POISON, dtype=torch.int64, device=dev)
    token = torch.full((T * K,), POISON, dtype=torch.int32, device=dev)
    slot = torch.full((T * K,), POISON, dtype=torch.int32, device=dev)
    row = torch.full((T, K), POISON, dtype=torch.int32, device=dev)
    nbytes = C.dispatch_workspace_bytes(T, K, E)
    ws = torch.full((max(nbytes, 1),), 0x5A, dtype=torch.uint8, device=dev)  # garbage scratch
    C.dispatch(ptr(ids_TK), ids_TK.dtype == torch.int64, ptr(mask_E), T, K, E, ptr(ws), nbytes,
               ptr(offsets), ptr(token), ptr(slot), ptr(row), stream())
    return offsets, token, slot, row


def assert_same_dispatch(got, want):
    for name, a, b in zip(("offsets", "token_of_row", "slot_of_row", "row_of_slot"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:5].flatten().tolist()}"


def routing(T, E, K, distinct=True, skew=False):
    if distinct:
        ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    else:
        ids = torch.randint(0, E, (T, K), device="cuda")
    if skew and T:
        ids[: T // 2, 0] = E - 1  # a hot expert (ids in a row may then repeat: still valid)
    return ids.int()


DISPATCH_SIZES = [(0, 4, 2), (1, 1, 1), (1, 8, 8), (37, 8, 3), (512, 64, 8), (4096, 64, 1),
                  (513, 8, 8), (4097, 3, 1), (65536, 64, 8), (131072, 64, 8), (20000, 256, 16),
                  (1000, 1024, 4), (3000, 1024, 2)]


@pytest.mark.parametrize("T,E,K", DISPATCH_SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_dispatch_kernel_matches_reference_bit_for_bit(cu, T, E, K, masked):
    mask = (torch.rand(E, device="cuda") > 0.3) if masked else None
    ids = routing(T, E, K, distinct=(T % 2 == 0), skew=(T > 1000))
    want = dispatch_ref(ids, E, mask)
    assert_same_dispatch(dispatch_kernel(ids, E, mask), want)
    assert_same_dispatch(dispatch_kernel(ids.long(), E, mask), want)  # int64 ids
    got = flexkern.dispatch(ids, E, mask, backend="cuda")
    assert_same_dispatch(got.tensors(), want)


def test_dispatch_edge_routings(cu):
    T, E, K = 6000, 16, 2
    everyone_to_one = torch.full((T, K), 5, dtype=torch.int32, device="cuda")
    assert_same_dispatch(dispatch_kernel(everyone_to_one, E), dispatch_ref(everyone_to_one, E, None))
    ids = routing(T, E, K)
    none = torch.zeros(E, dtype=torch.bool, device="cuda")
    got = dispatch_kernel(ids, E, none)
    assert_same_dispatch(got, dispatch_ref(ids, E, none))
    assert int(got[0][-1]) == 0 and bool((got[3] == -1).all())
    # ids outside [0, E) are dropped like masked slots (never written out of bounds)
    bad = ids.clone()
    bad[::7, 0] = E + 3
    bad[1::11, 1] = -2
    as_masked = torch.where((bad >= 0) & (bad < E), bad, E)
    keep = torch.ones(E + 1, dtype=torch.bool, device="cuda")
    keep[E] = False
    off, tok, slot, row = dispatch_ref(as_masked, E + 1, keep)
    assert_same_dispatch(dispatch_kernel(bad, E), (off[:E + 1], tok, slot, row))


def test_dispatch_is_deterministic(cu):
    ids = routing(50000, 32, 4, distinct=False)
    a, b = dispatch_kernel(ids, 32), dispatch_kernel(ids, 32)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------ CUDA graph

@pytest.mark.parametrize("T", [64, 4096])
def test_route_and_dispatch_capture_and_replay(cu, T):
    D, E, K = 32, 16, 4
    r = torch.randn(E, D, device="cuda")
    mask = torch.ones(E, dtype=torch.bool, device="cuda")
    mask[[2, 7]] = False
    x_static = torch.randn(T, D, device="cuda")

    def step():
        w, e, logits = flexkern.route(x_static, r, K, None, mask, "drop", backend="cuda")
        d = flexkern.dispatch(e, E, mask, backend="cuda", validate=False)
        return (w, e, logits) + d.tensors()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (module loading, cuBLAS handles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        x_static.copy_(torch.randn(T, D, device="cuda"))
        for o in outs:  # poison: the replay must rewrite everything
            o.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        w, e, logits = outs[:3]
        torch.testing.assert_close(logits, x_static @ r.t())
        check_gate(logits, K, mask, False, False, w, e)
        assert_same_dispatch(outs[3:], dispatch_ref(e, E, mask))
