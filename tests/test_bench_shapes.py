"""The benchmark's shapes: skewed routing is forced exactly, the new shapes are what they say."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

import flexkern  # noqa: E402
from benchmarks import moe_paths, shapes  # noqa: E402
from benchmarks.shapes import MoEShape  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,hot_share", [(64, 8, 2, 0.5), (200, 16, 4, 0.1), (50, 6, 3, 1 / 3), (40, 8, 2, 0.0)])
def test_hot_expert_gets_exactly_its_share(dtype, T, E, K, hot_share):
    shape = MoEShape("t", T=T, D=24, F=16, E=E, K=K, hot_share=hot_share)
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run
    inp = moe_paths.make_inputs(shape, "cpu", dtype, seed=seed)
    rows_E = moe_paths.expert_rows(inp)
    assert int(rows_E.sum()) == T * K
    if hot_share:
        assert int(rows_E[0]) == shape.hot_tokens == round(hot_share * T * K)
    # flexkern's own router (the layer under test routes itself) picks the same experts
    _, experts_TK, _ = flexkern.route(inp.x_TD.detach(), inp.router_ED.detach(), K, backend="reference")
    assert torch.equal(torch.bincount(experts_TK.reshape(-1), minlength=E), rows_E)
    # the rest of the routing is spread, not degenerate (most other experts get rows)
    assert int((rows_E[1:] > 0).sum()) >= (E - 1) // 2
    assert all(t.requires_grad and t.is_leaf for t in inp.leaves)


def test_skewed_weights_stay_away_from_one():
    shape = shapes.select(shapes.CPU_SHAPES, "tiny-skew50")[0]
    inp = moe_paths.make_inputs(shape, "cpu", torch.float32)
    with torch.no_grad():
        weights_TK, experts_TK = moe_paths.torch_route(inp.x_TD, inp.router_ED, shape.K, None)
    assert bool((experts_TK[:, 0] == 0).all())  # expert 0 is every token's first choice
    assert float(weights_TK[:, 0].max()) < 0.9 and float(weights_TK[:, 1].min()) > 0.01


def test_hot_share_is_validated():
    with pytest.raises(ValueError, match="hot_share"):
        MoEShape("t", T=8, D=8, F=8, E=8, K=8, hot_share=0.5)  # at most 1/K
    with pytest.raises(ValueError, match="masked_frac"):
        MoEShape("t", T=8, D=8, F=8, E=8, K=2, masked_frac=1.0)
    with pytest.raises(ValueError, match="n_hot"):
        moe_paths.force_hot_expert(torch.randn(4, 8), torch.randn(3, 8), 5)


def test_issue_shapes_are_present():
    by_name = {s.name: s for s in shapes.GPU_SHAPES}
    q = by_name["qwen3"]
    assert (q.T, q.D, q.F, q.E, q.K) == (16384, 2048, 768, 128, 8)
    skew = by_name["mixtral-skew50"]
    assert skew.hot_tokens == skew.T * skew.K // 2  # half the rows
    # each GPU shape has a tiny CPU stand-in with the same routing features
    cpu = {(s.hot_share > 0, s.masked_frac > 0, s.decode) for s in shapes.CPU_SHAPES}
    assert {(s.hot_share > 0, s.masked_frac > 0, s.decode) for s in shapes.GPU_SHAPES} <= cpu
    assert any(s.E >= 16 and s.K == 8 for s in shapes.CPU_SHAPES)  # fine-grained, Qwen3-like
