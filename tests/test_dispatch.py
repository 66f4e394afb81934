"""dispatch: counting-sort invariants on the reference backend."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import flexkern
from flexkern.ops import dispatch_ref


def check_invariants(experts_TK, E, mask_E, d):
    T, K = experts_TK.shape
    N = T * K
    offsets = d.offsets_E1
    assert offsets.dtype == torch.int64 and offsets.shape == (E + 1,)
    assert offsets[0] == 0 and bool((offsets[1:] >= offsets[:-1]).all())
    keep = torch.ones(T, K, dtype=torch.bool) if mask_E is None else mask_E[experts_TK.long()]
    routed = int(keep.sum())
    assert int(offsets[-1]) == routed  # offsets end at the number of routed rows
    for e in range(E):
        expected = int(((experts_TK == e) & keep).sum())
        assert int(offsets[e + 1] - offsets[e]) == expected
    rows = d.row_of_slot_TK
    assert bool((rows[~keep] == -1).all())
    # inverse permutation: slot -> row -> slot is the identity on kept slots
    flat_rows = rows.reshape(-1)
    kept_slots = torch.nonzero(keep.reshape(-1)).flatten()
    assert torch.equal(d.slot_of_row_N[flat_rows[kept_slots].long()].long(), kept_slots)
    assert torch.equal(d.token_of_row_N[:routed].long(), d.slot_of_row_N[:routed].long() // K)
    assert bool((d.token_of_row_N[routed:] == -1).all()) and bool((d.slot_of_row_N[routed:] == -1).all())
    assert d.token_of_row_N.shape == (N,)
    for e in range(E):
        s, t = int(offsets[e]), int(offsets[e + 1])
        slots = d.slot_of_row_N[s:t].long()
        assert bool((experts_TK.reshape(-1)[slots] == e).all())
        assert bool((slots[1:] > slots[:-1]).all())  # stable: token (slot) order within an expert


def random_routing(T, E, K):
    if T == 0:
        return torch.empty(0, K, dtype=torch.int32)
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)


@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 4, 2), (1, 1, 1), (37, 8, 3), (16, 4, 4), (64, 16, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_dispatch_invariants(T, E, K, masked):
    experts = random_routing(T, E, K)
    mask = (torch.rand(E) > 0.4) if masked else None
    check_invariants(experts, E, mask, flexkern.dispatch(experts, E, mask))


def test_all_tokens_to_one_expert_and_empty_experts():
    T, E, K = 50, 6, 1
    experts = torch.full((T, K), 4, dtype=torch.int32)
    d = flexkern.dispatch(experts, E)
    check_invariants(experts, E, None, d)
    assert d.offsets_E1.tolist() == [0, 0, 0, 0, 0, 50, 50]
    assert d.token_of_row_N.tolist() == list(range(T))


def test_all_experts_masked_drops_everything():
    experts = random_routing(10, 4, 2)
    d = flexkern.dispatch(experts, 4, torch.zeros(4, dtype=torch.bool))
    assert int(d.offsets_E1[-1]) == 0 and bool((d.row_of_slot_TK == -1).all())


def test_dispatch_is_deterministic():
    experts = random_routing(200, 8, 2)
    a, b = flexkern.dispatch(experts, 8), flexkern.dispatch(experts, 8)
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 9), data=st.data())
def test_dispatch_property(T, E, data):
    K = data.draw(st.integers(1, E))
    experts = random_routing(T, E, K)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=E, max_size=E)))
    check_invariants(experts, E, mask, flexkern.dispatch(experts, E, mask))


def test_bad_dispatch_input():
    with pytest.raises(ValueError, match="expert ids must lie in"):
        flexkern.dispatch(torch.tensor([[0, 5]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expert ids must lie in"):
        flexkern.dispatch(torch.tensor([[-1, 2]], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="dtype"):
        flexkern.dispatch(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="dimensions"):
        flexkern.dispatch(torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expert_mask"):
        flexkern.dispatch(torch.zeros(3, 1, dtype=torch.int32), 4, torch.ones(3, dtype=torch.bool))


def test_reference_is_the_registered_default_on_cpu():
    experts = random_routing(9, 5, 2)
    got = flexkern.dispatch(experts, 5)
    want = dispatch_ref(experts, 5, None)
    for x, y in zip(got.tensors(), want):
        assert torch.equal(x, y)
