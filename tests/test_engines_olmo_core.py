"""flexkern inside OLMo-core: use_flexkern swaps the expert MLPs' computation and nothing else.
OLMo-core's own forward is the oracle (outputs and every gradient, float64 exactly, float32
within PyTorch's own error), with uneven rows and empty experts, int32 counts, under OLMo-core's
expert parallelism (apply_ep, gloo, world size 2) and FSDP2, compiled, and the refusals."""
import copy
import warnings

import pytest
import torch

olmo_core = pytest.importorskip("olmo_core", reason="OLMo-core not installed (pip install 'flexkern[olmo-core]')")
from olmo_core.nn.moe.mlp import DroplessMoEMLP, MoEMLP  # noqa: E402

from flexkern.integrations.engines import UnsupportedModuleError  # noqa: E402
from flexkern.integrations.olmo_core import use_flexkern  # noqa: E402
from test_ep import spawn  # noqa: E402

D, F, E = 8, 12, 4
COUNTS = [3, 0, 5, 2]  # uneven, one expert without rows


def dropless(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Grouped GEMM not available": the oracle's CPU fallback
        return DroplessMoEMLP(d_model=D, hidden_size=F, num_experts=E, dtype=dtype)


def capacity(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MoEMLP(d_model=D, hidden_size=F, num_experts=E, dtype=dtype)


def run(module, x, *extra, dy):
    """(y, dx, {name: grad}) for one forward/backward."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x, *extra)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def compare(a, b, **tol):
    (ya, dxa, ga), (yb, dxb, gb) = a, b
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(dxa, dxb, **tol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **tol)


@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_dropless_matches_olmo_core_exactly_in_float64(counts_dtype):
    engine = dropless()
    ours = use_flexkern(copy.deepcopy(engine))
    assert type(ours).__name__ == "FlexkernDroplessMoEMLP" and isinstance(ours, DroplessMoEMLP)
    assert ours.state_dict().keys() == engine.state_dict().keys()
    x = torch.randn(sum(COUNTS), D, dtype=torch.float64)
    dy = torch.randn_like(x)
    counts = torch.tensor(COUNTS, dtype=counts_dtype)
    compare(run(ours, x, counts, dy=dy), run(engine, x, counts, dy=dy), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(ours.w1.grad.view(E, F, D)[1]) == 0  # the empty expert


def test_capacity_mlp_matches_olmo_core_exactly_in_float64():
    engine = capacity()
    ours = use_flexkern(copy.deepcopy(engine))
    x = torch.randn(E, 5, D, dtype=torch.float64)
    dy = torch.randn_like(x)
    compare(run(ours, x, dy=dy), run(engine, x, dy=dy), rtol=1e-12, atol=1e-12)


def test_float32_within_pytorchs_own_error():
    engine64 = dropless()
    engine32 = copy.deepcopy(engine64).float()
    ours32 = use_flexkern(copy.deepcopy(engine32))
    x = torch.randn(sum(COUNTS), D, dtype=torch.float64)
    counts = torch.tensor(COUNTS)
    with torch.no_grad():
        truth = engine64(x, counts)
        err_engine = float((engine32(x.float(), counts).double() - truth).abs().max())
        err_ours = float((ours32(x.float(), counts).double() - truth).abs().max())
    assert err_ours <= 2 * err_engine + 1e-7, (err_ours, err_engine)


def test_bf16_activations_run_in_the_weights_dtype():
    """bf16 rows against float32 weights: computed in float32 (OLMo-core's own rule), returned in
    bf16; OLMo-core's CPU fallback cannot mix the dtypes at all."""
    engine = dropless(torch.float32)
    ours = use_flexkern(copy.deepcopy(engine))
    x = torch.randn(sum(COUNTS), D).bfloat16()
    counts = torch.tensor(COUNTS)
    y = ours(x, counts)
    assert y.dtype == torch.bfloat16
    want = engine(x.float(), counts).bfloat16()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_whole_model_in_place_idempotent_and_compiled():
    model = torch.nn.ModuleDict({"a": dropless(torch.float32), "b": capacity(torch.float32), "c": torch.nn.Linear(2, 2)})
    assert use_flexkern(model) is model
    cls = type(model["a"])
    use_flexkern(model, backend="reference")  # again: nothing changes but the backend
    assert type(model["a"]) is cls and model["a"].flexkern_backend == "reference"
    engine = dropless(torch.float32)
    x = torch.randn(sum(COUNTS), D)
    counts = torch.tensor(COUNTS)
    compiled = torch.compile(lambda x, c: model["a"](x, c), fullgraph=True)
    torch.testing.assert_close(compiled(x, counts), engine(x, counts), rtol=1e-5, atol=1e-6)


def test_refusals_name_the_module_and_change_nothing():
    class Custom(DroplessMoEMLP):
        def forward(self, x, batch_size_per_expert):
            return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd = Custom(d_model=D, hidden_size=F, num_experts=E)
    model = torch.nn.ModuleDict({"fine": dropless(), "odd": odd})
    with pytest.raises(UnsupportedModuleError, match="Custom at 'odd'.*overrides DroplessMoEMLP.forward"):
        use_flexkern(model)
    assert type(model["fine"]) is DroplessMoEMLP  # nothing was changed
    sharded = dropless()
    sharded.hidden_sharding_degree = 2
    with pytest.raises(UnsupportedModuleError, match="hidden dimension"):
        use_flexkern(sharded)
    mixed = dropless()
    mixed.w2 = torch.nn.Parameter(mixed.w2.detach().float())
    with pytest.raises(UnsupportedModuleError, match="different dtypes"):
        use_flexkern(mixed)
    with pytest.raises(UnsupportedModuleError, match="no OLMo-core DroplessMoEMLP or MoEMLP"):
        use_flexkern(torch.nn.Linear(2, 2))


# ---- OLMo-core's expert parallelism and FSDP2 (gloo, world size 2) ----------------------------------
def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))


def ep_scenario(rank, world):
    """apply_ep shards the experts (DTensor, dim 0); each rank computes its local experts' rows.
    flexkern applied before apply_ep on one copy, after it on another: both equal OLMo-core."""
    mesh = _mesh(world)
    engine, before, after = dropless(), dropless(), dropless()
    use_flexkern(before)
    for m in (engine, before, after):
        m.apply_ep(mesh)
    use_flexkern(after)
    assert type(engine.w1).__name__ == "DTensor" and engine.num_local_experts == E // world
    torch.manual_seed(10 + rank)
    counts = torch.tensor([4, 0] if rank == 0 else [1, 6])
    x = torch.randn(int(counts.sum()), D, dtype=torch.float64)
    dy = torch.randn_like(x)
    want = run(engine, x, counts, dy=dy)
    for m in (before, after):
        got = run(m, x, counts, dy=dy)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
        for n in want[2]:
            torch.testing.assert_close(got[2][n].to_local(), want[2][n].to_local(), rtol=1e-12, atol=1e-12)


def fsdp2_scenario(rank, world):
    """FSDP2 (fully_shard) over the expert MLP, flexkern applied before and after sharding:
    outputs and the sharded gradients equal OLMo-core's under the same FSDP2."""
    from torch.distributed.fsdp import fully_shard
    mesh = _mesh(world)
    engine, before, after = capacity(torch.float32), capacity(torch.float32), capacity(torch.float32)
    use_flexkern(before)
    for m in (engine, before, after):
        fully_shard(m, mesh=mesh)
    use_flexkern(after)
    assert type(after).__name__.startswith("Flexkern") and "FSDP" in type(after).__mro__[1].__name__
    torch.manual_seed(20 + rank)
    x = torch.randn(E, 3, D)
    dy = torch.randn_like(x)
    want = run(engine, x, dy=dy)
    for m in (before, after):
        got = run(m, x, dy=dy)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for n in want[2]:
            torch.testing.assert_close(got[2][n].to_local(), want[2][n].to_local(), rtol=1e-5, atol=1e-6)


def test_under_olmo_core_expert_parallelism():
    spawn("ep_scenario", 2, module=__name__)


def test_under_fsdp2():
    spawn("fsdp2_scenario", 2, module=__name__)
