"""FlexOlmo models with expert-parallel MoE layers, under ``torchrun``.

    torchrun --standalone --nproc_per_node=N -m flexkern evaluate --model runs/merged --expert-parallel N
    torchrun --standalone --nproc_per_node=N -m flexkern tune-router --model runs/merged \\
        --owner code=code --out runs/merged-rt --expert-parallel N

``evaluate_model_dir`` and ``tune_router_dir`` run the pipeline's one implementation
(``flexolmo.commands``) on every rank, with the model loading swapped for one that keeps only this
rank's slice of each layer's experts (``expert_parallel``; attention, embeddings and routers stay
whole). Every rank runs the same windows and batches, so the results are those of one process
(up to float summation order) on every rank: the experts' memory is split N ways, their work per
rank is what one device does, the rest of the model runs on every rank. ``tune_router_dir``
checks that the ranks' routers stayed identical, gathers the experts back and lets rank 0 write.

``stream_loss`` is the faster form for a loop of one's own: the windows split over the ranks.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .ep import ExpertParallelMoE, expert_parallel, to_flexmoe


def gather_experts(model: nn.Module) -> nn.Module:
    """The inverse of ``expert_parallel``: every ExpertParallelMoE inside ``model`` becomes a
    full FlexMoE again (a collective: every rank must call it). Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ExpertParallelMoE):
                setattr(parent, name, to_flexmoe(child))
    return model


@torch.no_grad()
def stream_loss(model: nn.Module, stream: torch.Tensor, seq_len: int, max_tokens: int | None = None,
                batch_size: int = 8, group=None) -> float:
    """``flexolmo.evaluate.stream_loss`` with the windows split over the ranks of ``group``.

    Each step scores W*batch_size windows, batch_size per rank; a rank left without windows in the
    last step scores a dummy window with weight 0 (every rank must run every forward, the
    expert exchange is collective). Returns the same mean on every rank."""
    from ..flexolmo.evaluate import stream_windows

    W, r = dist.get_world_size(group), dist.get_rank(group)
    ids_NS = stream_windows(stream, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # summed loss, predicted tokens
    try:
        for s in range(0, ids_NS.shape[0], W * batch_size):
            mine = ids_NS[s + r * batch_size: s + (r + 1) * batch_size]
            ids_BS = (mine if mine.shape[0] else ids_NS[:1]).to(device)
            logits_BSV = model(ids_BS[:, :-1]).float()
            if mine.shape[0]:
                total[0] += float(F.cross_entropy(logits_BSV.flatten(0, 1), ids_BS[:, 1:].flatten(), reduction="sum"))
                total[1] += ids_BS[:, 1:].numel()
    finally:
        model.train(was_training)
    dist.all_reduce(total, group=group)
    return float(total[0] / total[1])


def check_world(n: int, num_experts: int, model) -> None:
    """Before any work (the command line's check): the torchrun world must have ``n`` ranks and
    the experts must split evenly over them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != n:
        how = "no torchrun environment" if "WORLD_SIZE" not in os.environ else f"WORLD_SIZE={world}"
        raise ValueError(f"--expert-parallel {n} needs {n} processes ({how}): run it as "
                         f"torchrun --standalone --nproc_per_node={n} -m flexkern ...")
    if num_experts < 2:
        raise ValueError(f"--expert-parallel: {model} is a dense model; it has no experts to spread")
    if num_experts % n:
        raise ValueError(f"--expert-parallel {n}: {model} has {num_experts} experts, not divisible by {n}")


@contextlib.contextmanager
def _patched(*targets):
    """Set (module, name, value) attributes for the duration of the block, then restore them."""
    saved = [(m, n, getattr(m, n)) for m, n, _ in targets]
    try:
        for m, n, v in targets:
            setattr(m, n, v)
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def _sharded_loading(world: int):
    """merge.load_model (as the pipeline calls it) returning expert-parallel models."""
    from ..flexolmo import commands, merge

    load = merge.load_model

    def load_sharded(model_dir, device="cpu"):
        model, names = load(model_dir, device)
        if model.moe_layers():
            if len(names) % world:
                raise ValueError(f"{model_dir} has {len(names)} experts, not divisible by "
                                 f"--expert-parallel {world}")
            expert_parallel(model)
        return model, names

    return [(merge, "load_model", load_sharded), (commands, "load_model", load_sharded)]


def _run(expert_parallel_size: int, device: str, fn, *args, **kwargs):
    """fn(*args, device=this rank's device, **kwargs) with expert-parallel loading, inside the
    torchrun process group (set up here when torchrun has not). Returns (result, DistInfo)."""
    from ..flexolmo import distributed as fdist

    info = fdist.setup(device)
    try:
        if info.world_size != expert_parallel_size:
            raise ValueError(f"--expert-parallel {expert_parallel_size} needs {expert_parallel_size} ranks, "
                             f"this run has {info.world_size}: start it with torchrun --nproc_per_node="
                             f"{expert_parallel_size}")
        with _patched(*_sharded_loading(info.world_size)):
            out = fn(*args, device=str(info.device), **kwargs)
        dist.barrier()
        return out, info
    finally:
        fdist.teardown(info)


def evaluate_model_dir(model_dir, *, expert_parallel_size: int, device: str = "cpu", **kwargs) -> dict:
    """``flexolmo.commands.evaluate_model_dir`` with the MoE layers expert-parallel over the
    torchrun world (``expert_parallel_size`` ranks): the same result dict on every rank, plus
    "rank" and "world_size"."""
    from ..flexolmo import commands

    res, info = _run(expert_parallel_size, device, commands.evaluate_model_dir, model_dir, **kwargs)
    return {**res, "rank": info.rank, "world_size": info.world_size}


def tune_router_dir(model_dir, out_dir, *, expert_parallel_size: int, device: str = "cpu", **kwargs):
    """``flexolmo.commands.tune_router_dir`` with the MoE layers expert-parallel: every rank tunes
    the replicated router on the same batches; before writing, the routers are checked identical
    across ranks and the experts gathered back, and only rank 0 writes ``out_dir``. Returns
    (out_dir, loss per step) on every rank."""
    from ..flexolmo import commands, eval_suite

    write, save = commands.write_model_dir, eval_suite.save_settings

    def write_gathered(out, model, *args, **kw):
        # The pipeline hands over model.cpu(); NCCL collectives need the GPU copy back.
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        if dev is not None:
            model.to(dev)
        _check_same_router(model)
        gather_experts(model)
        model.cpu()
        return write(out, model, *args, **kw) if dist.get_rank() == 0 else Path(out)

    def save_on_rank0(out, settings):
        return save(out, settings) if dist.get_rank() == 0 else Path(out)

    with _patched((commands, "write_model_dir", write_gathered), (eval_suite, "save_settings", save_on_rank0)):
        (out, losses), _ = _run(expert_parallel_size, device, commands.tune_router_dir, model_dir, out_dir, **kwargs)
    return out, losses


def _check_same_router(model: nn.Module, group=None) -> None:
    """Every rank's replicated router must be the same after tuning (a drift would be a bug)."""
    for i, m in enumerate(model.moe_layers()):
        w = m.router.weight.detach()
        top = w.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        differs = torch.tensor([float(not torch.equal(top, w))], device=w.device)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)  # so every rank raises, or none
        if differs.item():
            raise RuntimeError(f"MoE layer {i}: the ranks' routers differ after tuning")


