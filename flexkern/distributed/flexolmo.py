"""FlexOlmo models with expert-parallel MoE layers, under ``torchrun``.

    torchrun --standalone --nproc_per_node=N -m flexkern evaluate --model runs/merged --expert-parallel N

Every rank loads the same model directory, keeps the attention, embeddings and router whole and
only its slice of each layer's experts (``expert_parallel``); the held-out windows are split over
the ranks (``stream_loss``), so N ranks hold 1/N of the experts each and score 1/N of the windows.
Losses equal the single-process ones up to float summation order.
"""
from __future__ import annotations

import math
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


def evaluate_model_dir(model_dir, *, expert_parallel_size: int, data=None, opt_out=(), top_k: int | None = None,
                       max_bytes: int | None = None, eval_tokens: int | None = None,
                       seq_len: int | None = None, device: str = "cpu") -> dict:
    """``flexolmo.commands.evaluate_model_dir`` with the MoE layers expert-parallel over the
    torchrun world (which must have ``expert_parallel_size`` ranks); same result dict, on every
    rank. Sets up the process group (gloo on the CPU, nccl on CUDA) when torchrun has not."""
    from ..flexolmo import distributed as fdist
    from ..flexolmo.checkpoint import TOKENIZER_FILE
    from ..flexolmo.data import DOMAINS
    from ..flexolmo.defaults import DEMO
    from ..flexolmo.evaluate import heldout_streams
    from ..flexolmo.merge import load_model, mask_experts
    from ..flexolmo.tokenizer import load_tokenizer

    info = fdist.setup(device)
    try:
        if info.world_size != expert_parallel_size:
            raise ValueError(f"--expert-parallel {expert_parallel_size} needs {expert_parallel_size} ranks, "
                             f"this run has {info.world_size}: start it with torchrun --nproc_per_node="
                             f"{expert_parallel_size}")
        model, names = load_model(model_dir, info.device)
        if not model.moe_layers():
            raise ValueError(f"{model_dir} is a dense model; it has no experts to spread over ranks")
        if len(names) % expert_parallel_size:
            raise ValueError(f"{model_dir} has {len(names)} experts, not divisible by "
                             f"--expert-parallel {expert_parallel_size}")
        expert_parallel(model)
        if top_k is not None:
            model.set_top_k(top_k)
        tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
        streams = heldout_streams(tok, list(data or DOMAINS), DEMO.max_bytes if max_bytes is None else max_bytes)
        seq_len = seq_len or model.config.seq_len
        eval_tokens = DEMO.eval_tokens if eval_tokens is None else eval_tokens

        def losses():
            return {name: stream_loss(model, s, seq_len, eval_tokens) for name, s in streams.items()}

        rows = {"model": losses()}
        k = model.config.top_k
        for name in opt_out:
            model.set_top_k(min(k, len(names) - 1))
            mask_experts(model, [name], names)
            rows[f"without {name}"] = losses()
            model.set_expert_mask([True] * len(names))
            model.set_top_k(k)
        return {"names": names, "domains": list(streams), "rows": rows, "rank": info.rank,
                "world_size": info.world_size}
    finally:
        fdist.teardown(info)


def tune_router_dir(model_dir, out_dir, *, expert_parallel_size: int, owners: dict[str, str], public=None,
                    device: str = "cpu", overwrite: bool = False, **kwargs):
    """``flexolmo.commands.tune_router_dir`` with the MoE layers expert-parallel over the torchrun
    world: rank 0 picks the proxy sets and broadcasts the token streams, every rank tunes the
    same replicated router on the same batches (the experts' work is split, the rest repeated),
    the routers are checked identical across ranks, the experts are gathered back and rank 0
    writes ``out_dir``. ``kwargs``: proxy_docs, public_docs, steps, lr, batch_size, max_bytes.
    Returns (out_dir, loss per step) on every rank."""
    from ..flexolmo import commands
    from ..flexolmo import distributed as fdist
    from ..flexolmo.checkpoint import EXPERTS_FILE, TOKENIZER_FILE, read_json, read_public_embedding, write_model_dir
    from ..flexolmo.data import PUBLIC_DOMAINS, load_documents, split_documents
    from ..flexolmo.merge import load_model
    from ..flexolmo.router_tuning import proxy_streams, tune_router
    from ..flexolmo.tokenizer import load_tokenizer

    opts = {k: v for k, v in commands.tune_router_dir.__kwdefaults__.items()
            if k not in ("owners", "public", "device", "overwrite")}
    unknown = set(kwargs) - set(opts)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}")
    opts.update(kwargs)
    info = fdist.setup(device)
    try:
        if info.world_size != expert_parallel_size:
            raise ValueError(f"--expert-parallel {expert_parallel_size} needs {expert_parallel_size} ranks, "
                             f"this run has {info.world_size}")
        model_dir = Path(model_dir)
        public_row, method = read_public_embedding(model_dir)
        if method == "anchor":
            raise ValueError(f"{model_dir}: its router rows come from the anchor's hidden states; proxy "
                             "selection needs the MiniLM embedder (a model built with --embed-method minilm)")
        model, names = load_model(model_dir, info.device)
        unknown = sorted(set(owners) - set(names[1:]))
        if unknown:
            raise ValueError(f"no owner expert named {unknown} in {model_dir}; owner experts: {names[1:]}")
        tok = load_tokenizer(model_dir / TOKENIZER_FILE)
        box = [None]
        if info.rank == 0:
            mb = opts["max_bytes"]
            public_docs = [d for s in (public or PUBLIC_DOMAINS) for d in split_documents(load_documents(s, mb))[0]]
            owner_docs = {n: split_documents(load_documents(src, mb))[0] for n, src in owners.items()}
            box[0] = proxy_streams(tok, public_docs, owner_docs, proxy_docs=opts["proxy_docs"],
                                   public_docs=opts["public_docs"])
        dist.broadcast_object_list(box, src=0)
        expert_parallel(model)
        losses = tune_router(model, box[0], steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"],
                             progress=info.rank == 0)
        _check_same_router(model)
        gather_experts(model)
        out = Path(out_dir)
        if info.rank == 0:
            out = write_model_dir(out_dir, model.cpu(), model_dir / TOKENIZER_FILE, public_row, method,
                                  read_json(model_dir / EXPERTS_FILE), overwrite=overwrite, inputs=(model_dir,))
        dist.barrier()
        return out, losses
    finally:
        fdist.teardown(info)


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


def print_table(res: dict) -> None:
    """The evaluate command's table, from rank 0 only."""
    if res.get("rank", 0) != 0:
        return
    from ..flexolmo.evaluate import average_loss

    rows, domains = res["rows"], res["domains"]
    print(f"held-out loss (nats/token), experts {res['names']}, expert-parallel over {res['world_size']} ranks")
    width = max(len(r) for r in rows) + 2
    print(f"{'':{width}s}" + "".join(f"{d[:12]:>13s}" for d in domains) + f"{'avg':>9s}")
    for label, losses in rows.items():
        print(f"{label:{width}s}" + "".join(f"{losses[d]:13.3f}" for d in domains)
              + f"{average_loss(losses, domains):9.3f}")
    print("perplexity: " + ", ".join(f"{d} {math.exp(v):.1f}" for d, v in rows["model"].items()))
