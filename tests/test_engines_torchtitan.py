"""flexkern inside torchtitan: use_flexkern swaps GroupedExperts' computation and nothing else.
torchtitan's own path is the oracle: bf16 (its compute dtype) within PyTorch's own bf16 error of
the float64 truth, float32 weights no less accurate than torchtitan's bf16 path; the whole MoE
block with torchtitan's router and dispatcher; torchtitan's real expert parallelism (parallelize,
all-to-all dispatcher, gloo, world size 2) with flexkern applied before or after parallelize;
compiled; and the refusals."""
import contextlib
import copy

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan", reason="torchtitan not installed (pip install 'flexkern[torchtitan]')")
from torchtitan.models.common import config_utils  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts  # noqa: E402

from flexkern.integrations import engines  # noqa: E402
from flexkern.integrations.engines import UnsupportedModuleError  # noqa: E402
from flexkern.integrations.torchtitan import use_flexkern  # noqa: E402
from test_ep import spawn  # noqa: E402

D, F, E, K = 16, 32, 4, 2  # torch._grouped_mm on the CPU needs 16-byte strides: multiples of 8 in bf16
COUNTS = [3, 0, 5, 2]


def experts(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    m = GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E).build()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.to(dtype)


def moe_block(seed=0, dtype=torch.float32, ep=False):
    torch.manual_seed(seed)
    router = config_utils.make_router_config(dim=D, num_experts=E, gate_param_init={}, top_k=K,
                                             score_func="softmax")
    routed = config_utils.make_routed_experts_config(dim=D, hidden_dim=F, num_experts=E, top_k=K,
                                                     param_init={}, comm_backend="standard")
    cfg = config_utils.make_moe_config(num_experts=E, router=router, routed_experts=routed,
                                       load_balance_coeff=None)
    if ep:
        from torchtitan.models.common.moe_sharding import set_moe_sharding_config
        set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                                expert_param_layout={"w1_EFD": None, "w2_EDF": None, "w3_EFD": None})
    m = cfg.build()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.to(dtype)


@contextlib.contextmanager
def flexkern_calls():
    """The row shapes flexkern's expert call saw while the block ran."""
    import flexkern.integrations.torchtitan as tt
    calls, real = [], engines.grouped_swiglu

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    tt.grouped_swiglu = spy
    try:
        yield calls
    finally:
        tt.grouped_swiglu = real


def truth64(module, x, counts):
    """The same SwiGLU experts in float64 (flexkern's reference, checked against OLMo-core's and
    torchtitan's own paths elsewhere) as the accuracy yardstick."""
    m = use_flexkern(copy.deepcopy(module).double())
    with torch.no_grad():
        return m(x.double(), counts)


def test_bf16_within_pytorchs_own_error_and_gradients():
    engine = experts()
    ours = use_flexkern(copy.deepcopy(engine))
    assert type(ours).__name__ == "FlexkernGroupedExperts" and isinstance(ours, GroupedExperts)
    x = torch.randn(sum(COUNTS), D).bfloat16()
    counts = torch.tensor(COUNTS, dtype=torch.int32)
    truth = truth64(engine, x, counts)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_e, y_o = engine(xs[0], counts), ours(xs[1], counts)
    assert y_o.dtype == torch.bfloat16
    err_e = float((y_e.double() - truth).abs().max())
    err_o = float((y_o.double() - truth).abs().max())
    assert err_o <= 2 * err_e + 1e-3, (err_o, err_e)
    dy = torch.randn_like(y_e)
    (y_e * dy).sum().backward()
    (y_o * dy).sum().backward()
    scale = float(xs[0].grad.abs().max())
    assert float((xs[1].grad - xs[0].grad).abs().max()) <= 0.05 * scale
    for (n, pe), po in zip(engine.named_parameters(), ours.parameters()):
        assert po.grad.dtype == pe.grad.dtype
        assert float((po.grad - pe.grad).float().abs().max()) <= 0.05 * float(pe.grad.abs().max()), n
    assert torch.count_nonzero(ours.w1_EFD.grad[1]) == 0  # the expert without rows


def test_float32_weights_are_no_less_accurate_than_torchtitans_bf16_path():
    engine = experts(torch.float32)
    ours = use_flexkern(copy.deepcopy(engine))
    x = torch.randn(sum(COUNTS), D)
    counts = torch.tensor(COUNTS)
    truth = truth64(engine, x, counts)
    with torch.no_grad():
        err_e = float((engine(x, counts).double() - truth).abs().max())
        err_o = float((ours(x, counts).double() - truth).abs().max())
    assert err_o <= err_e and err_o < 1e-4, (err_o, err_e)


def test_moe_block_with_torchtitans_router_and_dispatcher():
    engine = moe_block(dtype=torch.bfloat16)
    ours = use_flexkern(copy.deepcopy(engine))
    assert type(ours.routed_experts.inner_experts).__name__ == "FlexkernGroupedExperts"
    x = torch.randn(2, 6, D).bfloat16()
    torch.testing.assert_close(ours(x), engine(x), rtol=2e-2, atol=2e-2)
    with flexkern_calls() as calls:
        ours(x)
    assert calls == [(2 * 6 * K, D)]  # flexkern ran the experts, on the dispatcher's rows


def test_idempotent_and_compiled():
    m = use_flexkern(experts(torch.float32))
    cls = type(m)
    use_flexkern(m, backend="reference")
    assert type(m) is cls and m.flexkern_backend == "reference"
    x, counts = torch.randn(sum(COUNTS), D), torch.tensor(COUNTS)
    compiled = torch.compile(lambda x, c: m(x, c), fullgraph=True)
    torch.testing.assert_close(compiled(x, counts), m(x, counts), rtol=1e-5, atol=1e-6)


def test_refusals_name_the_module_and_change_nothing():
    class Float8Like(GroupedExperts):
        def _grouped_mm(self, *, A, B_t, offs):
            return super()._grouped_mm(A=A, B_t=B_t, offs=offs)

    odd = Float8Like(GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E))
    model = torch.nn.ModuleDict({"fine": experts(), "odd": odd})
    with pytest.raises(UnsupportedModuleError, match="Float8Like at 'odd'.*_grouped_mm is replaced"):
        use_flexkern(model)
    assert type(model["fine"]) is GroupedExperts
    wrapped = experts()
    wrapped.forward = lambda *a: GroupedExperts.forward(copy.copy(wrapped), *a)  # an unknown wrapper
    with pytest.raises(UnsupportedModuleError, match="wrapped on the instance"):
        use_flexkern(wrapped)
    mixed = experts()
    mixed.w2_EDF = torch.nn.Parameter(mixed.w2_EDF.detach().float())
    with pytest.raises(UnsupportedModuleError, match="different dtypes"):
        use_flexkern(mixed)
    with pytest.raises(UnsupportedModuleError, match="no torchtitan GroupedExperts"):
        use_flexkern(torch.nn.Linear(2, 2))


# ---- torchtitan's expert parallelism (parallelize + all-to-all dispatcher, gloo, world 2) -------------
def ep_scenario(rank, world):
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed.utils import set_spmd_backend
    parallel_dims.device_type = "cpu"  # torchtitan picks its device type at import; here: gloo/CPU
    set_spmd_backend("partial_dtensor")
    dims = parallel_dims.ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world,
                                      world_size=world, spmd_backend="partial_dtensor")
    dims.build_mesh()
    engine, before, after = (moe_block(dtype=torch.bfloat16, ep=True) for _ in range(3))
    use_flexkern(before)
    for m in (engine, before, after):
        m.parallelize(dims)
    assert "forward" in after.routed_experts.inner_experts.__dict__  # parallelize's wrapper
    use_flexkern(after)  # redirected inside that wrapper
    w1 = engine.routed_experts.inner_experts.w1_EFD
    assert type(w1).__name__ == "DTensor" and w1.to_local().shape[0] == E // world
    torch.manual_seed(30 + rank)
    x = torch.randn(2, 6, D).bfloat16()
    y_engine = engine(x)
    for m in (before, after):
        assert type(m.routed_experts.inner_experts).__name__ == "FlexkernGroupedExperts"
        x_m = x.clone().requires_grad_()
        with flexkern_calls() as calls:
            y = m(x_m)
        assert len(calls) == 1, calls  # flexkern ran this rank's experts (not the engine's path)
        torch.testing.assert_close(y, y_engine, rtol=2e-2, atol=2e-2)
        y.float().square().sum().backward()
        g = m.routed_experts.inner_experts.w1_EFD.grad
        assert g is not None and torch.isfinite(g.to_local().float()).all()


def test_under_torchtitan_expert_parallelism():
    spawn("ep_scenario", 2, module=__name__)
