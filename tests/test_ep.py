"""ExpertParallelMoE on gloo (spawned CPU processes, world sizes 2 and 4) against the
single-process FlexMoE on the same weights: outputs and every gradient, masks in both modes,
frozen experts, skewed routing, ranks without tokens, fixed capacity (equal to exact when nothing
overflows, counted overflow when something does), shard/unshard round trip, and the bad-input
and fault cases (each rank checks that the expected error came, so a failure cannot hang)."""
import datetime
import importlib
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexkern.nn import FlexMoE

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, module, scenario, errors):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        getattr(importlib.import_module(module), scenario)(rank, world)
        errors.put((rank, None))  # finished
    except BaseException:  # reported to the parent with the rank
        errors.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:  # no rank tears its connections down while a peer still finishes the last collective
                dist.barrier()
            except RuntimeError:
                pass
            dist.destroy_process_group()
    # Skip the interpreter's finalisation, where gloo's worker threads occasionally abort the
    # process after the group is gone (pytorch/pytorch#190489); the report is already queued.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(scenario: str, world: int, module: str = __name__) -> None:
    """Run ``module.scenario(rank, world)`` on ``world`` spawned gloo ranks; fail with every
    rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    crash = None
    try:
        mp.start_processes(_worker, (world, free_port(), module, scenario, errors), nprocs=world,
                           start_method="spawn")
    except mp.ProcessExitedException as exc:  # a rank died (e.g. a peer left mid-collective)
        crash = exc
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    failures = sorted((r, tb) for r, tb in reports if tb is not None)
    finished = sorted(r for r, tb in reports if tb is None)
    if failures or crash:
        pytest.fail("\n".join(f"rank {r}:\n{tb}" for r, tb in failures)
                    + f"\nranks that finished their scenario: {finished}\n{crash or ''}")


# ---- scenarios (run on every rank) ------------------------------------------------------------------
def reference_layer(E, D, F, K, seed=0, **kw):
    torch.manual_seed(seed)  # same weights on every rank
    ref = FlexMoE(D, F, E, K, **kw)
    with torch.no_grad():
        ref.router.bias.normal_()  # negative and positive: min(b, 0) matters
    return ref


def compare_one(rank, world, ref, tokens, capacity=None, mask=None, frozen=None, skew=False, seed=1):
    """EP vs the single-process FlexMoE on all ranks' tokens: y, dx, d router, d every expert."""
    from flexkern.distributed import shard

    E, D = ref.num_experts, ref.d_model
    ref.zero_grad(set_to_none=True)
    if mask is not None:
        ref.expert_mask.copy_(mask)
    if frozen is not None:
        ref.expert_frozen.copy_(frozen)
    if skew:  # every token prefers the experts of rank 0
        with torch.no_grad():
            ref.router.weight[: E // world].fill_(1.0)
            ref.router.weight[E // world:].fill_(-1.0)
    ep = shard(ref, capacity=capacity)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(sum(tokens), D, generator=g) + (2.0 if skew else 0.0)
    dy_all = torch.randn(sum(tokens), D, generator=g)
    lo = sum(tokens[:rank])
    sl = slice(lo, lo + tokens[rank])

    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * dy_all).sum().backward()

    x = x_all[sl].clone().requires_grad_()
    y = ep(x)
    (y * dy_all[sl]).sum().backward()
    torch.testing.assert_close(y, y_ref[sl], **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad[sl], **TOL)
    if tokens[rank]:  # z-loss: the mean over this rank's tokens
        ref(x_all[sl])  # (the z-loss is kept only when a gradient is wanted)
        torch.testing.assert_close(ep.z_loss.detach(), ref.z_loss, **TOL)
    for name in ("weight", "bias"):
        g_ep = getattr(ep.router, name).grad
        g_ep = torch.zeros_like(getattr(ep.router, name)) if g_ep is None else g_ep.clone()
        dist.all_reduce(g_ep)  # replicated router: each rank holds its own tokens' part
        g_ref = getattr(ref.router, name).grad
        torch.testing.assert_close(g_ep, torch.zeros_like(g_ep) if g_ref is None else g_ref, **TOL)
    lo_e, hi_e = ep.local_start, ep.local_end
    for name in ("gate_proj", "up_proj", "down_proj"):
        g_ep = getattr(ep.experts, name).grad
        g_ref = getattr(ref.experts, name).grad
        g_ref = torch.zeros_like(getattr(ref.experts, name)) if g_ref is None else g_ref
        g_ep = torch.zeros_like(g_ref[lo_e:hi_e]) if g_ep is None else g_ep
        torch.testing.assert_close(g_ep, g_ref[lo_e:hi_e], **TOL, msg=lambda m: f"d {name}: {m}")
        if frozen is not None:
            assert torch.count_nonzero(g_ep[frozen[lo_e:hi_e]]) == 0
    if frozen is not None and ep.router.weight.grad is not None:
        assert torch.count_nonzero(ep.router.weight.grad[frozen]) == 0
    return ep, y


def scenario_equivalence(rank, world):
    E, D, F, K = 2 * world, 8, 12, 2
    ref = reference_layer(E, D, F, K)
    odd = [3 + 2 * r for r in range(world)]  # different token counts per rank
    full = world == 2  # at 4 ranks (on 2 cores) a subset: both modes, a mask, skew, empty ranks
    for capacity in (None, 64):  # 64 >= every rank pair's rows: nothing overflows
        compare_one(rank, world, ref, odd, capacity)
        mask = torch.ones(E, dtype=torch.bool)
        mask[1] = mask[E - 1] = False
        compare_one(rank, world, ref, odd, capacity, mask=mask)
        ref.mask_mode = "drop"
        drop = torch.ones(E, dtype=torch.bool)
        drop[E - 2:] = False  # the last rank's experts are all masked: it receives no rows
        compare_one(rank, world, ref, odd, capacity, mask=drop)
        ref.mask_mode = "reroute"
        ref.expert_mask.fill_(True)
        if full or capacity is None:
            frozen = torch.zeros(E, dtype=torch.bool)
            frozen[0] = frozen[E - 1] = True
            compare_one(rank, world, ref, odd, capacity, frozen=frozen)
            ref.expert_frozen.zero_()
        with torch.no_grad():
            saved = ref.router.weight.clone()
        compare_one(rank, world, ref, odd, capacity, skew=True)  # every row goes to rank 0
        with torch.no_grad():
            ref.router.weight.copy_(saved)
        zero_here = [0 if r == world - 1 else 4 for r in range(world)]
        compare_one(rank, world, ref, zero_here, capacity)  # the last rank has no tokens
        if full or capacity is None:
            compare_one(rank, world, ref, [0] * world, capacity)  # no tokens anywhere


def scenario_capacity(rank, world):
    from flexkern.distributed import shard

    E, D, F, K = 2 * world, 8, 12, 2
    ref = reference_layer(E, D, F, K)
    # Fixed capacity equals exact bit for bit when nothing overflows.
    torch.manual_seed(10 + rank)
    x = torch.randn(6, D)
    y_exact = shard(ref)(x)
    ep = shard(ref, capacity=12)
    assert torch.equal(ep(x), y_exact) and int(ep.overflow) == 0
    # Skewed: every row goes to rank 0; capacity 2 per rank pair drops the rest, and counts them.
    with torch.no_grad():
        ref.router.weight[:2].fill_(1.0)
        ref.router.weight[2:].fill_(-1.0)
    ep = shard(ref, capacity=2)
    x = torch.randn(5, D) + 2.0
    y = ep(x)
    assert int(ep.overflow) == 5 * K - 2, int(ep.overflow)  # 10 rows for rank 0, 2 fit
    ep(x)
    assert int(ep.overflow_total) == 2 * (5 * K - 2)
    # The rows that fit are the first two of expert order (tokens 0 and 1 on expert 0): those
    # tokens match the exact layer where their other slot also fit, the rest lose their slots.
    y_exact = shard(ref)(x)
    assert torch.isfinite(y).all() and not torch.allclose(y, y_exact)
    ep.reset_overflow()
    assert int(ep.overflow_total) == 0


def scenario_shard_roundtrip(rank, world):
    from flexkern.distributed import ExpertParallelMoE, shard, to_flexmoe, unshard

    E = 3 * world
    ref = reference_layer(E, 8, 12, 2)
    state = ref.state_dict()
    for split in (None, [1] * (world - 1) + [E - (world - 1)]):
        ep = shard(state, top_k=2, experts_per_rank=split)
        full = unshard(ep)
        assert full.keys() == state.keys()
        assert all(torch.equal(full[k], state[k]) for k in state)
        back = to_flexmoe(ep)
        assert all(torch.equal(back.state_dict()[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="not divisible by the world size"):
        ExpertParallelMoE(8, 12, E + 1, 2)
    with pytest.raises(ValueError, match="experts_per_rank must be"):
        ExpertParallelMoE(8, 12, E, 2, experts_per_rank=[E] + [0] * (world - 1))
    # uneven split computes the same thing
    torch.manual_seed(3 + rank)
    x = torch.randn(5, 8)
    ep = shard(ref, experts_per_rank=[1] * (world - 1) + [E - (world - 1)])
    torch.testing.assert_close(ep(x), ref(x), **TOL)


def _expect(err, match, fn):
    with pytest.raises(err, match=match):
        fn()


def scenario_disagreement(rank, world):
    from flexkern.distributed import ExpertParallelMoE

    x = torch.randn(4, 8)
    D = 8
    cases = [("d_model", dict(d_model=8 if rank else 16)), ("num_experts", dict(num_experts=2 * world if rank else 4 * world)),
             ("d_ff", dict(d_ff=12 + rank)), ("top_k", dict(top_k=1 + (rank == 0)))]
    for field, change in cases:
        kw = dict(d_model=D, d_ff=12, num_experts=2 * world, top_k=2)
        kw.update(change)
        m = ExpertParallelMoE(kw["d_model"], kw["d_ff"], kw["num_experts"], kw["top_k"])
        _expect(ValueError, f"disagree on {field}", lambda: m(torch.randn(4, kw["d_model"])))
    for capacity in (None, 8):
        m = ExpertParallelMoE(D, 12, 2 * world, 2, capacity=capacity)
        m(x)  # agreed
        m.expert_mask[1] = rank != 0  # rank 0 opts expert 1 out, the others do not
        if capacity is None:  # exact mode checks at every forward
            _expect(ValueError, "disagree on expert_mask", lambda: m(x))
        else:  # capacity mode checks at the first forward and on verify()
            _expect(ValueError, "disagree on expert_mask", m.verify)


def scenario_peer_failure(rank, world):
    import time

    from flexkern.distributed import ExpertParallelMoE

    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    m = ExpertParallelMoE(8, 12, 2 * world, 2, group=group)
    m(torch.randn(3, 8))
    if rank == 1:  # this rank stops answering; the others' next exchange times out
        time.sleep(6)
        return
    _expect(RuntimeError, r"rank 0 \(group of 2\): .*failed", lambda: m(torch.randn(3, 8)))


# ---- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process_flexmoe(world):
    spawn("scenario_equivalence", world)


def scenario_modes_and_faults(rank, world):
    scenario_capacity(rank, world)
    scenario_shard_roundtrip(rank, world)
    scenario_disagreement(rank, world)
    scenario_peer_failure(rank, world)  # last: one rank stops answering


def test_ep_capacity_shard_disagreement_and_faults():
    """Fixed capacity (== exact, counted overflow), shard/unshard and uneven splits, ranks that
    disagree (a clear error on every rank), a collective that fails (an error naming the rank);
    one set of spawned ranks for all of them (each spawn costs seconds of imports)."""
    spawn("scenario_modes_and_faults", 2)
