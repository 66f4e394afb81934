"""FlexMoE's router family and balancing: sigmoid / group-limited / scaled gating through the
layer, the load-balancing losses against independent formulas (and transformers' own function),
per-expert token counts, the aux-loss-free score bias and its update, shared experts, masks for
every variant, torch.compile, and expert parallelism with all of it (gloo, world size 2)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexkern.distributed import ExpertParallelMoE, shard
from flexkern.nn import FlexMoE
from test_ep import spawn


def make(E=8, K=2, D=12, Fw=16, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    moe = FlexMoE(D, Fw, E, K, router_bias=False, dtype=dtype, **kw)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        for p in moe.experts.parameters():
            p.normal_(0, 0.3)
        if moe.shared_expert is not None:
            for p in moe.shared_expert.parameters():
                p.normal_(0, 0.3)
        if moe.score_bias is not None:
            moe.score_bias.normal_(0, 0.05)
    return moe


def hf_load_balancing_loss(logits_TE, E, K):
    """transformers' load_balancing_loss_func for one layer, no attention mask (written out)."""
    probs = torch.softmax(logits_TE, -1)
    _, selected = torch.topk(probs, K, dim=-1)
    tokens_per_expert = torch.nn.functional.one_hot(selected, E).float().mean(0)  # (K, E)
    return torch.sum(tokens_per_expert * probs.mean(0).unsqueeze(0)) * E


def test_load_balancing_loss_equals_transformers():
    moe = make(dtype=torch.float32)
    x = torch.randn(4, 9, 12)
    moe(x)
    logits = x.reshape(-1, 12) @ moe.router.weight.T
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        want = load_balancing_loss_func((logits,), 8, 2)
    except ImportError:
        want = hf_load_balancing_loss(logits, 8, 2)
    torch.testing.assert_close(moe.load_balancing_loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.load_balancing_loss, hf_load_balancing_loss(logits, 8, 2), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(moe.load_balancing_loss, moe.router.weight)
    (g_want,) = torch.autograd.grad(hf_load_balancing_loss(x.reshape(-1, 12) @ moe.router.weight.T, 8, 2),
                                    moe.router.weight)
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)


def sequence_balance_reference(moe, x):
    """DeepSeek-V3 eq. 17-20 per sequence, with loops (no flexkern code)."""
    B, L, D = x.shape
    E, K = moe.num_experts, moe.top_k
    active = moe.expert_mask.tolist()
    n_act = sum(active) if moe.mask_mode == "reroute" else E
    total = 0.0
    for b in range(B):
        logits = x[b] @ moe.router.weight.T
        if moe.scoring == "sigmoid":
            s = torch.sigmoid(logits) * moe.expert_mask
            s = s / s.sum(-1, keepdim=True)
        else:
            s = torch.softmax(logits.masked_fill(~moe.expert_mask, float("-inf")), -1)
        _, e, _ = _route_of(moe, x[b])
        loss = 0.0
        for i in range(E):
            if not active[i]:
                continue  # a masked expert has no routed rows
            f = n_act / (K * L) * int((e == i).sum())
            loss = loss + f * s[:, i].mean()
        total = total + loss
    return total / B


def _route_of(moe, x_TD):
    import flexkern
    return flexkern.route(x_TD, moe.router.weight, moe.top_k, None, moe.expert_mask, moe.mask_mode,
                          moe.renormalize, **moe._gating())


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_sequence_balance_loss_matches_the_formula(scoring):
    moe = make(scoring=scoring, renormalize=scoring == "sigmoid")
    moe.expert_mask[3] = False
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    moe(x)
    torch.testing.assert_close(moe.sequence_balance_loss, sequence_balance_reference(moe, x),
                               rtol=1e-12, atol=1e-12)
    assert moe.sequence_balance_loss.requires_grad


def test_balance_loss_with_a_mask_equals_deleting_the_experts():
    moe = make()
    moe.expert_mask[[2, 5]] = False
    keep = [0, 1, 3, 4, 6, 7]
    small = make(E=6)
    with torch.no_grad():
        small.router.weight.copy_(moe.router.weight[keep])
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(small.experts, n).copy_(getattr(moe.experts, n)[keep])
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    torch.testing.assert_close(moe(x), small(x), rtol=1e-12, atol=1e-12)
    for name in ("load_balancing_loss", "sequence_balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(moe, name), getattr(small, name), rtol=1e-12, atol=1e-12)


def test_losses_are_none_without_gradient_and_counts_are_always_there():
    moe = make()
    assert moe.tokens_per_expert is None and moe.load_balancing_loss is None
    moe.expert_mask[1] = False
    x = torch.randn(6, 12, dtype=torch.float64)
    with torch.no_grad():
        moe(x)
    assert moe.load_balancing_loss is None and moe.sequence_balance_loss is None and moe.z_loss is None
    _, e, _ = _route_of(moe, x)
    counts = torch.bincount(e.flatten().long(), minlength=8)
    counts[1] = 0  # a masked expert's slots are dropped (and have weight 0 under reroute)
    assert moe.tokens_per_expert.dtype == torch.int64
    assert torch.equal(moe.tokens_per_expert, counts)
    moe(torch.randn(0, 12, dtype=torch.float64, requires_grad=True))  # empty batch: zeros, no NaN
    assert float(moe.load_balancing_loss) == 0.0 and float(moe.sequence_balance_loss) == 0.0


def test_score_bias_update_balances_and_only_counts_training_forwards():
    moe = make(scoring="sigmoid", score_bias=True, E=8, K=2)
    with torch.no_grad():
        moe.score_bias.zero_()
        moe.router.weight[0] += 3.0 * moe.router.weight[0].sign()  # expert 0 overloaded for x ~ w0
    moe.expert_mask[7] = False
    x = torch.randn(64, 12, dtype=torch.float64)
    moe.eval()
    moe(x)
    assert int(moe.expert_load.sum()) == 0  # evaluation forwards do not count
    moe.train()
    moe(x)
    moe(x)
    load = moe.expert_load.clone()
    assert torch.equal(load, 2 * moe.tokens_per_expert)
    moe.update_score_bias(rate=0.01)
    bias = moe.score_bias
    mean = load[:7].double().mean()
    step = 0.01 * torch.sign(mean - load[:7].double())
    torch.testing.assert_close(bias[:7].double(), step - step.mean(), rtol=1e-6, atol=1e-7)
    assert float(bias[7]) == 0.0  # masked: unchanged
    assert int(moe.expert_load.sum()) == 0  # the count restarts
    # balancing works: repeated steps even out the load
    spread = []
    for _ in range(200):
        moe(x)
        spread.append(float(moe.tokens_per_expert[:7].double().std()))
        moe.update_score_bias(rate=0.01)
    assert spread[-1] < 0.5 * spread[0]
    with pytest.raises(ValueError, match="rate"):
        moe.update_score_bias(rate=-1.0)
    with pytest.raises(RuntimeError, match="score_bias=True"):
        make().update_score_bias()


def test_shared_expert_adds_the_gated_swiglu():
    for gate in (False, True):
        moe = make(shared_d_ff=20, shared_gate=gate)
        plain = make(shared_d_ff=0)
        with torch.no_grad():
            plain.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
        x = torch.randn(3, 5, 12, dtype=torch.float64)
        se = moe.shared_expert
        h = F.silu(x @ se.gate_proj.T) * (x @ se.up_proj.T) @ se.down_proj.T
        if gate:
            h = torch.sigmoid(x @ se.output_gate.T) * h
        torch.testing.assert_close(moe(x), plain(x) + h, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    moe = make(shared_d_ff=6, shared_gate=True, scoring="sigmoid", n_group=4, topk_group=2,
               score_bias=True, renormalize=True, routed_scaling=2.0)
    params = [moe.router.weight, *moe.experts.parameters(), *moe.shared_expert.parameters()]
    assert torch.autograd.gradcheck(lambda x, *p: moe(x), (x, *params))
    with pytest.raises(ValueError, match="shared_gate"):
        FlexMoE(8, 8, 4, 2, shared_gate=True)
    with pytest.raises(ValueError, match="shared_d_ff"):
        FlexMoE(8, 8, 4, 2, shared_d_ff=-1)


def test_layer_settings_are_checked():
    for kw, match in [(dict(scoring="tanh"), "scoring"), (dict(n_group=3), "n_group"),
                      (dict(n_group=4, topk_group=1, top_k=3), "top_k"),
                      (dict(routed_scaling=-1.0), "routed_scaling")]:
        top_k = kw.pop("top_k", 2)
        with pytest.raises(ValueError, match=match):
            FlexMoE(8, 8, 8, top_k, **kw)


def test_resizing_keeps_the_score_bias_and_refuses_groups():
    moe = make(score_bias=True)
    bias = moe.score_bias.clone()
    moe.add_expert()
    assert moe.score_bias.shape == (9,) and torch.equal(moe.score_bias[:8], bias) and moe.score_bias[8] == 0
    assert moe.expert_load.shape == (9,)
    moe.remove_expert(3)
    assert torch.equal(moe.score_bias, torch.cat([bias[:3], bias[4:], bias.new_zeros(1)]))
    moe(torch.randn(5, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="group"):
        make(n_group=4, topk_group=2).add_expert()


def test_compile_fullgraph_with_the_router_family():
    moe = make(dtype=torch.float32, scoring="sigmoid", n_group=4, topk_group=2, score_bias=True,
               renormalize=True, routed_scaling=2.5, shared_d_ff=8, shared_gate=True)
    moe.train()
    x = torch.randn(2, 6, 12)

    def step(x):
        y = moe(x)
        return y, moe.z_loss + moe.load_balancing_loss + moe.sequence_balance_loss

    x.requires_grad_()
    y_e, z_e = step(x)
    load_eager = moe.expert_load.clone()
    compiled = torch.compile(step, fullgraph=True)
    y_c, z_c = compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_c, z_e, rtol=1e-5, atol=1e-6)
    (g_c,) = torch.autograd.grad(z_c + y_c.square().sum(), x)
    (g_e,) = torch.autograd.grad(step(x)[1] + moe(x).square().sum(), x)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    assert torch.equal(moe.expert_load, 4 * load_eager)  # the count also runs compiled
    moe.expert_mask[2] = False  # honoured without recompiling
    torch.testing.assert_close(compiled(x)[0], moe(x), rtol=1e-5, atol=1e-6)


# ---- expert parallelism with the router family (gloo, world size 2) --------------------------------
def _family_layer():
    return make(E=8, K=3, dtype=torch.float32, scoring="sigmoid", n_group=4, topk_group=2,
                score_bias=True, renormalize=True, routed_scaling=2.0, shared_d_ff=8, shared_gate=True)


def ep_router_family_scenario(rank, world):
    full = _family_layer()
    full.expert_mask[5] = False
    ep = shard(full)
    assert isinstance(ep, ExpertParallelMoE) and ep.settings() == full.settings()
    torch.manual_seed(100 + rank)
    x = torch.randn(7 + rank, 12, requires_grad=True)
    y = ep(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = full(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for name in ("shared_expert.gate_proj", "shared_expert.output_gate"):  # replicated: this rank's tokens
        torch.testing.assert_close(ep.get_parameter(name).grad, full.get_parameter(name).grad,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.load_balancing_loss, full.load_balancing_loss, rtol=1e-5, atol=1e-6)
    # the score bias update sums every rank's load: the same bias on both ranks
    ep.train()
    ep.expert_load.zero_()
    ep(x.detach())
    local = ep.expert_load.clone()
    ep.update_score_bias(rate=0.1, group=dist.group.WORLD)
    total = local.clone()
    dist.all_reduce(total)
    from flexkern.nn.balance import score_bias_step
    want = full.score_bias + score_bias_step(total, full.expert_mask, 0.1)
    torch.testing.assert_close(ep.score_bias, want)
    gathered = [torch.empty_like(ep.score_bias) for _ in range(world)]
    dist.all_gather(gathered, ep.score_bias)
    assert torch.equal(gathered[0], gathered[1])
    from flexkern.distributed import to_flexmoe
    back = to_flexmoe(ep)
    assert back.settings() == full.settings()
    for k, v in full.state_dict().items():
        if k != "score_bias":
            assert torch.equal(back.state_dict()[k], v), k


def test_expert_parallel_router_family():
    spawn("ep_router_family_scenario", 2, module=__name__)
