"""FlexOlmoLM: config, shapes, causality, fingerprint, MoE controls (micro preset, CPU)."""
import dataclasses
import math

import pytest
import torch

from flexkern.flexolmo.merge import assemble, dense_expert_tensors
from flexkern.flexolmo.model import (PRESETS, FlexOlmoLM, ModelConfig, anchor_fingerprint, lm_loss,
                                     shared_state_dict)

MICRO = PRESETS["micro"]


def _ids(cfg, B=2, S=None):
    return torch.randint(0, cfg.vocab_size, (B, S or cfg.seq_len))


def test_config_round_trip_and_validation():
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert all(c.d_model == 384 for n, c in PRESETS.items() if n != "micro")
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**MICRO.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(MICRO, n_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        MICRO.with_experts(2, 3)
    assert MICRO.with_experts(3, 2).dense() == MICRO


@pytest.mark.parametrize("experts", [0, 3])
def test_shapes_and_causality(experts):
    cfg = MICRO if not experts else MICRO.with_experts(experts, 2)
    model = FlexOlmoLM(cfg).eval()
    ids = _ids(cfg)
    logits = model(ids)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert model.hidden_states(ids).shape == (2, cfg.seq_len, cfg.d_model)
    j = cfg.seq_len // 2
    ids2 = ids.clone()
    ids2[:, j:] = (ids2[:, j:] + 1) % cfg.vocab_size
    logits2 = model(ids2)
    torch.testing.assert_close(logits2[:, :j], logits[:, :j])  # the past never sees the future
    assert not torch.allclose(logits2[:, j:], logits[:, j:])


def test_untrained_loss_is_near_uniform():
    model = FlexOlmoLM(MICRO)
    with torch.no_grad():
        loss = lm_loss(model, _ids(MICRO, B=4, S=MICRO.seq_len + 1))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - math.log(MICRO.vocab_size)) < 0.3
    with pytest.raises(ValueError):
        lm_loss(model, torch.zeros(4, dtype=torch.long))


def test_fingerprint_covers_shared_weights_only():
    model = FlexOlmoLM(MICRO)
    names = set(shared_state_dict(model))
    assert "blocks.0.ffn_norm.weight" in names and "lm_head.weight" in names and "embed.weight" in names
    assert not any(".ffn." in n for n in names)
    fp = anchor_fingerprint(model)
    with torch.no_grad():
        model.blocks[0].ffn.up_proj.weight.add_(1.0)
    assert anchor_fingerprint(model) == fp
    with torch.no_grad():
        w = model.blocks[1].attn.k_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))  # one ulp
    assert anchor_fingerprint(model) != fp
    assert anchor_fingerprint(model.state_dict()) == anchor_fingerprint(model)


def test_moe_of_dense_copies_equals_dense():
    """All experts = the dense FFN and top_k = E: the gate weights sum to 1, so the MoE model
    computes the anchor's function (the owner model starts exactly where the anchor is)."""
    anchor = FlexOlmoLM(MICRO).eval()
    rows = torch.randn(3, MICRO.d_model)
    moe = assemble(anchor, [dense_expert_tensors(anchor, r) for r in rows], top_k=3).eval()
    ids = _ids(MICRO)
    torch.testing.assert_close(moe(ids), anchor(ids), rtol=1e-5, atol=1e-5)
    assert anchor_fingerprint(moe) == anchor_fingerprint(anchor)


def test_moe_controls():
    dense = FlexOlmoLM(MICRO)
    assert float(dense.router_z_loss()) == 0.0
    with pytest.raises(ValueError, match="dense"):
        dense.set_top_k(1)
    model = FlexOlmoLM(MICRO.with_experts(3, 2))
    model(_ids(MICRO))  # the z-loss is kept by forwards that want a gradient
    assert float(model.router_z_loss().detach()) > 0 and len(model.moe_layers()) == MICRO.n_layers
    model.set_top_k(3)
    assert model.config.top_k == 3 and all(m.top_k == 3 for m in model.moe_layers())
    with pytest.raises(ValueError):
        model.set_top_k(4)
    with pytest.raises(ValueError, match="shape"):
        model.set_expert_mask([True, False])
    with pytest.raises(ValueError, match="fewer than top_k"):
        model.set_expert_mask([True, True, False])
    model.set_top_k(2)
    model.set_expert_mask([True, False, True])
    assert all(m.expert_mask.tolist() == [True, False, True] for m in model.moe_layers())
