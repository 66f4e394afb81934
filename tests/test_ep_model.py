"""A FlexOlmo model with expert-parallel MoE layers (gloo, 2 spawned ranks) against the
single-process model: loss, every gradient, masks, the sharded held-out loss, and gathering the
experts back; FSDP2 (fully_shard) over a model holding FlexMoE layers."""
import copy

import pytest
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
    # DDP over the replicated parameters only (the experts ignored) gives the same gradients
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexkern.distributed import expert_parameter_names
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for m in ref.moe_layers():
        m.z_loss = None  # a non-leaf tensor from the last forward: deepcopy refuses it
    ddp_model = expert_parallel(copy.deepcopy(ref))
    DDP._set_params_and_buffers_to_ignore_for_model(ddp_model, expert_parameter_names(ddp_model))
    ddp = DDP(ddp_model)
    (lm_loss(ddp, ids[2 * rank: 2 * rank + 2]) + ddp_model.router_z_loss() * 1e-3).backward()
    for name, p in ddp_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], **TOL, msg=lambda s: f"DDP {name}: {s}")
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
    # router tuning on the expert-parallel model (the same batches on every rank) == one process
    from flexkern.flexolmo.router_tuning import tune_router
    streams = {"a": stream, "b": stream.flip(0)}
    tuned_ref = copy.deepcopy(ref)
    tuned_ep = expert_parallel(copy.deepcopy(ref))
    tune_router(tuned_ref, streams, steps=2, batch_size=2, lr=1e-2, progress=False)
    tune_router(tuned_ep, streams, steps=2, batch_size=2, lr=1e-2, progress=False)
    for a, b in zip(tuned_ep.moe_layers(), tuned_ref.moe_layers()):
        assert not torch.equal(b.router.weight, ref.moe_layers()[0].router.weight)
        torch.testing.assert_close(a.router.weight, b.router.weight, **TOL)
        torch.testing.assert_close(a.router.bias, b.router.bias, **TOL)
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


def scenario_model_dirs(rank, world):
    import json
    import os

    from flexkern.distributed.flexolmo import evaluate_model_dir, tune_router_dir
    from flexkern.flexolmo.merge import load_model

    env = json.loads(os.environ["EP_TEST"])
    res = evaluate_model_dir(env["merged"], expert_parallel_size=world, **env["eval_kwargs"])
    assert res["world_size"] == world and res["rank"] == rank
    assert res["rows"].keys() == env["rows"].keys()
    for label, losses in env["rows"].items():
        assert res["rows"][label] == pytest.approx(losses, abs=1e-4), label
    with pytest.raises(ValueError, match="needs 4 ranks"):
        evaluate_model_dir(env["merged"], expert_parallel_size=4, **env["eval_kwargs"])
    # router tuning expert-parallel == in one process; only rank 0 writes
    out = env["tuned"] + "-ep"
    got_out, losses = tune_router_dir(env["merged"], out, expert_parallel_size=world, **env["tune_kwargs"])
    assert losses == pytest.approx(env["losses"], abs=1e-4)
    dist.barrier()
    if rank == 0:
        want_model, _ = load_model(env["tuned"])
        got_model, _ = load_model(got_out)
        ref = dict(want_model.named_parameters())
        for name, p in got_model.named_parameters():
            torch.testing.assert_close(p, ref[name], **TOL, msg=lambda s: f"{name}: {s}")


def test_evaluate_and_tune_a_merged_model_dir_expert_parallel(tmp_path, monkeypatch):
    """A micro anchor + one owner merged (2 experts): the pipeline's evaluation and router tuning
    over 2 expert-parallel ranks == in one process."""
    import json
    import random

    from flexkern.flexolmo import commands
    from flexkern.flexolmo.merge import merge
    from flexkern.flexolmo.train import train_anchor, train_expert

    def folder(path, words, n, seed):
        rng = random.Random(seed)
        path.mkdir()
        for i in range(n):
            text = " ".join(rng.choice(words.split()) for _ in range(rng.randint(30, 60)))
            (path / f"{i:03d}.txt").write_text(text + ".")
        return path

    public = folder(tmp_path / "public", "the a of and to in is was he she it river city king war", 60, 0)
    law = folder(tmp_path / "law", "court shall party agreement law section herein pursuant license", 30, 2)
    anchor = train_anchor(tmp_path / "anchor", preset="micro", data=[str(public)], steps=4, batch_size=4,
                          embed_method="anchor", log=False)
    package = train_expert(anchor, str(law), tmp_path / "packages", name="law", steps=2, batch_size=4, log=False)
    merged = merge(anchor, [package], tmp_path / "merged")
    eval_kwargs = dict(data=[str(law)], opt_out=["law"], eval_tokens=256, max_bytes=20000)
    res = commands.evaluate_model_dir(merged, **eval_kwargs)
    tune_kwargs = dict(owners={"law": str(law)}, public=[str(public)], steps=2, batch_size=2, max_bytes=20000)
    tuned, losses = commands.tune_router_dir(merged, tmp_path / "tuned", **tune_kwargs)
    monkeypatch.setenv("EP_TEST", json.dumps({
        "merged": str(merged), "tuned": str(tuned), "eval_kwargs": eval_kwargs, "tune_kwargs": tune_kwargs,
        "rows": res["rows"], "losses": losses}))
    spawn("scenario_model_dirs", 2, __name__)
    # the command line: torchrun ... flexkern evaluate --expert-parallel 2 prints the same table once
    import os
    import subprocess
    import sys

    from test_ep import free_port
    args = ["-m", "flexkern", "evaluate", "--model", str(merged), "--data", str(law), "--opt-out", "law",
            "--eval-tokens", "256", "--max-bytes", "20000", "--expert-parallel", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "EP_TEST")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          f"--master_port={free_port()}", *args], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    single = subprocess.run([sys.executable, *args[:-2]], env=env, capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)
    table = [ln for ln in single.stdout.splitlines() if ln.startswith(("model", "without"))]
    assert table and [ln for ln in run.stdout.splitlines() if ln.startswith(("model", "without"))] == table
    alone = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=240,
                           cwd=tmp_path)
    assert alone.returncode == 2 and "torchrun --standalone --nproc_per_node=2" in alone.stderr
