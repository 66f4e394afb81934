"""The CUDA kernels of flexkern._C (route, dispatch) against the references, on a GPU.

Kernels write into buffers poisoned beforehand (NaN / -7), so an element they skip is caught.
Routing ids are compared exactly where probabilities are exactly tied or well separated, and
otherwise through the float64 probabilities they select (near-ties may round either way)."""
import pytest
import torch

import flexkern
from flexkern.ops import dispatch_ref, route_ref
from flexkern.ops.route import choice_scores, gate_ref, gate_scores

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

def route_kernel(logits_TE, k, mask_E=None, reroute=True, renormalize=False, bias_E=None, **gate):
    """Direct launch into poisoned outputs: (weights_TK, experts_TK, lse_T, counts_E)."""
    C = _C()
    T, E = logits_TE.shape
    dev = logits_TE.device
    dt = {torch.float32: C.FLOAT32, torch.float16: C.FLOAT16, torch.bfloat16: C.BFLOAT16}
    w = torch.full((T, k), float("nan"), device=dev)
    e = torch.full((T, k), POISON, dtype=torch.int32, device=dev)
    lse = torch.full((T,), float("nan"), device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    scoring = {"softmax": 0, "sigmoid": 1}[gate.get("scoring", "softmax")]
    C.route_topk(ptr(logits_TE), dt[logits_TE.dtype], ptr(bias_E), ptr(mask_E), T, E, k, reroute,
                 renormalize, ptr(w), ptr(e), ptr(lse), ptr(counts), stream(), scoring,
                 ptr(gate.get("score_bias_E")), gate.get("n_group", 1), gate.get("topk_group", 1),
                 gate.get("routed_scaling", 1.0))
    return w, e, lse, counts


def _float64_gate(logits_TE, mask_E, reroute, gate):
    """(scores, choices) in float64: the truth the float32 kernel and reference approximate."""
    g = dict(gate)
    l64 = logits_TE.double()
    s64 = gate_scores(l64, mask_E, reroute, g.get("scoring", "softmax"))
    bias = g.get("score_bias_E")
    c64 = choice_scores(s64, mask_E, reroute, None if bias is None else bias.double(),
                        g.get("n_group", 1), g.get("topk_group", 1))
    return s64, c64


def _separated(v_TX, tol):
    """Rows whose sorted finite values are all more than tol apart (no near-ties)."""
    v = torch.where(torch.isfinite(v_TX), v_TX, torch.nan)
    gaps = v.sort(-1).values.diff(dim=-1)
    return (gaps.isnan() | (gaps > tol)).all(-1)


def check_gate(logits_TE, k, mask_E, reroute, renormalize, w, e, exact_ids=False, **gate):
    """Kernel (w, e) against flexkern's gate_ref on the same float32 logits, errors measured in
    float64. Without groups the picks are compared through the float64 choices they select; with
    groups ids must match exactly on every row without near-ties of group scores or choices."""
    T, E = logits_TE.shape
    w_ref, e_ref = gate_ref(logits_TE.float(), k, mask_E, reroute, renormalize, **gate)
    e_ref = e_ref.int()
    assert w.shape == (T, k) and e.shape == (T, k) and e.dtype == torch.int32
    assert bool(((e >= 0) & (e < E)).all()), "expert id out of range"
    if exact_ids:
        assert torch.equal(e, e_ref)
    if T == 0:
        return
    assert bool((e.long().sort(-1).values.diff(dim=-1) != 0).all()), "an expert picked twice"
    s64, c64 = _float64_gate(logits_TE, mask_E, reroute, gate)
    nan_T = s64.isnan().any(-1) | c64.isnan().any(-1)
    # rows with a NaN/inf logit: NaN choices rank first, in id order, as torch.sort puts them
    assert torch.equal(e[nan_T], e_ref[nan_T])
    assert torch.equal(w[nan_T].isnan(), w_ref[nan_T].isnan())
    ok = ~nan_T
    scale = gate.get("routed_scaling", 1.0)

    def truth(ids):
        sel = torch.where(c64.gather(1, ids.long()) == float("-inf"), 0, s64.gather(1, ids.long()))
        if renormalize:
            sel = sel / sel.sum(-1, keepdim=True).clamp_min(1e-20)
        return sel * scale

    n_group = gate.get("n_group", 1)
    if n_group > 1:
        per = E // n_group
        tol = 1e-6  # float32 rounding of scores and group sums is < 3e-7 here
        pre = s64 if gate.get("score_bias_E") is None else s64 + gate["score_bias_E"].double()
        if reroute and mask_E is not None:
            pre = pre.masked_fill(~mask_E, float("-inf"))
        top2 = pre.view(T, n_group, per).topk(2, -1).values
        groups64 = torch.where(top2[..., 1] == float("-inf"), top2[..., 0], top2.sum(-1))
        ok = ok & _separated(groups64, tol) & _separated(pre, tol)
        assert int(ok.sum()) >= T // 2, "too few rows without near-ties to test"
        assert torch.equal(e[ok], e_ref[ok])
    if not bool(ok.any()):
        return
    err_torch = float((w_ref[ok].double() - truth(e_ref)[ok]).abs().max())
    tol = 2 * err_torch + 1e-6 * max(1.0, scale)
    err = float((w[ok].double() - truth(e)[ok]).abs().max())
    assert err <= tol, f"weights off by {err:.3g} (torch float32: {err_torch:.3g})"
    if n_group == 1:  # the kernel's picks are the top-k, in order, up to rounding of near-ties
        picked, picked_ref = c64.gather(1, e.long())[ok], c64.gather(1, e_ref.long())[ok]
        finite = torch.isfinite(picked_ref)
        assert torch.equal(torch.isfinite(picked), finite)
        gap = float((picked[finite] - picked_ref[finite]).abs().max()) if bool(finite.any()) else 0.0
        assert gap <= 2 * err_torch + 1e-6, f"picked choices differ from the reference's by {gap:.3g}"


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


GATINGS = [
    dict(scoring="sigmoid"),
    dict(scoring="sigmoid", renormalize=True, routed_scaling=2.5),
    dict(scoring="softmax", bias=True),
    dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4, renormalize=True, routed_scaling=2.5),
    dict(scoring="softmax", n_group=4, topk_group=2),
    dict(scoring="sigmoid", n_group=32, topk_group=3),
]


@pytest.mark.parametrize("T,E,K", [(1, 64, 8), (0, 64, 8), (1000, 64, 8), (777, 256, 8), (300, 128, 6)])
@pytest.mark.parametrize("setting", range(len(GATINGS)))
@pytest.mark.parametrize("mask_mode", ["reroute", "drop"])
def test_route_gating_matches_reference(cu, T, E, K, setting, mask_mode):
    """Sigmoid scoring, selection-only score bias, group-limited top-k (DeepSeek-V3: E=256,
    8 groups, 4 chosen, K=8) and routed scaling, with and without a mask."""
    g = dict(GATINGS[setting])
    renormalize = g.pop("renormalize", False)
    if g.pop("bias", False) or g.get("n_group", 1) > 1:
        g["score_bias_E"] = torch.randn(E, device="cuda") * 0.05
    if E % g.get("n_group", 1) or K > g.get("topk_group", 1) * E // g.get("n_group", 1):
        pytest.skip("group setting does not fit this size")
    x = torch.randn(T, 48, device="cuda")
    r = torch.randn(E, 48, device="cuda") / 7
    mask = torch.rand(E, device="cuda") > 0.2
    w, e, logits = flexkern.route(x, r, K, None, mask, mask_mode, renormalize, backend="cuda", **g)
    _, _, logits_ref = route_ref(x, r, K, None, mask, mask_mode == "reroute", renormalize, **g)
    assert torch.equal(logits, logits_ref)
    check_gate(logits_ref, K, mask, mask_mode == "reroute", renormalize, w, e, **g)
    if mask_mode == "reroute" and T:
        live = w != 0
        assert bool(mask[e.long()][live].all()), "a masked expert got weight"


def test_route_gating_kernel_direct_and_counts(cu):
    T, E, K = 4097, 256, 8
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    g = dict(scoring="sigmoid", score_bias_E=torch.randn(E, device="cuda") * 0.05, n_group=8,
             topk_group=4, routed_scaling=2.5)
    w, e, lse, counts = route_kernel(logits, K, None, True, True, **g)
    check_gate(logits.float(), K, None, True, True, w, e, **g)
    assert torch.equal(counts, torch.bincount(e.long().flatten(), minlength=E).int())
    groups = (e.long() // (E // 8))  # every pick inside at most topk_group groups
    n_groups = torch.zeros(T, 8, device="cuda").scatter_(1, groups, 1).sum(-1)
    assert bool((n_groups <= 4).all())


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
