"""Triton experts_swiglu kernels against the reference, forward and backward.

Without a GPU the kernels run in the Triton interpreter (float32/float16, small awkward shapes:
several row tiles per expert, ragged D/F edges); with one they run compiled on CUDA. Every buffer
the kernels write is NaN-poisoned first (FLEXKERN_TRITON_POISON), and tolerances are relative to
PyTorch's own error in the dtype: err(triton vs fp64) <= 2 err(torch in dtype vs fp64) + eps/2
(relative Frobenius errors; inputs are rounded to the dtype before the fp64 reference sees them).
Both backward paths run: g, u saved by the forward (save_activations) and recomputed from x.
"""
import os

import torch

if not torch.cuda.is_available():
    # triton.jit reads this when the kernels are built (at their first launch).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flexkern  # noqa: E402
from flexkern.triton.schedule import swizzle  # noqa: E402
from flexkern.ops import backend, dispatch_ref, experts_bwd_ref, experts_fwd_ref  # noqa: E402

# The interpreter turns 0-d arrays into loop bounds with a numpy deprecation warning (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def triton_fns():
    if "triton" not in backend.available("experts_swiglu"):
        pytest.skip("triton backend not registered")
    return (backend.lookup("experts_swiglu", "triton", torch.device(DEVICE))[1],
            backend.lookup("experts_swiglu_backward", "triton", torch.device(DEVICE))[1])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXKERN_TRITON_POISON", "1")


def make_case(T, D, F, E, K, experts_TK=None, mask_E=None, frozen_E=None, poison_unused=True):
    """fp64 inputs on the CPU; weights of experts that receive no rows are NaN (never read)."""
    if experts_TK is None:
        experts_TK = (torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T
                      else torch.empty(0, K, dtype=torch.long)).to(torch.int32)
    d = flexkern.Dispatch(*dispatch_ref(experts_TK, E, mask_E))
    x = torch.randn(T, D, dtype=torch.float64)
    ws = [torch.randn(E, F, D, dtype=torch.float64) / D**0.5,
          torch.randn(E, F, D, dtype=torch.float64) / D**0.5,
          torch.randn(E, D, F, dtype=torch.float64) / F**0.5]
    weights = torch.rand(T, K, dtype=torch.float32)
    dy = torch.randn(T, D, dtype=torch.float64)
    idle_E = (d.offsets_E1[1:] == d.offsets_E1[:-1])
    return dict(x=x, ws=ws, d=d, weights=weights, dy=dy, frozen=frozen_E, idle=idle_E,
                poison_unused=poison_unused)


def run_both(case, dtype, saved):
    """(triton outputs, torch-in-dtype outputs, fp64 outputs): (y, dx, dWg, dWu, dWd, dw), then,
    when ``saved`` (the backward uses the forward's g, u), the routed rows of g and u."""
    fwd, bwd = triton_fns()
    # Round the inputs to dtype first: the fp64 reference then sees exactly the kernel's inputs.
    rnd = lambda t: t.to(dtype).double()
    case = dict(case, x=rnd(case["x"]), ws=[rnd(w) for w in case["ws"]], dy=rnd(case["dy"]))

    def args(dt, dev, nan_idle):
        ws = [w.to(dev, dt) for w in case["ws"]]
        if nan_idle:  # experts without rows: weights must never be read
            ws = [torch.where(case["idle"].to(dev)[:, None, None], float("nan"), w) for w in ws]
        d = [t.to(dev) for t in case["d"].tensors()]
        frozen = None if case["frozen"] is None else case["frozen"].to(dev)
        return case["x"].to(dev, dt), ws, d, case["weights"].to(dev), frozen

    out = []
    for dt, dev, fns, nan_idle in ((dtype, DEVICE, (fwd, bwd), case["poison_unused"]),
                                   (dtype, "cpu", (experts_fwd_ref, experts_bwd_ref), False),
                                   (torch.float64, "cpu", (experts_fwd_ref, experts_bwd_ref), False)):
        x, ws, d, w, frozen = args(dt, dev, nan_idle)
        y, g, u = fns[0](x, *ws, *d, w, frozen, save_activations=saved)
        assert g.shape == u.shape == (d[1].shape[0] if saved else 0, ws[0].shape[1])
        gu = dict(g_NF=g, u_NF=u) if saved else {}
        res = (y, *fns[1](case["dy"].to(dev, dt), x, *ws, *d, w, frozen, **gu))
        if saved:
            routed = int(d[0][-1])  # rows past offsets[E] of g, u are unspecified (NaN here)
            res += (g[:routed], u[:routed])
        out.append([r.detach().cpu() for r in res])
    return out


NAMES = ("y", "dx", "d_w_gate", "d_w_up", "d_w_down", "d_weights")
SAVED_NAMES = NAMES + ("g", "u")


def assert_relative(got, plain, ref, dtype, names=SAVED_NAMES):
    """Relative Frobenius errors: err(triton) <= 2 err(torch in dtype) + a floor of a few ulps."""
    for name, g, p, r in zip(names, got, plain, ref):
        assert g.shape == r.shape and g.dtype == p.dtype, (name, g.shape, g.dtype)
        assert bool(torch.isfinite(g).all()), f"{name}: not finite (a buffer was left unwritten)"
        if r.numel() == 0:
            continue
        norm = float(r.norm()) + 1e-30
        err, base = float((g.double() - r).norm()) / norm, float((p.double() - r).norm()) / norm
        # In float32 both errors sit at the rounding floor, where their ratio is noise (a 3-element
        # d_weights once measured 1.8e-7 vs torch's 4.9e-8): allow a few ulps there.
        floor = (4.0 if dtype == torch.float32 else 0.5) * torch.finfo(dtype).eps
        assert err <= 2 * base + floor, f"{name}: rel err {err:.3g} vs torch {base:.3g} (floor {floor:.3g})"


def assert_zero_dw(got, experts):
    for name, g in zip(NAMES[2:5], got[2:5]):
        for e in experts:
            assert bool((g[e] == 0).all()), f"{name}[{e}] should be exactly zero"


SAVED = pytest.mark.parametrize("saved", [True, False], ids=["saved_gu", "recompute_gu"])


@SAVED
@pytest.mark.parametrize("dtype", DTYPES)
def test_awkward_shapes_random_routing(dtype, saved):
    case = make_case(T=19, D=40, F=48, E=5, K=2)
    got, plain, ref = run_both(case, dtype, saved)
    assert_relative(got, plain, ref, dtype)
    assert_zero_dw(got, torch.nonzero(case["idle"]).flatten().tolist())


@SAVED
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_experts_drop_mode_never_read(dtype, saved):
    E = 6
    mask = torch.ones(E, dtype=torch.bool)
    mask[[1, 4]] = False
    case = make_case(T=24, D=32, F=40, E=E, K=3, mask_E=mask)
    assert bool(case["idle"][[1, 4]].all())  # their weights are NaN in the triton run
    got, plain, ref = run_both(case, dtype, saved)
    assert_relative(got, plain, ref, dtype)
    assert_zero_dw(got, [1, 4])
    dropped = case["d"].row_of_slot_TK < 0
    assert bool(dropped.any()) and bool((got[5][dropped] == 0).all())


@SAVED
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_tokens_to_one_expert(dtype, saved):
    T, E = 21, 4  # 21 rows: two row tiles of one expert, three experts without rows
    case = make_case(T=T, D=24, F=33, E=E, K=1, experts_TK=torch.full((T, 1), 2, dtype=torch.int32))
    got, plain, ref = run_both(case, dtype, saved)
    assert_relative(got, plain, ref, dtype)
    assert_zero_dw(got, [0, 1, 3])


@pytest.mark.parametrize("T,E,K,saved", [(1, 3, 3, True), (13, 4, 4, False), (2, 6, 1, True)])
def test_tiny_and_k_equals_e(T, E, K, saved):
    case = make_case(T=T, D=20, F=28, E=E, K=K)
    got, plain, ref = run_both(case, torch.float32, saved)
    assert_relative(got, plain, ref, torch.float32)


@SAVED
def test_zero_tokens(saved):
    case = make_case(T=0, D=16, F=24, E=3, K=2)
    got, _, ref = run_both(case, torch.float32, saved)
    assert len(got) == (8 if saved else 6)
    for name, g, r in zip(SAVED_NAMES, got, ref):
        assert g.shape == r.shape, name
    assert_zero_dw(got, range(3))


@SAVED
def test_every_expert_masked_gives_zeros(saved):
    E = 4
    case = make_case(T=9, D=16, F=16, E=E, K=2, mask_E=torch.zeros(E, dtype=torch.bool))
    got, _, _ = run_both(case, torch.float32, saved)
    for name, g in zip(NAMES, got):
        assert bool((g == 0).all()), name


@SAVED
@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_experts_get_zero_dw_others_exact(dtype, saved):
    E = 4
    frozen = torch.tensor([True, False, True, False])
    case = make_case(T=22, D=24, F=40, E=E, K=2, frozen_E=frozen)
    assert not bool(case["idle"].any())  # frozen experts do have rows: only dW is skipped
    got, plain, ref = run_both(case, dtype, saved)
    # the fp64 reference already zeroes frozen dW; dx and d weights still use frozen experts
    assert_relative(got, plain, ref, dtype)
    assert_zero_dw(got, [0, 2])
    assert all(bool((g[[1, 3]] != 0).any()) for g in got[2:5])


@triton.jit
def _order_kernel(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    """Stores the (m, n) tile each program gets from schedule.swizzle."""
    pid = tl.program_id(0)
    pid_m, pid_n = swizzle(pid, num_m, num_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


def test_grouped_tile_order_is_a_permutation_and_1_is_row_major():
    """schedule.swizzle: every GROUP_M visits each (m, n) tile exactly once; GROUP_M = 1 is the
    row-major order (pid // num_n, pid % num_n) that wgrad_kernel had before it took GROUP_M."""
    for num_m, num_n in ((1, 1), (2, 3), (3, 2), (5, 4), (7, 1)):
        grid = num_m * num_n
        for group_m in (1, 2, 3, 8):
            out = torch.full((grid, 2), -1, dtype=torch.int32, device=DEVICE)
            _order_kernel[(grid,)](out, num_m, num_n, GROUP_M=group_m)
            tiles = [tuple(t) for t in out.cpu().tolist()]
            assert sorted(tiles) == [(m, n) for m in range(num_m) for n in range(num_n)], (group_m, tiles)
            if group_m == 1:
                assert tiles == [(p // num_n, p % num_n) for p in range(grid)]


def test_gpu_tables_keep_the_measured_tile_orders():
    """Grouped tile order is a launch parameter; the GPU tables keep the orders they were measured
    with: row-major (1) for wgrad, 8 for the row-tiled GEMMs (change them only by measurement)."""
    from flexkern.triton import configs

    tables = [*configs._TABLE.values(), configs._DEFAULT, configs._DEFAULT_DECODE]
    assert all(t.wgrad.group_m == 1 for t in tables) and configs.SAFE_WGRAD.group_m == 1
    assert all(getattr(t, r).group_m == 8 for t in tables for r in ("gate_up", "down", "recompute", "dx"))


@pytest.mark.parametrize("group_m", [1, 3])
@pytest.mark.parametrize("saved", [True, False], ids=["saved_gu", "recompute_gu"])
def test_every_kernel_with_another_grouped_tile_order(monkeypatch, group_m, saved):
    """Every role's group_m set to 1 (row-major) or 3 (more than some tile counts here: a partial
    group), against the reference with poisoned outputs; the interpreter table itself uses 2."""
    import dataclasses

    from flexkern.triton import configs, ops

    base = configs._INTERPRETER
    cfg = dataclasses.replace(base, **{f.name: dataclasses.replace(getattr(base, f.name), group_m=group_m)
                                       for f in dataclasses.fields(base)})
    monkeypatch.setattr(ops, "pick", lambda *a: cfg)
    frozen = torch.tensor([False, True, False, False])
    # D = 24, F = 40 with 16-wide tiles: 2 x 3 weight-gradient tiles per expert, 2 and 3 column tiles
    case = make_case(T=23, D=24, F=40, E=4, K=2, frozen_E=frozen)
    got, plain, ref = run_both(case, torch.float32, saved)
    assert_relative(got, plain, ref, torch.float32)
    assert_zero_dw(got, [1])


def test_public_op_autograd_matches_reference():
    """flexkern.experts_swiglu(backend="triton") end to end through the custom op and autograd."""
    triton_fns()
    T, D, F, E, K = 17, 24, 32, 4, 2
    mask = torch.tensor([True, True, False, True], device=DEVICE)
    frozen = torch.tensor([False, True, False, False], device=DEVICE)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEVICE, torch.int32)
    d = flexkern.dispatch(experts, E, mask)
    leaves = [torch.randn(T, D), torch.randn(E, F, D) / D**0.5, torch.randn(E, F, D) / D**0.5,
              torch.randn(E, D, F) / F**0.5, torch.rand(T, K)]
    dy = torch.randn(T, D, device=DEVICE)
    grads = {}
    for name in ("triton", "reference"):
        ts = [t.to(DEVICE).requires_grad_() for t in leaves]
        y = flexkern.experts_swiglu(*ts[:4], d, ts[4], frozen, backend=name)
        y.backward(dy)
        grads[name] = [y.detach()] + [t.grad for t in ts]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_poison_hook_fills_nan(monkeypatch):
    from flexkern.triton import ops
    assert bool(torch.isnan(ops._buffer((3,), torch.float32, "cpu")).all())
    monkeypatch.delenv("FLEXKERN_TRITON_POISON")
    assert ops._buffer((3,), torch.float32, "cpu").shape == (3,)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=12), block_m=st.sampled_from([16, 64, 128]),
       slack=st.integers(0, 50))
def test_max_row_tiles_bounds_the_schedule(counts, block_m, slack):
    from flexkern.triton.configs import max_row_tiles
    needed = sum(-(-c // block_m) for c in counts)
    assert needed <= max_row_tiles(sum(counts) + slack, len(counts), block_m)


def test_import_error_without_triton(monkeypatch):
    """flexkern.triton raises ImportError (never another error) when triton cannot be imported."""
    saved = {k: v for k, v in sys.modules.items() if k == "flexkern.triton" or k.startswith("flexkern.triton.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setitem(sys.modules, "triton", None)
    try:
        with pytest.raises(ImportError):
            importlib.import_module("flexkern.triton")
    finally:
        monkeypatch.undo()
        sys.modules.update(saved)


def test_kernels_compile_for_hopper_offline():
    """Every Hopper bf16 launch-table entry (and the fallback) compiles for sm_90 with this triton
    and fits shared memory: triton lowers and runs its bundled ptxas without a GPU."""
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(flexkern.__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "flexkern.triton.compile_check", "--arch", "90", "--dtype", "bf16",
           "--regime", "large", "decode"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failed" in r.stdout
