"""flexmoe_from_hf: a FlexMoE sharing a transformers MoE block's tensors, whose forward and
gradients equal the block's own, for Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and
FlexOlmo (float64 exactly, float32 within PyTorch's own float32 error), inside whole models too,
and the clear refusals."""
import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5")
from transformers import (DeepseekV3Config, FlexOlmoConfig, MixtralConfig, OlmoeConfig,  # noqa: E402
                          Qwen2MoeConfig, Qwen3MoeConfig)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (MixtralSparseMoeBlock,  # noqa: E402
                                                          load_balancing_loss_func)
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from flexkern.integrations.transformers import UnsupportedExpertsError, flexmoe_from_hf  # noqa: E402

D = 16
# transformers' routers compute their probabilities in float32 even in float64 models, so
# float64 comparisons with the blocks carry float32 rounding of the routing weights.
HF_TOL = dict(rtol=1e-5, atol=1e-6)
BLOCKS = {
    "mixtral": lambda norm: MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=D, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": lambda norm: OlmoeSparseMoeBlock(OlmoeConfig(
        hidden_size=D, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm)),
    "qwen2_moe": lambda norm: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=norm)),
    "qwen3_moe": lambda norm: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)),
    "deepseek_v3": lambda norm: DeepseekV3MoE(DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm)),
    "flex_olmo": lambda norm: FlexOlmoSparseMoeBlock(FlexOlmoConfig(
        hidden_size=D, intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm)),
}


def random_block(name, norm=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = BLOCKS[name](norm)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias.normal_(0, 0.1)
    block = block.to(dtype)
    if hasattr(block.gate, "e_score_correction_bias"):  # DeepSeek-V3 keeps its router in float32
        block.gate.float()
    return block


def forward_and_grads(module, params, x, dy):
    """(y, dx, {parameter: gradient}) of module on x with output gradient dy."""
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {p: p.grad for p in params}


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("norm", [False, True])
def test_forward_and_gradients_equal_the_block(name, norm):
    block = random_block(name, norm, torch.float64)
    moe = flexmoe_from_hf(block)
    params = list(block.parameters())
    assert {id(p) for p in moe.parameters()} == {id(p) for p in params}  # shared, not copied
    x = torch.randn(3, 7, D, dtype=torch.float64)
    dy = torch.randn_like(x)
    y_hf, dx_hf, g_hf = forward_and_grads(block, params, x, dy)
    y_fk, dx_fk, g_fk = forward_and_grads(moe, params, x, dy)
    # Every transformers router computes its probabilities in float32 (also for float64 models):
    # the same experts are chosen, and the weights carry float32 rounding in both.
    _, _, ids_hf = block.gate(x.reshape(-1, D))
    import flexkern
    _, ids_fk, _ = flexkern.route(x.reshape(-1, D), moe.router.weight, moe.top_k, None, None,
                                  renormalize=moe.renormalize, **moe._gating())
    assert torch.equal(ids_fk.long().sort(-1).values, ids_hf.sort(-1).values)
    tol = HF_TOL
    torch.testing.assert_close(y_fk, y_hf, **tol)
    torch.testing.assert_close(dx_fk, dx_hf, **tol)
    for p in params:
        want, got = g_hf[p], g_fk[p]
        if want is None:  # e.g. experts no token chose
            assert got is None or bool((got == 0).all())
        else:
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_float32_within_torchs_own_error(name):
    block64 = random_block(name, True, torch.float64)
    block32 = copy.deepcopy(block64).float()
    x64 = torch.randn(4, 9, D, dtype=torch.float64)
    with torch.no_grad():
        truth = block64(x64)
        err_torch = float((block32(x64.float()).double() - truth).abs().max())
        err_fk = float((flexmoe_from_hf(block32)(x64.float()).double() - truth).abs().max())
    assert err_fk <= 2 * err_torch + 1e-6, (err_fk, err_torch)


def test_weights_are_shared_not_copied():
    block = random_block("qwen2_moe")
    moe = flexmoe_from_hf(block)
    assert moe.router.weight is block.gate.weight
    gate_up = block.experts.gate_up_proj
    assert moe.experts.gate_proj.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    assert moe.experts.up_proj.data_ptr() == gate_up[:, 24:].data_ptr()
    assert moe.experts.down_proj.data_ptr() == block.experts.down_proj.data_ptr()
    assert moe.shared_expert.gate_proj is block.shared_expert.gate_proj.weight
    assert moe.shared_expert.output_gate is block.shared_expert_gate.weight
    with torch.no_grad():  # a change to the block is a change to the layer
        block.experts.down_proj.mul_(2)
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), block(x[None])[0], **HF_TOL)


def test_deepseek_score_bias_is_the_blocks_buffer():
    block = random_block("deepseek_v3")
    moe = flexmoe_from_hf(block)
    assert moe.score_bias is block.gate.e_score_correction_bias
    assert moe.router.weight.dtype == torch.float32 and moe.experts.gate_proj.dtype == torch.float64
    before = block.gate.e_score_correction_bias.clone()
    moe.train()
    moe(torch.randn(2, 9, D, dtype=torch.float64))
    moe.update_score_bias(rate=0.01)
    assert not torch.equal(block.gate.e_score_correction_bias, before)  # the block sees the update
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), block(x), **HF_TOL)


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen3_moe"])
def test_load_balancing_loss_equals_transformers(name):
    block = random_block(name, dtype=torch.float32)
    moe = flexmoe_from_hf(block)
    x = torch.randn(3, 8, D)
    moe(x)
    logits, _, _ = block.gate(x)
    want = load_balancing_loss_func((logits,), moe.num_experts, moe.top_k)
    torch.testing.assert_close(moe.load_balancing_loss, want, rtol=1e-5, atol=1e-6)


def test_opt_out_on_a_converted_block_equals_deleting_the_expert():
    block = random_block("olmoe", norm=True)
    moe = flexmoe_from_hf(block)
    moe.expert_mask[3] = False
    keep = [e for e in range(8) if e != 3]
    small = random_block("olmoe", norm=True)
    with torch.no_grad():
        small.gate.weight = nn.Parameter(block.gate.weight[keep].clone())
        small.gate.num_experts = 7
        small.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj[keep].clone())
        small.experts.down_proj = nn.Parameter(block.experts.down_proj[keep].clone())
        small.experts.num_experts = 7
    x = torch.randn(2, 6, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), flexmoe_from_hf(small)(x), rtol=1e-12, atol=1e-12)


def test_whole_model_with_every_block_converted():
    cfg = MixtralConfig(vocab_size=64, hidden_size=D, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                        num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).double().eval()
    model.set_experts_implementation("eager")  # transformers' grouped_mm path has no float64
    ids = torch.randint(0, 64, (2, 10))
    want = model(ids).logits
    for layer in model.model.layers:
        layer.mlp = flexmoe_from_hf(layer.mlp)
    torch.testing.assert_close(model(ids).logits, want, **HF_TOL)


def test_refusals_name_the_block_and_the_reason():
    block = random_block("mixtral")
    block.jitter_noise = 0.1
    with pytest.raises(UnsupportedExpertsError, match="MixtralSparseMoeBlock.*jitter"):
        flexmoe_from_hf(block)
    with pytest.raises(UnsupportedExpertsError, match="not a transformers MoE block"):
        flexmoe_from_hf(nn.Linear(4, 4))

    class MyRouter(type(random_block("olmoe").gate)):
        pass

    block = random_block("olmoe")
    block.gate.__class__ = MyRouter
    with pytest.raises(UnsupportedExpertsError, match="router MyRouter"):
        flexmoe_from_hf(block)
    block = random_block("qwen2_moe")
    block.shared_expert.act_fn = nn.GELU()
    with pytest.raises(UnsupportedExpertsError, match="activation is GELU"):
        flexmoe_from_hf(block)
    block = random_block("qwen2_moe")
    block.shared_expert.up_proj = nn.Linear(D, 40, bias=True).double()
    with pytest.raises(UnsupportedExpertsError, match="biases"):
        flexmoe_from_hf(block)
    block = random_block("olmoe")
    block.experts.act_fn = nn.GELU()
    with pytest.raises(UnsupportedExpertsError, match="activation"):
        flexmoe_from_hf(block)
