"""A FlexOlmo model with expert-parallel MoE layers (gloo, 2 spawned ranks) against the
single-process model: loss, every gradient, masks, the sharded held-out loss, and gathering the
experts back; FSDP2 (fully_shard) over a model holding FlexMoE layers."""
import copy

import torch
import torch.distributed as dist

from test_ep import spawn

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _micro(world):
    from flexkern.flexolmo.model import PRESETS, FlexOlmoLM

    cfg = PRESETS["micro"].with_experts(2 * world, 2)
    torch.manual_seed(0)
    ref = FlexOlmoLM(cfg)
    with torch.no_grad():
        for m in ref.moe_layers():
            m.router.bias.normal_()
    return cfg, ref


def scenario_model(rank, world):
    from flexkern.distributed import ExpertParallelMoE, all_reduce_replicated_grads, expert_parallel
    from flexkern.distributed.flexolmo import gather_experts, stream_loss
    from flexkern.flexolmo.evaluate import stream_loss as stream_loss_one
    from flexkern.flexolmo.model import lm_loss

    cfg, ref = _micro(world)
    model = expert_parallel(copy.deepcopy(ref))
    layers = model.moe_layers()  # the model's own MoE controls see the expert-parallel layers
    assert len(layers) == cfg.n_layers and all(isinstance(m, ExpertParallelMoE) for m in layers)
    ids = torch.randint(0, cfg.vocab_size, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(model, ids[2 * rank: 2 * rank + 2])
    (loss + model.router_z_loss() * 1e-3).backward()
    ref_losses = []
    for r in range(world):
        ref_losses.append(lm_loss(ref, ids[2 * r: 2 * r + 2]) + ref.router_z_loss() * 1e-3)
    (sum(ref_losses) / world).backward()
    torch.testing.assert_close(loss, lm_loss(ref, ids[2 * rank: 2 * rank + 2]), **TOL)
    all_reduce_replicated_grads(model)  # mean over ranks, like DDP
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if ".experts." in name:  # complete on the owner: the sum over ranks' losses
            m = model.get_submodule(name.rsplit(".", 2)[0])
            g_ref = g_ref[m.local_start:m.local_end] * world
        torch.testing.assert_close(p.grad, g_ref, **TOL, msg=lambda s: f"{name}: {s}")
    # opt-out through the model's mask control, inference only
    mask = torch.ones(cfg.num_experts, dtype=torch.bool)
    mask[1] = False
    model.set_expert_mask(mask)
    ref.set_expert_mask(mask)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[rank:rank + 1]), ref(ids[rank:rank + 1]), **TOL)
    model.set_expert_mask(torch.ones_like(mask))
    ref.set_expert_mask(torch.ones_like(mask))
    # held-out loss with the windows split over the ranks (21 windows: the last step leaves rank 1 none)
    stream = torch.randint(0, cfg.vocab_size, (8 * 21 + 1,), generator=torch.Generator().manual_seed(2))
    sharded = stream_loss(model, stream, 8, batch_size=2)
    assert abs(sharded - stream_loss_one(ref, stream, 8, batch_size=2)) < 1e-5
    gather_experts(model)
    assert not any(isinstance(m, ExpertParallelMoE) for m in model.modules())
    state = ref.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def scenario_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    from flexkern.flexolmo.model import lm_loss

    cfg, ref = _micro(world)
    model = copy.deepcopy(ref)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    ids = torch.randint(0, cfg.vocab_size, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    lm_loss(model, ids[2 * rank: 2 * rank + 2]).backward()
    (sum(lm_loss(ref, ids[2 * r: 2 * r + 2]) for r in range(world)) / world).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # FSDP2 averages the gradients over the ranks
        torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, **TOL,
                                   msg=lambda s: f"{name}: {s}")
    assert dist.get_world_size() == world


def test_flexolmo_model_expert_parallel():
    spawn("scenario_model", 2, __name__)


def test_fsdp2_over_flexmoe_layers():
    spawn("scenario_fsdp2", 2, __name__)
