"""ExpertParallelMoE on CUDA (NCCL, a group of one): the fixed-capacity mode's forward and
backward make no host synchronisation (torch.cuda sync debug mode set to error), and it equals
the single-device FlexMoE."""
import datetime

import pytest
import torch
import torch.distributed as dist

from test_ep import free_port

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_group():
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_fixed_capacity_is_sync_free_and_matches_flexmoe(nccl_group):
    from flexkern.distributed import shard
    from flexkern.nn import FlexMoE

    torch.manual_seed(0)
    ref = FlexMoE(64, 128, 8, 2, device="cuda")
    ep = shard(ref, capacity=2 * 256)
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    ep(x).sum().backward()  # the first forward checks the signature (one host read)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ep(x)
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y_ref = ref(x.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert int(ep.overflow) == 0
