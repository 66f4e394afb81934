"""The backend seam (register / lookup / explain), Dispatch validation, strided weights, and the
small op contracts (K = 0, the int32 slot limit, the tile bound), on the reference backend and the
Triton backend (the interpreter without a GPU: float32/float16, tiny shapes)."""
import os

import torch

if not torch.cuda.is_available():
    # triton.jit reads this when the kernels are built (at their first launch).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

import flexkern  # noqa: E402
from flexkern.ops import backend, dispatch_ref, experts_fwd_ref  # noqa: E402
from flexkern.ops.dispatch import Dispatch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in backend.available("experts_swiglu")
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])


def _ffn(x_D, g_FD, u_FD, d_DF):
    g = g_FD @ x_D
    return d_DF @ (g * torch.sigmoid(g) * (u_FD @ x_D))


def oracle(x_TD, ws, d, weights_TK):
    """y_t = sum_k w[t, k] FFN_{expert of row}(x[token of row]) read from a valid layout, row by row."""
    offs = d.offsets_E1.tolist()
    rows = d.row_of_slot_TK.tolist()
    tok = d.token_of_row_N.tolist()
    y = torch.zeros(x_TD.shape, dtype=torch.float64)
    for t, slots in enumerate(rows):
        for k, r in enumerate(slots):
            if r < 0:
                continue
            e = max(i for i in range(len(offs) - 1) if offs[i] <= r < offs[i + 1])
            y[t] += float(weights_TK[t, k]) * _ffn(x_TD[tok[r]].double(), *(w[e].double() for w in ws))
    return y


def make(T=6, D=5, F=7, E=4, K=2, dtype=torch.float32, device=DEVICE):
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32) if T else \
        torch.empty(0, K, dtype=torch.int32)
    x = torch.randn(T, D, dtype=dtype, device=device)
    ws = [(torch.randn(E, F, D) / D**0.5).to(dtype).to(device),
          (torch.randn(E, F, D) / D**0.5).to(dtype).to(device),
          (torch.randn(E, D, F) / F**0.5).to(dtype).to(device)]
    weights = torch.rand(T, K, device=device)
    return x, ws, experts.to(device), weights


# --------------------------------------------------------------------------------- the seam

@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op with a reference and a 'triton' that declines float64."""
    for reg in (backend._REGISTRY, backend._SUPPORTS):
        monkeypatch.setitem(reg, "toy", {})
    backend.register("toy", "reference", lambda x: ("reference", x))
    backend.register("toy", "triton", lambda x: ("triton", x),
                     supports=lambda x: "float64 is not supported" if x.dtype == torch.float64 else None)
    return "toy"


def test_lookup_prefers_then_falls_back_in_order(toy_op, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2)
    assert backend.lookup("toy", "triton", x)[0] == "triton"
    assert backend.lookup("toy", "auto", x)[0] == "reference"  # no automatic interpreter on the CPU
    with pytest.warns(UserWarning, match="float64 is not supported"):
        assert backend.lookup("toy", "triton", x.double())[0] == "reference"
    d = backend.explain("toy", x.double(), backend="triton")
    assert d.backend == "reference" and d.skipped == (("triton", "float64 is not supported"),)
    monkeypatch.setenv("FLEXKERN_BACKEND", "triton")  # the environment is the default preference
    assert backend.lookup("toy", None, x)[0] == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with caplog.at_level(logging.DEBUG, logger="flexkern.backend"), pytest.warns(UserWarning):
        assert backend.lookup("toy", "triton", x)[0] == "reference"
    assert any("TRITON_INTERPRET" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="unknown backend"):
        backend.lookup("toy", "fastest", x)
    with pytest.raises(ValueError, match="unknown op"):
        backend.explain("nope", x)


def test_old_lookup_form_decides_on_the_device(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, fn = backend.lookup("toy", "triton", torch.device("cpu"))
    assert name == "triton" and fn(1) == ("triton", 1)


def test_explain_route_and_dispatch_say_why():
    x, r = torch.randn(4, 6, device=DEVICE), torch.randn(3, 6, device=DEVICE)
    d = flexkern.explain("route", x, r, 2, backend="triton")
    assert "triton does not implement route" in str(d)
    assert d.backend == ("cuda" if DEVICE == "cuda" and "cuda" in backend.available("route") else "reference")
    with pytest.raises(ValueError, match="top_k"):  # explain checks the arguments like the op
        flexkern.explain("route", x, r, 7)
    e = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
    assert flexkern.explain("dispatch", e, 3, backend="reference").backend == "reference"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_module_backend_triton_runs_triton_experts(how, monkeypatch):
    torch.manual_seed(0)
    ref = flexkern.FlexMoE(8, 12, 4, 2, device=DEVICE)
    if how == "environment":
        monkeypatch.setenv("FLEXKERN_BACKEND", "triton")
        moe = flexkern.FlexMoE(8, 12, 4, 2, device=DEVICE)
    else:
        moe = flexkern.FlexMoE(8, 12, 4, 2, backend="triton", device=DEVICE)
    moe.load_state_dict(ref.state_dict())
    moe.expert_mask[2] = False
    ref.expert_mask[2] = False
    x = torch.randn(2, 9, 8, device=DEVICE, requires_grad=True)
    y = moe(x)
    with monkeypatch.context() as m:
        m.delenv("FLEXKERN_BACKEND", raising=False)
        y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(y.square().sum(), [x])
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), [x])
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # which implementation runs, per op: triton where it implements the op
    route_why, dispatch_why, experts_why = moe.explain(x)
    assert experts_why.backend == "triton", str(experts_why)
    assert "triton does not implement route" in str(route_why)
    assert dispatch_why.backend in ("reference", "cuda")


@pytest.mark.skipif(not HAS_TRITON or DEVICE == "cuda", reason="interpreter case (CPU only)")
def test_bf16_in_the_interpreter_falls_back_and_says_why():
    x, ws, experts, weights = make(dtype=torch.bfloat16)
    d = flexkern.dispatch(experts, 4)
    why = flexkern.explain("experts_swiglu", x, *ws, d, weights, backend="triton")
    assert why.backend == "reference" and "bfloat16" in str(why)
    with pytest.warns(UserWarning, match="bfloat16"):
        y = flexkern.experts_swiglu(x, *ws, d, weights, backend="triton")
    torch.testing.assert_close(y, flexkern.experts_swiglu(x, *ws, d, weights, backend="reference"))


def test_float64_prefers_reference_without_an_error():
    x, ws, experts, weights = make(dtype=torch.float64)
    d = flexkern.dispatch(experts, 4)
    why = flexkern.explain("experts_swiglu", x, *ws, d, weights, backend="triton")
    assert why.backend == "reference"


# ----------------------------------------------------------------------- dispatch validation

class _say:
    """Name the forgery in a failure."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and exc[0] is not ValueError:
            raise AssertionError(f"forgery {self.what!r}: {exc[1]!r}") from exc[1]
        return False


def _forgeries(d, T, K, E):
    """(description, Dispatch) pairs that are each wrong in one way."""
    N = T * K
    off, tok, slot, row = (t.clone() for t in d.tensors())

    def with_(**kw):
        parts = dict(offsets_E1=off, token_of_row_N=tok, slot_of_row_N=slot, row_of_slot_TK=row)
        parts.update(kw)
        return Dispatch(**parts)

    big = off.clone()
    big[-1] = N + 5
    down = off.clone()
    down[1], down[2] = int(off[2]) + 1, int(off[1])
    start = off.clone()
    start[0] = 1
    t_bad, s_bad, r_bad, r_neg = tok.clone(), slot.clone(), row.clone(), row.clone()
    t_bad[0] = T + 100
    s_bad[0] = N + 3
    r_bad[0, 0] = N + 7
    r_neg[0, 0] = -5
    swap = row.clone()
    swap[0, 0], swap[1, 0] = int(row[1, 0]), int(row[0, 0])
    return [
        ("offsets beyond N", with_(offsets_E1=big)),
        ("offsets decreasing", with_(offsets_E1=down)),
        ("offsets not starting at 0", with_(offsets_E1=start)),
        ("token out of range", with_(token_of_row_N=t_bad)),
        ("slot out of range", with_(slot_of_row_N=s_bad)),
        ("row out of range", with_(row_of_slot_TK=r_bad)),
        ("row below -1", with_(row_of_slot_TK=r_neg)),
        ("rows and slots not inverse", with_(row_of_slot_TK=swap)),
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_forged_dispatches_are_refused(name):
    T, D, F, E, K = 6, 5, 7, 4, 2
    x, ws, experts, weights = make(T, D, F, E, K)
    d = flexkern.dispatch(experts, E)
    for what, bad in _forgeries(d, T, K, E):
        with pytest.raises(ValueError, match="invalid Dispatch|offsets"), _say(what):
            flexkern.experts_swiglu(x, *ws, bad, weights, backend=name)
    with pytest.raises(TypeError, match="dtype"):
        flexkern.experts_swiglu(x, *ws, Dispatch(d.offsets_E1.int(), *d.tensors()[1:]), weights, backend=name)
    with pytest.raises(TypeError, match="dtype"):
        flexkern.experts_swiglu(x, *ws, Dispatch(d.offsets_E1, d.token_of_row_N.long(), *d.tensors()[2:]),
                                weights, backend=name)
    with pytest.raises(ValueError, match="shape"):
        flexkern.experts_swiglu(x, *ws, Dispatch(d.offsets_E1, d.token_of_row_N[:-1], *d.tensors()[2:]),
                                weights, backend=name)
    with pytest.raises(ValueError, match="is on meta"):
        flexkern.experts_swiglu(x, *ws, Dispatch(d.offsets_E1.to("meta"), *d.tensors()[1:]), weights,
                                backend=name)
    # non-contiguous but valid: the right result
    strided = Dispatch(*(torch.stack([t, t], -1)[..., 0] for t in d.tensors()))
    assert not strided.token_of_row_N.is_contiguous()
    torch.testing.assert_close(flexkern.experts_swiglu(x, *ws, strided, weights, backend=name),
                               flexkern.experts_swiglu(x, *ws, d, weights, backend=name))


def test_a_trusted_dispatch_changed_in_place_is_checked_again():
    x, ws, experts, weights = make()
    d = flexkern.dispatch(experts, 4)
    assert d.is_trusted()
    d.token_of_row_N[0] = 10**6
    assert not d.is_trusted()
    with pytest.raises(ValueError, match="token_of_row_N"):
        flexkern.experts_swiglu(x, *ws, d, weights)


def test_hand_built_dispatch_in_compiled_code_is_refused_unless_validated():
    torch._dynamo.reset()
    x, ws, experts, weights = make(device="cpu")
    hand = Dispatch(*dispatch_ref(experts, 4, None))

    def f(x, d):
        return flexkern.experts_swiglu(x, *ws, d, weights)

    with pytest.raises(Exception, match="built by hand"):
        torch.compile(f, fullgraph=True)(x, hand)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, hand.validated()), f(x, hand))


# Fuzz: a valid layout with one random edit. The op either refuses it cleanly or, when the edit
# left a valid layout, returns exactly the row-by-row oracle; never an IndexError or garbage.
FIELDS = ("offsets_E1", "token_of_row_N", "slot_of_row_N", "row_of_slot_TK")


@st.composite
def forged(draw):
    T, E, K = draw(st.integers(0, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    K = min(K, E)
    ids = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    experts = torch.tensor(ids, dtype=torch.int32).reshape(T, K)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=E, max_size=E)))
    parts = dict(zip(FIELDS, (t.clone() for t in dispatch_ref(experts, E, mask))))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(FIELDS))
        t = parts[name]
        kind = draw(st.sampled_from(["value", "dtype", "shape"] if t.numel() else ["dtype", "shape"]))
        if kind == "value":
            flat = t.reshape(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.integers(-2**31, 2**31 - 1) | st.integers(-3, 12))
        elif kind == "dtype":
            parts[name] = t.to(draw(st.sampled_from([torch.int32, torch.int64, torch.int16, torch.float32])))
        else:
            parts[name] = t.reshape(-1)[: max(t.numel() - 1, 0)] if draw(st.booleans()) else \
                torch.cat([t.reshape(-1), t.reshape(-1)[:1] if t.numel() else t.new_zeros(1)])
    return T, E, K, Dispatch(**parts)


def _fuzz_one(name, case):
    T, E, K, d = case
    D, F = 3, 4
    x = torch.randn(T, D)
    ws = [torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)]
    weights = torch.rand(T, K)
    if DEVICE == "cuda":
        x, ws, weights = x.cuda(), [w.cuda() for w in ws], weights.cuda()
        d = Dispatch(*(t.cuda() for t in d.tensors()))
    try:
        y = flexkern.experts_swiglu(x, *ws, d, weights, backend=name)
    except (ValueError, TypeError) as exc:
        assert "dispatch" in str(exc).lower() or "offsets" in str(exc), exc
        event("refused")
        return
    event("ran")
    want = oracle(x.cpu(), [w.cpu() for w in ws], Dispatch(*(t.cpu() for t in d.tensors())), weights.cpu())
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-4, atol=1e-5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=forged())
def test_fuzz_forged_dispatch_reference(case):
    _fuzz_one("reference", case)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=forged())
def test_fuzz_forged_dispatch_triton(case):  # fewer cases: the interpreter is slow
    _fuzz_one("triton", case)


# ------------------------------------------------------------- Dispatch.from_offsets (EP rows)

@pytest.mark.parametrize("name", BACKENDS)
def test_from_offsets_runs_rows_already_in_expert_order(name):
    E, N, D, F = 3, 9, 5, 6
    offsets = torch.tensor([0, 2, 2, 7], device=DEVICE)  # expert 1 empty, rows 7, 8 unused
    d = Dispatch.from_offsets(offsets, N)
    assert d.is_trusted() and d.row_of_slot_TK.shape == (N, 1)
    x, ws, _, _ = make(N, D, F, E, 1)
    y = flexkern.experts_swiglu(x, *ws, d, torch.ones(N, 1, device=DEVICE), backend=name)
    want = torch.zeros(N, D, dtype=torch.float64)
    for e, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 7)]):
        for r in range(lo, hi):
            want[r] = _ffn(x[r].double().cpu(), *(w[e].double().cpu() for w in ws))
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-4, atol=1e-5)
    for bad, match in [([0, 2, 1, 3], "decrease"), ([1, 2, 3, 4], "start at 0"), ([0, 2, 2, 10], "more than")]:
        with pytest.raises(ValueError, match=match):
            Dispatch.from_offsets(torch.tensor(bad, device=DEVICE), N)
    with pytest.raises(TypeError, match="dtype"):
        Dispatch.from_offsets(offsets.int(), N)
    with pytest.raises(ValueError, match="num_rows"):
        Dispatch.from_offsets(offsets, 2**31)
    # unchecked: clamped on the device into a valid layout (no read), never out of bounds
    c = Dispatch.from_offsets(torch.tensor([3, 1, 50, 20], device=DEVICE), N, validate=False)
    assert c.offsets_E1.tolist() == [0, 3, 9, 9]  # clamp to [0, N], running max, first entry 0


def test_from_offsets_inside_compiled_code():
    torch._dynamo.reset()
    E, N, D, F = 3, 8, 4, 5
    x, ws, _, _ = make(N, D, F, E, 1, device="cpu")

    def f(x, offsets):
        d = Dispatch.from_offsets(offsets, N)
        return flexkern.experts_swiglu(x, *ws, d, torch.ones(N, 1))

    offsets = torch.tensor([0, 3, 3, 8])
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, offsets), f(x, offsets))


# ------------------------------------------------------------ strided weights without copies

def _strided_weights(E, F, D, dtype, layout):
    """(gate, up, down) as views of fused tensors, and contiguous copies of the same values."""
    if layout == "fused":  # gate_up (E, 2F, D), down (E, D, F)
        gate_up = torch.randn(E, 2 * F, D, dtype=dtype, device=DEVICE) / D**0.5
        down = torch.randn(E, D, F, dtype=dtype, device=DEVICE) / F**0.5
        views = [gate_up[:, :F], gate_up[:, F:], down]
    elif layout == "mixed":  # gate and up with different strides (a view and a plain tensor)
        gate = (torch.randn(E, D, F, dtype=dtype, device=DEVICE) / D**0.5).transpose(1, 2)
        views = [gate, torch.randn(E, F, D, dtype=dtype, device=DEVICE) / D**0.5,
                 torch.randn(E, D, F, dtype=dtype, device=DEVICE) / F**0.5]
    else:  # transposed: w (E, D, 2F) read as (E, 2F, D), down stored as (E, F, D)
        w = torch.randn(E, D, 2 * F, dtype=dtype, device=DEVICE) / D**0.5
        down_t = torch.randn(E, F, D, dtype=dtype, device=DEVICE) / F**0.5
        wt = w.transpose(1, 2)
        views = [wt[:, :F], wt[:, F:], down_t.transpose(1, 2)]
    return views, [v.detach().clone().contiguous() for v in views]


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["fused", "transposed", "mixed"])
def test_strided_weights_match_contiguous_without_a_copy(name, dtype, layout, monkeypatch):
    T, D, F, E, K = 7, 6, 5, 3, 2
    views, conts = _strided_weights(E, F, D, dtype, layout)
    assert not views[0].is_contiguous()
    x, _, experts, weights = make(T, D, F, E, K, dtype=dtype)
    d = flexkern.dispatch(experts, E)
    seen = []
    real = backend._REGISTRY["experts_swiglu"][name]

    def spy(*args, **kwargs):
        seen.append([a.data_ptr() for a in args[1:4]])
        return real(*args, **kwargs)

    monkeypatch.setitem(backend._REGISTRY["experts_swiglu"], name, spy)
    if name == "triton":
        from flexkern.triton import ops as tops

        gemm = tops._grouped_gemm
        b_ptrs = []

        def gemm_spy(a, a2, b, b2, *rest, **kw):
            b_ptrs.append({b.data_ptr(), None if b2 is None else b2.data_ptr()} - {None})
            return gemm(a, a2, b, b2, *rest, **kw)

        monkeypatch.setattr(tops, "_grouped_gemm", gemm_spy)
    y = flexkern.experts_swiglu(x, *views, d, weights, backend=name)
    assert seen and seen[0] == [v.data_ptr() for v in views]  # exactly the views reached the backend
    if name == "triton":
        assert all(p <= {v.data_ptr() for v in views} for p in b_ptrs)  # and the kernels
    y_c = flexkern.experts_swiglu(x, *conts, d, weights, backend=name)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, y_c, **tol)
    # backward: the same gradients as the contiguous case, for x and every weight
    # (saved pre-activations, and recomputed ones: the backward then reads w_gate/w_up by strides)
    dy = torch.randn_like(y)
    for recompute in (False, True):
        vs = [v.detach().requires_grad_() for v in views]
        cs = [c.detach().requires_grad_() for c in conts]
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = flexkern.experts_swiglu(xa, *vs, d, weights, backend=name, recompute_activations=recompute)
        yb = flexkern.experts_swiglu(xb, *cs, d, weights, backend=name, recompute_activations=recompute)
        ga = torch.autograd.grad(ya, [xa, *vs], dy)
        gb = torch.autograd.grad(yb, [xb, *cs], dy)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------- small op contracts

@pytest.mark.parametrize("name", BACKENDS)
def test_no_rows_give_zeros_forward_and_backward(name, monkeypatch):
    monkeypatch.setenv("FLEXKERN_TRITON_POISON", "1")  # uninitialised memory would be NaN
    T, D, F, E = 5, 4, 6, 3
    x, ws, _, _ = make(T, D, F, E, 1)
    for K in (0, 2):
        weights = torch.rand(T, K, device=DEVICE, requires_grad=True)
        experts = torch.zeros(T, K, dtype=torch.int32, device=DEVICE)
        mask = torch.zeros(E, dtype=torch.bool, device=DEVICE)  # K = 2: every slot dropped
        d = flexkern.dispatch(experts, E, mask if K else None)
        xg = x.clone().requires_grad_()
        y = flexkern.experts_swiglu(xg, *ws, d, weights, backend=name)
        assert torch.equal(y, torch.zeros_like(y))
        gx, gw = torch.autograd.grad(y, [xg, weights], torch.randn_like(y))
        assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


def test_dispatch_refuses_more_slots_than_int32_rows():
    huge = torch.zeros(1, 1, dtype=torch.int32).expand(2**31, 1)  # no 2^31 allocation
    with pytest.raises(ValueError, match="2\\^31"):
        flexkern.dispatch(huge, 4, validate=False)


def test_reference_dispatch_drops_out_of_range_ids_like_the_kernel():
    ids = torch.tensor([[0, 7], [-3, 1]], dtype=torch.int32)
    d = Dispatch(*dispatch_ref(ids, 2, None))
    assert d.offsets_E1.tolist() == [0, 1, 2]
    assert d.row_of_slot_TK.tolist() == [[0, -1], [-1, 1]]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.sampled_from([1, 4, 16, 64]), st.data())
def test_max_row_tiles_bounds_every_split(E, block_m, data):
    from flexkern.triton.configs import max_row_tiles

    rows = data.draw(st.lists(st.integers(0, 200), min_size=E, max_size=E))
    N = sum(rows) + data.draw(st.integers(0, 50))  # capacity >= routed rows
    assert sum(-(-r // block_m) for r in rows) <= max_row_tiles(N, E, block_m)


def test_reference_forward_reads_views_as_they_are():
    # the reference loop itself takes no copies: equal results on views and copies in float64
    x, _, experts, weights = make(dtype=torch.float64, device="cpu")
    views, conts = _strided_weights(4, 7, 5, torch.float64, "transposed")
    views, conts = [v.cpu() for v in views], [c.cpu() for c in conts]
    d = flexkern.dispatch(experts, 4)
    a = experts_fwd_ref(x, *views, *d.tensors(), weights, None)[0]
    b = experts_fwd_ref(x, *conts, *d.tensors(), weights, None)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
