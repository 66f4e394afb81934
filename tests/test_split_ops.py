"""permute -> experts_swiglu_grouped -> unpermute against the fused experts_swiglu (forward and
every gradient), gradcheck, opcheck, poisoned padding rows and edge cases."""
import os

import torch
import torch.utils._python_dispatch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are built

import pytest  # noqa: E402

import flexkern  # noqa: E402
from flexkern.ops import backend, experts_swiglu_grouped, permute, unpermute  # noqa: E402
from flexkern.ops import offsets_from_counts as ops_offsets  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def make(T, D, F, E, K, dtype=torch.float64, mask=None, experts=None, requires_grad=True):
    x = torch.randn(T, D, dtype=dtype)
    ws = [torch.randn(E, F, D, dtype=dtype) / D**0.5, torch.randn(E, F, D, dtype=dtype) / D**0.5,
          torch.randn(E, D, F, dtype=dtype) / F**0.5]
    if experts is None:
        experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32) if T else \
            torch.empty(0, K, dtype=torch.int32)
    weights = torch.rand(T, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [t.requires_grad_(requires_grad) for t in (x, *ws, weights)]
    return leaves, flexkern.dispatch(experts, E, mask)


def split_path(x, wg, wu, wd, w, d, frozen=None, backend=None):
    o = experts_swiglu_grouped(permute(x, d, backend), wg, wu, wd, d.offsets_E1, frozen, backend)
    return unpermute(o, d, w, backend)


def compare(leaves, d, frozen=None, backend_name=None, rtol=None, atol=None):
    x, wg, wu, wd, w = leaves
    y_fused = flexkern.experts_swiglu(x, wg, wu, wd, d, w, frozen, backend_name)
    y_split = split_path(x, wg, wu, wd, w, d, frozen, backend_name)
    torch.testing.assert_close(y_split, y_fused, rtol=rtol, atol=atol)
    if not x.shape[0]:
        return
    dy = torch.randn_like(y_fused)
    g_fused = torch.autograd.grad(y_fused, leaves, dy)
    g_split = torch.autograd.grad(y_split, leaves, dy)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down", "weights"), g_split, g_fused):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,D,F,E,K", [(1, 4, 6, 3, 2), (13, 8, 12, 5, 2), (9, 6, 4, 4, 4), (6, 4, 4, 3, 1)])
def test_split_equals_fused(T, D, F, E, K, dtype):
    mask = torch.rand(E) > 0.3
    leaves, d = make(T, D, F, E, K, dtype, mask=mask)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    compare(leaves, d, **tol)


def test_expert_without_rows_and_all_rows_on_one_expert():
    E = 4
    experts = torch.full((10, 1), 2, dtype=torch.int32)  # experts 0, 1, 3 get nothing
    leaves, d = make(10, 6, 5, E, 1, experts=experts)
    compare(leaves, d)


def test_zero_tokens():
    leaves, d = make(0, 4, 6, 3, 2)
    x, wg, wu, wd, w = leaves
    y = split_path(x, wg, wu, wd, w, d)
    assert y.shape == (0, 4)
    y.sum().backward()  # an empty backward runs
    assert x.grad.shape == (0, 4) and torch.count_nonzero(wg.grad) == 0


def test_dropped_slots_give_zero_rows_and_no_gradient():
    mask = torch.tensor([True, False, True])
    leaves, d = make(8, 4, 6, 3, 2, mask=mask)
    x, wg, wu, wd, w = leaves
    used = int(d.offsets_E1[-1])
    assert used < 16  # some slots chose expert 1 and were dropped
    x_ND = permute(x, d)
    assert torch.count_nonzero(x_ND[used:]) == 0
    y = split_path(x, wg, wu, wd, w, d)
    y.sum().backward()
    dropped = d.row_of_slot_TK < 0
    assert torch.count_nonzero(w.grad[dropped]) == 0
    assert torch.count_nonzero(wg.grad[1]) == torch.count_nonzero(wd.grad[1]) == 0
    compare([t.detach().requires_grad_() for t in leaves], d)


def test_grouped_padding_rows_are_zero_even_when_poisoned():
    E, D, F, N = 3, 5, 4, 12
    x = torch.randn(N, D, dtype=torch.float64)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int64)
    x[7:] = float("nan")  # rows past offsets[E] must never be read
    ws = [torch.randn(E, F, D, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    wd = torch.randn(E, D, F, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    o = experts_swiglu_grouped(xr, *ws, wd, offsets)
    assert torch.equal(o[7:], torch.zeros(N - 7, D, dtype=o.dtype))
    assert torch.isfinite(o[:7]).all()
    for e, (a, b) in enumerate([(0, 3), (3, 7)]):
        ex = 0 if e == 0 else 2
        g, u = x[a:b] @ ws[0][ex].t(), x[a:b] @ ws[1][ex].t()
        torch.testing.assert_close(o[a:b], (torch.nn.functional.silu(g) * u) @ wd[ex].t())
    dy = torch.randn_like(o)
    dy[7:] = float("nan")  # a NaN gradient on a padding row must not leak either
    o.backward(dy)
    assert torch.equal(xr.grad[7:], torch.zeros(N - 7, D, dtype=o.dtype))
    assert torch.isfinite(xr.grad).all() and torch.isfinite(wd.grad).all()
    assert torch.count_nonzero(ws[0].grad[1]) == 0  # expert 1 had no rows


def test_frozen_experts_get_zero_weight_gradients():
    frozen = torch.tensor([True, False, False, True])
    leaves, d = make(12, 6, 5, 4, 2)
    x, wg, wu, wd, w = leaves
    split_path(x, wg, wu, wd, w, d, frozen).sum().backward()
    for g in (wg.grad, wu.grad, wd.grad):
        assert torch.count_nonzero(g[frozen]) == 0 and torch.count_nonzero(g[~frozen]) > 0
    compare([t.detach().requires_grad_() for t in leaves], d, frozen)


def test_gradcheck_each_op():
    leaves, d = make(5, 3, 4, 3, 2, mask=torch.tensor([True, True, False]))
    x, wg, wu, wd, w = leaves
    torch.autograd.gradcheck(lambda x: permute(x, d), (x,))
    x_ND = permute(x, d).detach().requires_grad_()
    torch.autograd.gradcheck(lambda *a: experts_swiglu_grouped(*a, d.offsets_E1), (x_ND, wg, wu, wd))
    torch.autograd.gradcheck(lambda o, w: unpermute(o, d, w), (x_ND, w))


def test_opcheck_each_op():
    leaves, d = make(6, 4, 5, 3, 2, dtype=torch.float32)
    x, wg, wu, wd, w = leaves
    x_ND = permute(x, d).detach().requires_grad_()
    ops = torch.ops.flexkern
    torch.library.opcheck(ops.permute.default, (x, d.token_of_row_N, d.row_of_slot_TK, "reference"))
    torch.library.opcheck(ops.unpermute.default, (x_ND, *d.tensors()[1:], w, "reference"))
    for save in (False, True):
        torch.library.opcheck(ops.experts_swiglu_grouped.default,
                              (x_ND, wg, wu, wd, d.offsets_E1, None, "reference", save))


def test_bad_input_names_the_argument():
    leaves, d = make(4, 4, 6, 3, 2)
    x, wg, wu, wd, w = leaves
    with pytest.raises(ValueError, match="dispatch is for 4 tokens"):
        permute(x[:3], d)
    with pytest.raises(ValueError, match="offsets must have shape"):
        experts_swiglu_grouped(permute(x, d), wg, wu, wd, d.offsets_E1[:-1])
    with pytest.raises(TypeError, match="offsets has dtype"):
        experts_swiglu_grouped(permute(x, d), wg, wu, wd, d.offsets_E1.float())
    with pytest.raises(ValueError, match="o must have shape"):
        unpermute(x, d, w)
    with pytest.raises(TypeError, match="dispatch must be"):
        unpermute(permute(x, d), d.tensors(), w)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append((str(func.overloadpacket.__name__), 0 if first is None else first.numel()))
        return func(*args, **(kwargs or {}))


def test_grouped_takes_engine_layouts_without_copies():
    """Flattened / transposed weight views (OLMo-core's (E*F, D) w1/w3 and w2 read as w2^T) and
    int32 counts: the same result as contiguous weights and int64 offsets, no aten copy of a
    weight, and gradients back in the views' layout."""
    E, F, D, N = 3, 6, 5, 10
    w1 = torch.randn(E * F, D, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(E * F, D, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E * F, D, dtype=torch.float64, requires_grad=True)
    gate, up, down = w1.view(E, F, D), w3.view(E, F, D), w2.view(E, F, D).transpose(1, 2)
    counts = torch.tensor([4, 0, 5], dtype=torch.int32)  # an empty expert, a padding row
    offsets = ops_offsets(counts)
    assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 4, 4, 9]
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    offsets32 = offsets.int()
    with _CountOps() as counted:
        o = experts_swiglu_grouped(x, gate, up, down, offsets32)
    copies = [(op, n) for op, n in counted.ops if op in ("clone", "contiguous", "_to_copy", "copy_")]
    assert all(n <= E + 1 for _, n in copies), copies  # only the (E+1) offsets, never a weight
    want = experts_swiglu_grouped(x, gate.contiguous(), up.contiguous(), down.contiguous(), offsets)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    o.square().sum().backward()
    for w in (w1, w2, w3, x):
        assert w.grad is not None and w.grad.shape == w.shape and torch.isfinite(w.grad).all()
    assert torch.count_nonzero(w1.grad[F:2 * F]) == 0  # the empty expert gets no gradient
    with pytest.raises(TypeError, match="counts"):
        ops_offsets(torch.tensor([1.0, 2.0]))


def test_triton_interpreter_split_equals_fused(monkeypatch):
    if "triton" not in backend.available("experts_swiglu"):
        pytest.skip("triton backend not registered")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels were built without the interpreter in this process")
    monkeypatch.setenv("FLEXKERN_TRITON_POISON", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, d = make(9, 16, 32, 3, 2, torch.float32, mask=torch.tensor([True, False, True]),
                     requires_grad=False)
    leaves = [t.to(dev).requires_grad_() for t in leaves]
    d = flexkern.Dispatch(*(t.to(dev) for t in d.tensors()))
    compare(leaves, d, torch.tensor([False, False, True], device=dev), "triton", rtol=1e-5, atol=1e-5)


def test_bad_offsets_and_hand_built_dispatch_are_refused():
    leaves, d = make(5, 4, 6, 3, 2, dtype=torch.float32)
    x, wg, wu, wd, w = leaves
    x_ND = permute(x, d)
    for offsets, why in (([1, 2, 3, 4], "start at 0"), ([0, 5, 3, 6], "never decrease"), ([0, 3, 6, 11], "more than")):
        with pytest.raises(ValueError, match=why):
            experts_swiglu_grouped(x_ND, wg, wu, wd, torch.tensor(offsets))
    # validate=False: offsets past the rows are clamped on the device, never read out of bounds
    o = experts_swiglu_grouped(x_ND, wg, wu, wd, torch.tensor([0, 3, 6, 99]), validate=False)
    o_ok = experts_swiglu_grouped(x_ND, wg, wu, wd, torch.tensor([0, 3, 6, 10]))
    assert torch.equal(o, o_ok)
    bad_rows = d.row_of_slot_TK.clone()
    bad_rows[0, 0] = 99  # a hand-built Dispatch pointing past the rows
    bad = flexkern.Dispatch(d.offsets_E1, d.token_of_row_N, d.slot_of_row_N, bad_rows)
    with pytest.raises(ValueError, match="invalid Dispatch"):
        unpermute(x_ND, bad, w)


def test_split_path_compiles_fullgraph():
    """route -> dispatch -> permute -> grouped -> unpermute under torch.compile(fullgraph=True):
    the same output and gradients as eager."""
    torch._dynamo.reset()
    leaves, _ = make(9, 8, 6, 4, 2, dtype=torch.float32)
    x, wg, wu, wd, _ = leaves
    router = (torch.randn(4, 8) / 8**0.5).requires_grad_()

    def layer(x, router, wg, wu, wd):
        w, e, _ = flexkern.route(x, router, 2)
        d = flexkern.dispatch(e, 4, validate=False)
        return unpermute(experts_swiglu_grouped(permute(x, d), wg, wu, wd, d.offsets_E1), d, w)

    args = (x, router, wg, wu, wd)
    y_eager, y_comp = layer(*args), torch.compile(layer, fullgraph=True)(*args)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y_eager)
    for a, b in zip(torch.autograd.grad(y_comp, args, dy), torch.autograd.grad(y_eager, args, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_interpreter_says_when_numpy_is_too_new(monkeypatch):
    """flexkern pins no numpy (an engine's newer numpy survives its install); the Triton CPU
    interpreter, which needs numpy < 2.3, declines with a message saying so."""
    triton_ops = pytest.importorskip("flexkern.triton.ops")
    import numpy

    check = triton_ops._interpreter_numpy_problem.__wrapped__
    monkeypatch.setattr(numpy, "__version__", "2.3.1")
    assert "numpy < 2.3" in check() and "2.3.1" in check()
    monkeypatch.setattr(numpy, "__version__", "2.2.6")
    assert check() is None
