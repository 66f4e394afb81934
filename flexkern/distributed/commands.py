"""``--expert-parallel N`` of ``flexkern evaluate`` and ``flexkern tune-router``: the checks and
the runs behind the flag (the command line only forwards its parsed arguments here).

    torchrun --standalone --nproc_per_node=N -m flexkern evaluate --model runs/merged --expert-parallel N
    torchrun --standalone --nproc_per_node=N -m flexkern tune-router --model runs/merged \\
        --owner code=code --out runs/merged-rt --expert-parallel N
"""
from __future__ import annotations

import os


def check(n: int, num_experts: int, model) -> None:
    """Before any work: the torchrun world must have N ranks and the experts must split evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != n:
        how = "no torchrun environment" if "WORLD_SIZE" not in os.environ else f"WORLD_SIZE={world}"
        raise ValueError(f"--expert-parallel {n} needs {n} processes ({how}): run it as "
                         f"torchrun --standalone --nproc_per_node={n} -m flexkern ...")
    if num_experts < 2:
        raise ValueError(f"--expert-parallel: {model} is a dense model; it has no experts to spread")
    if num_experts % n:
        raise ValueError(f"--expert-parallel {n}: {model} has {num_experts} experts, not divisible by {n}")


def evaluate(a) -> int:
    """``flexkern evaluate --expert-parallel N``: the same table as without the flag, from rank 0."""
    from .flexolmo import evaluate_model_dir, print_table

    res = evaluate_model_dir(a.model, expert_parallel_size=a.expert_parallel, data=a.data, opt_out=a.opt_out,
                             top_k=a.top_k, max_bytes=a.max_bytes, eval_tokens=a.eval_tokens,
                             seq_len=a.seq_len, device=a.device)
    print_table(res)
    return 0


def tune_router(a, owners: dict[str, str]) -> int:
    """``flexkern tune-router --expert-parallel N``: rank 0 writes ``--out``."""
    from .flexolmo import tune_router_dir

    rank = int(os.environ.get("RANK", "0"))
    out, losses = tune_router_dir(a.model, a.out, expert_parallel_size=a.expert_parallel, owners=owners,
                                  public=a.public, proxy_docs=a.proxy_docs, public_docs=a.public_docs,
                                  steps=a.steps, lr=a.lr, batch_size=a.batch_size, max_bytes=a.max_bytes,
                                  device=a.device, overwrite=a.overwrite)
    if rank == 0:
        print(f"router tuning ({a.expert_parallel} ranks, expert-parallel): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"wrote {out}")
    return 0
