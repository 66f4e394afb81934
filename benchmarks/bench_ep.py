"""Expert-parallel MoE layer benchmark: one ExpertParallelMoE over the torchrun world, time split
into routing, exchange, experts and combine; the same tokens through a single-device FlexMoE
(fused experts op) and through the split ops on one device (the price of splitting).

    torchrun --standalone --nproc_per_node=8 benchmarks/bench_ep.py [--shape olmoe] [--tokens 4096]
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_ep.py          # CPU: gloo smoke run

On GPUs: NCCL, bf16, T tokens per rank; on the CPU: gloo, float32, the tiny shape (timings mean
nothing there). Shapes: the layer shapes of benchmarks/shapes.py (D, F, E, K), E divisible by the
world size. Modes: "exact" (variable all_to_all after a row-count all_gather: one host read per
forward) and "capacity" (fixed rows per rank pair, capacity = ceil(factor * T*K / W), sync-free).

Phases are timed with a device synchronisation at every boundary (so they add up to a little
more than the un-instrumented forward, reported beside them); each number is the median over
iterations of the slowest rank. Bytes: the exchange moves K rows of D elements per token out and
K back (forward), the same again in the backward, (W-1)/W of it off the rank.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path as _FsPath

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(_FsPath(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from benchmarks.shapes import CPU_SHAPES, GPU_SHAPES

PHASES = ("routing", "exchange", "experts", "combine")


def _init() -> tuple[int, int, torch.device]:
    if "WORLD_SIZE" not in os.environ:  # one process: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                              WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    def __init__(self, device):
        self.device, self.acc = device, {p: 0.0 for p in PHASES}

    @contextlib.contextmanager
    def __call__(self, name):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.acc[name] += time.perf_counter() - t0


def _median_ms(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _slowest(values: dict[str, float], device) -> dict[str, float]:
    """Max over ranks of each value (the slowest rank sets the layer's time)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def run(args) -> dict:
    from flexkern import ops
    from flexkern.distributed import shard
    from flexkern.nn import FlexMoE
    from flexkern.ops import experts_swiglu_grouped, permute, unpermute

    rank, W, dev = _init()
    shapes = {s.name: s for s in (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)}
    shape = shapes[args.shape or ("olmoe" if dev.type == "cuda" else "tiny")]
    T = args.tokens or (4096 if dev.type == "cuda" else shape.T)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    D, Fw, E, K = shape.D, shape.F, shape.E, shape.K
    if E % W:
        raise SystemExit(f"{shape.name}: E={E} is not divisible by the world size {W}")
    torch.manual_seed(0)  # the same full layer on every rank
    full = FlexMoE(D, Fw, E, K, device=dev, dtype=dtype)
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(T, D, device=dev, dtype=dtype)
    dy = torch.randn(T, D, device=dev, dtype=dtype)
    b = torch.finfo(dtype).bits // 8
    out = {"shape": shape.as_dict() | {"T_per_rank": T}, "world_size": W, "device": str(dev),
           "dtype": str(dtype).replace("torch.", ""), "backend": dist.get_backend(),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "bytes_per_token_fwd": 2 * K * D * b,
           "bytes_per_token_fwd_bwd": 4 * K * D * b, "modes": {}}

    def fwd_bwd(layer):
        xr = x.detach().requires_grad_()
        layer(xr).backward(dy)

    capacity = math.ceil(args.capacity_factor * T * K / W)
    for mode, cap in (("exact", None), ("capacity", capacity)):
        layer = shard(full, capacity=cap)
        timer = PhaseTimer(dev)
        with torch.no_grad():
            fwd_ms = _median_ms(lambda: layer(x), dev, args.iters, args.warmup)
            layer.phase_timer = timer
            per = []
            for _ in range(args.iters + args.warmup):
                timer.acc = {p: 0.0 for p in PHASES}
                layer(x)
                per.append(dict(timer.acc))
            layer.phase_timer = None
        phases = {p: statistics.median(d[p] for d in per[args.warmup:]) * 1e3 for p in PHASES}
        fb_ms = _median_ms(lambda: fwd_bwd(layer), dev, args.iters, args.warmup)
        row = _slowest({"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, **{f"{p}_ms": v for p, v in phases.items()}}, dev)
        off_rank = T * K * (W - 1) / W * D * b * 2  # forward: rows out + outputs back
        row["exchange_GBps_per_rank_fwd"] = off_rank / (row["exchange_ms"] * 1e-3) / 1e9 if row["exchange_ms"] else None
        if cap is not None:
            ov = layer.overflow.clone()
            dist.all_reduce(ov)
            row.update(capacity=cap, overflow_slots=int(ov))
        out["modes"][mode] = row

    # One device, all E experts, this rank's T tokens: the fused op, and the split ops.
    def split_path(x_TD=x):
        weights, experts_TK, _ = ops.route(x_TD, full.router.weight, K, full.effective_bias())
        d = ops.dispatch(experts_TK, E, validate=False)
        o = experts_swiglu_grouped(permute(x_TD, d), full.experts.gate_proj, full.experts.up_proj,
                                   full.experts.down_proj, d.offsets_E1)
        return unpermute(o, d, weights)

    with torch.no_grad():
        single = {"fused_fwd_ms": _median_ms(lambda: full(x), dev, args.iters, args.warmup),
                  "split_fwd_ms": _median_ms(lambda: split_path(), dev, args.iters, args.warmup)}
    single["fused_fwd_bwd_ms"] = _median_ms(lambda: fwd_bwd(full), dev, args.iters, args.warmup)

    def split_fwd_bwd():
        split_path(x.detach().requires_grad_()).backward(dy)

    single["split_fwd_bwd_ms"] = _median_ms(split_fwd_bwd, dev, args.iters, args.warmup)
    out["single_device"] = _slowest(single, dev)
    if rank == 0:
        print(report(out))
        if args.json:
            _FsPath(args.json).write_text(json.dumps(out, indent=2))
    dist.barrier()  # no rank closes its connections while a peer still finishes the last collective
    dist.destroy_process_group()
    return out


def report(out: dict) -> str:
    s, W = out["shape"], out["world_size"]
    lines = [f"bench_ep: {s['name']} D={s['D']} F={s['F']} E={s['E']} K={s['K']}, T={s['T_per_rank']} per rank, "
             f"{W} ranks ({out['backend']}, {out['dtype']}, {out['gpu'] or 'CPU'})",
             f"exchange bytes per token per layer: {out['bytes_per_token_fwd']} forward, "
             f"{out['bytes_per_token_fwd_bwd']} forward+backward ({W - 1}/{W} of it off the rank)",
             f"{'mode':10s}{'fwd ms':>9s}{'fwd+bwd':>9s}" + "".join(f"{p:>10s}" for p in PHASES) + f"{'GB/s':>10s}  notes"]
    for mode, r in out["modes"].items():
        gbps = r["exchange_GBps_per_rank_fwd"]
        note = f"capacity {r['capacity']}/rank pair, {r['overflow_slots']} slots overflowed" if "capacity" in r else \
            "one host read per forward"
        lines.append(f"{mode:10s}{r['fwd_ms']:9.3f}{r['fwd_bwd_ms']:9.3f}"
                     + "".join(f"{r[p + '_ms']:10.3f}" for p in PHASES)
                     + (f"{gbps:10.3g}" if gbps else f"{'-':>10s}") + f"  {note}")
    sd = out["single_device"]
    lines.append(f"one device, all {s['E']} experts, the same T: fused fwd {sd['fused_fwd_ms']:.3f} ms, "
                 f"split fwd {sd['split_fwd_ms']:.3f} ms; fused fwd+bwd {sd['fused_fwd_bwd_ms']:.3f} ms, "
                 f"split fwd+bwd {sd['split_fwd_bwd_ms']:.3f} ms")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", help="layer shape name from benchmarks/shapes.py (default: olmoe on GPUs, tiny on the CPU)")
    ap.add_argument("--tokens", type=int, help="tokens per rank (default 4096 on GPUs, the shape's T on the CPU)")
    ap.add_argument("--capacity-factor", type=float, default=1.25,
                    help="capacity mode: rows per rank pair = ceil(factor * T*K / W)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="rank 0 writes the results here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
    # gloo's worker threads can abort the interpreter's finalisation after the group is gone
    # (pytorch/pytorch#190489); everything is printed and written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
