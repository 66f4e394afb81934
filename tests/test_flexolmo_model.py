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


# ---- grouped-query attention ----------------------------------------------------------------------------
GQA = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=64, seq_len=24)


def test_gqa_config():
    assert MICRO.n_kv_heads == MICRO.n_heads and MICRO.kv_dim == MICRO.d_model
    old = {k: v for k, v in MICRO.to_dict().items() if k != "n_kv_heads"}  # files written before GQA
    assert ModelConfig.from_dict(old) == MICRO and ModelConfig.from_dict(GQA.to_dict()) == GQA
    assert GQA.kv_dim == 16 and GQA.with_experts(3, 2).dense() == GQA
    for bad in (0, 4, 7, True, 2.0, 5000):
        with pytest.raises(ValueError, match="n_kv_heads"):
            dataclasses.replace(GQA, n_kv_heads=bad)
    for cfg in (GQA, GQA.with_experts(3, 2), MICRO):
        assert cfg.num_parameters() == sum(p.numel() for p in FlexOlmoLM(cfg).parameters())


def _repeated_heads(gqa: FlexOlmoLM) -> FlexOlmoLM:
    """The same network as multi-head attention: every key/value head copied to its query heads."""
    cfg = gqa.config
    mha = FlexOlmoLM(dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)).to(gqa.lm_head.weight.dtype)
    hd, rep = cfg.d_model // cfg.n_heads, cfg.n_heads // cfg.n_kv_heads
    state = {}
    for k, v in gqa.state_dict().items():
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight")):
            v = v.reshape(cfg.n_kv_heads, hd, *v.shape[1:]).repeat_interleave(rep, 0).reshape(cfg.d_model, *v.shape[1:])
        state[k] = v
    mha.load_state_dict(state)
    return mha


def test_gqa_equals_repeated_heads_with_gradients():
    """Query head h reads key/value head h // (H / G) (transformers' repeat_kv); the gradient of a
    shared key/value weight is the sum over its copies."""
    gqa = FlexOlmoLM(GQA).double()
    with torch.no_grad():
        for name, p in gqa.named_parameters():
            p.normal_(0.0, 0.3) if "norm" not in name else p.uniform_(0.5, 1.5)
    mha = _repeated_heads(gqa)
    ids = _ids(GQA, B=2, S=GQA.seq_len)
    out_g, out_m = gqa(ids), mha(ids)

    def close(a, b):  # RMSNorm reduces in float32 (over G vs H heads here): float32 rounding, no more
        assert (a - b).abs().max() <= 32 * torch.finfo(torch.float32).eps * b.abs().max()

    close(out_g, out_m)
    out_g.square().mean().backward()
    out_m.square().mean().backward()
    G, hd, rep = GQA.n_kv_heads, GQA.d_model // GQA.n_heads, GQA.n_heads // GQA.n_kv_heads
    for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight", "q_proj.weight"):
        g = gqa.get_parameter(f"blocks.1.attn.{name}").grad
        m = mha.get_parameter(f"blocks.1.attn.{name}").grad
        if not name.startswith("q"):
            m = m.reshape(G, rep, hd, *m.shape[1:]).sum(1).reshape(g.shape)
        close(g, m)
    # causal too
    ids2 = ids.clone()
    ids2[:, 10:] = (ids2[:, 10:] + 1) % GQA.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids2)[:, :10], out_g.detach()[:, :10])


def test_model_dir_without_n_kv_heads_loads_bit_identical(tmp_path):
    """A config.json written before the field existed gives the same model, bit for bit."""
    import json

    from flexkern.flexolmo.checkpoint import read_model_dir, write_model_dir
    from flexkern.flexolmo.tokenizer import save_tokenizer, train_tokenizer

    t = train_tokenizer([f"text {i} with words" for i in range(50)], vocab_size=MICRO.vocab_size)
    tok = save_tokenizer(t, tmp_path / "tokenizer.json")
    cfg = dataclasses.replace(MICRO, vocab_size=t.get_vocab_size())
    model = FlexOlmoLM(cfg).eval()
    d = write_model_dir(tmp_path / "anchor", model, tok, torch.randn(cfg.d_model), "test")
    conf = json.loads((d / "config.json").read_text())
    assert conf.pop("n_kv_heads") == cfg.n_heads
    (d / "config.json").write_text(json.dumps(conf))
    back, _ = read_model_dir(d)
    ids = _ids(cfg)
    assert back.config == cfg and torch.equal(back(ids), model(ids))
