"""FlexOlmo checkpoints in and out of transformers (flexkern.flexolmo.hf): export -> from_pretrained
gives flexkern's logits; import of a saved FlexOlmoForCausalLM gives transformers' logits; round
trips are bit-identical; opt-out by export equals masking; router biases refused or dropped."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
from safetensors import safe_open  # noqa: E402

from flexkern.flexolmo import hf  # noqa: E402
from hf_tiny import check_vs_transformers  # noqa: E402
from flexkern.flexolmo.checkpoint import CheckpointError, write_model_dir  # noqa: E402
from flexkern.flexolmo.merge import load_model, mask_experts  # noqa: E402
from flexkern.flexolmo.model import FlexOlmoLM, ModelConfig, anchor_fingerprint  # noqa: E402
from flexkern.flexolmo.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer  # noqa: E402

NAMES = ["public", "code", "law"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [f"def f{i}(x): return x * {i}  # the quick brown fox {i}" for i in range(60)]
    return save_tokenizer(train_tokenizer(texts, vocab_size=300), tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _vocab(tok_path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_path)).get_vocab_size()


def _cfg(tok_path, num_experts=3, top_k=2):
    return ModelConfig(vocab_size=_vocab(tok_path), d_model=32, n_layers=2, n_heads=2, d_ff=48, seq_len=32,
                       num_experts=num_experts, top_k=top_k)


def _random_model(cfg):
    model = FlexOlmoLM(cfg).eval()
    with torch.no_grad():  # larger than the init so every part shows in the logits
        for name, p in model.named_parameters():
            if "norm" not in name and not name.endswith("router.bias"):
                p.normal_(0.0, 0.2)
    return model


def _model_dir(path, model, tok_path, names=NAMES):
    experts = {"experts": names, "anchor_fingerprint": anchor_fingerprint(model), "packages": {n: {"name": n} for n in names[1:]}} \
        if model.moe_layers() else None
    return write_model_dir(path, model, tok_path, torch.randn(model.config.d_model), "test", experts)


def _hf(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _check_logits(hf_model, fk_model, ids):
    """transformers' error (fp32) vs flexkern in fp64 <= 2 x flexkern's own fp32 error + a few ulps."""
    with torch.no_grad():
        got = hf_model(ids).logits.double()
        own = fk_model(ids).double()
        oracle = fk_model.double()(ids)
        fk_model.float()
    floor = 8 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    err, ref = (got - oracle).abs().max().item(), (own - oracle).abs().max().item()
    assert err <= 2 * ref + floor, f"transformers error {err:.3g} vs flexkern's own {ref:.3g} (floor {floor:.3g})"


class _Logits(torch.nn.Module):
    """A transformers causal LM as a module returning logits (what flexkern's evaluation scores)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _ids(cfg, B=2, S=12):
    return torch.randint(0, cfg.vocab_size, (B, S))


def _safetensors(folder):
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- export -------------------------------------------------------------------------------------------------
def test_export_merged_loads_with_same_logits(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path))
    out = hf.export_hf(_model_dir(tmp_path / "merged", model, tok_path), tmp_path / "hf")
    loaded = _hf(out)
    assert type(loaded).__name__ == "FlexOlmoForCausalLM"
    assert loaded.config.num_experts == 3 and loaded.config.num_experts_per_tok == 2
    ids = _ids(model.config)
    _check_logits(loaded, model, ids)
    import flexkern.integrations.transformers  # noqa: F401

    _check_logits(_hf(out, experts_implementation="flexkern"), model, ids)
    info = json.loads((out / hf.FLEXKERN_FILE).read_text())
    assert info["experts"] == NAMES and info["removed"] == [] and info["dropped_router_bias"] == {}
    # the tokenizer, as transformers loads it, encodes like flexkern's
    from tokenizers import Tokenizer

    t = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f3(x): return the fox"
    assert t(text)["input_ids"] == Tokenizer.from_file(str(tok_path)).encode(text).ids
    assert t.eos_token == EOS_TOKEN and loaded.config.eos_token_id == t.eos_token_id


def test_export_anchor_is_olmo2(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path, num_experts=0, top_k=1))
    out = hf.export_hf(_model_dir(tmp_path / "anchor", model, tok_path), tmp_path / "hf")
    loaded = _hf(out)
    assert type(loaded).__name__ == "Olmo2ForCausalLM"
    _check_logits(loaded, model, _ids(model.config))


def test_export_sharded(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path))
    d = _model_dir(tmp_path / "merged", model, tok_path)
    out = hf.export_model(load_model(d)[0], tok_path, tmp_path / "hf", names=NAMES, max_shard_bytes=40_000)
    assert (out / hf.INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    _check_logits(_hf(out), model, _ids(model.config))
    back, names, _ = hf.load_hf(out)  # import reads shards too
    assert names == NAMES
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_router_bias_refused_dropped_and_costed(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path))
    with torch.no_grad():
        model.blocks[1].ffn.router.bias[2] = -0.7
        model.blocks[0].ffn.router.bias[0] = -5.0  # the public expert's bias is never used
    d = _model_dir(tmp_path / "merged", model, tok_path)
    with pytest.raises(hf.HFFormatError, match=r"1 router biases are below zero .*layer 1 / law: -0.7"):
        hf.export_hf(d, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = hf.export_hf(d, tmp_path / "hf", drop_router_bias=True)
    info = json.loads((out / hf.FLEXKERN_FILE).read_text())
    assert info["dropped_router_bias"] == {"layer 1 / law": pytest.approx(-0.7)}
    loaded = _hf(out)
    no_bias = _random_model(model.config)
    no_bias.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in no_bias.moe_layers():
            m.router.bias.zero_()
    _check_logits(loaded, no_bias, _ids(model.config))
    # what dropping costs, per domain, on micro token streams
    V = model.config.vocab_size
    streams = {"a": torch.randint(0, V, (200,)), "b": torch.randint(0, V, (200,))}
    cost = hf.router_bias_cost(model, streams, seq_len=16)
    assert set(cost) == {"a", "b"}
    from flexkern.flexolmo.evaluate import stream_loss

    for name, s in streams.items():
        c = cost[name]
        assert c["delta"] == pytest.approx(c["without_bias"] - c["with_bias"])
        assert c["with_bias"] == pytest.approx(stream_loss(model, s, 16), rel=1e-6)  # bias restored after
        assert c["without_bias"] == pytest.approx(stream_loss(no_bias, s, 16), rel=1e-6)
        assert c["without_bias"] == pytest.approx(stream_loss(_Logits(loaded), s, 16), rel=1e-5)  # the export
        assert c["delta"] != 0.0  # the bias does change this model's routing
    assert model.blocks[1].ffn.router.bias[2].item() == pytest.approx(-0.7)


def test_opt_out_by_export_equals_masking(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path, num_experts=4, top_k=2))
    names = NAMES + ["news"]
    d = _model_dir(tmp_path / "merged", model, tok_path, names)
    out = hf.export_hf(d, tmp_path / "hf", opt_out=["law"])
    loaded = _hf(out)
    assert loaded.config.num_experts == 3
    info = json.loads((out / hf.FLEXKERN_FILE).read_text())
    assert info["experts"] == ["public", "code", "news"] and info["removed"] == ["law"]
    assert "law" not in info["notes"]["packages"]
    masked, _ = load_model(d)
    mask_experts(masked, "law", names)
    _check_logits(loaded, masked, _ids(model.config))
    # an in-memory masked model exports the same tensors
    out2 = hf.export_model(masked, tok_path, tmp_path / "hf2", names=names)
    a, b = _safetensors(out), _safetensors(out2)
    assert a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)
    # and so does a model directory saved with that mask
    out3 = hf.export_hf(_model_dir(tmp_path / "masked", masked, tok_path, names), tmp_path / "hf4")
    c = _safetensors(out3)
    assert a.keys() == c.keys() and all(_bits_equal(a[k], c[k]) for k in a)
    with pytest.raises(hf.HFFormatError, match="public expert"):
        hf.export_hf(d, tmp_path / "hf3", opt_out=["public"])


def test_export_refuses_existing_output(tmp_path, tok_path):
    d = _model_dir(tmp_path / "merged", _random_model(_cfg(tok_path)), tok_path)
    out = hf.export_hf(d, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="overwrite"):
        hf.export_hf(d, out)
    hf.export_hf(d, out, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a flexkern artifact"):
        hf.export_hf(d, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError):  # a merged model directory is not an export either
        hf.export_hf(d, d, overwrite=True)


# ---- import -------------------------------------------------------------------------------------------------
def _saved_flexolmo(path, tok_path, tied=False, dtype=torch.float32, vocab_pad=0, **over):
    V = _vocab(tok_path) + vocab_pad
    cfg = transformers.FlexOlmoConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_experts=3, num_experts_per_tok=2,
                                      max_position_embeddings=32, pad_token_id=None, bos_token_id=None,
                                      eos_token_id=0, tie_word_embeddings=tied,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **over)
    model = transformers.FlexOlmoForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(path)
    from tokenizers import Tokenizer

    t = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_path)), eos_token=EOS_TOKEN)
    t.save_pretrained(path)
    return model


def test_import_saved_flexolmo_same_logits(tmp_path, tok_path):
    ref = _saved_flexolmo(tmp_path / "hf", tok_path)
    out = hf.import_hf(tmp_path / "hf", tmp_path / "fk")
    model, names = load_model(out)
    assert names == ["public", "expert_1", "expert_2"]
    check_vs_transformers(model, ref, _ids(model.config))
    assert all(not m.router.bias.detach().any() for m in model.moe_layers())
    info = json.loads((out / "experts.json").read_text())
    assert info["hf_import"]["dtype"] == "float32"


def test_import_tied_embeddings(tmp_path, tok_path):
    ref = _saved_flexolmo(tmp_path / "hf", tok_path, tied=True)
    assert "lm_head.weight" not in _safetensors(tmp_path / "hf")
    model, _, _ = hf.load_hf(tmp_path / "hf")
    assert torch.equal(model.lm_head.weight, model.embed.weight)
    check_vs_transformers(model, ref, _ids(model.config))


def test_import_fused_names(tmp_path, tok_path):
    """A checkpoint holding the in-memory fused gate_up_proj / down_proj reads the same."""
    ref = _saved_flexolmo(tmp_path / "hf", tok_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "hf" / hf.WEIGHTS_FILE),
              metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in _safetensors(tmp_path / "hf")
    a, _, _ = hf.load_hf(tmp_path / "hf")
    ref.save_pretrained(tmp_path / "hf")  # per-expert names again
    b, _, _ = hf.load_hf(tmp_path / "hf")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trips_are_bit_identical(tmp_path, tok_path, dtype):
    # transformers -> flexkern -> transformers: the same tensors, bit for bit (exported in the
    # dtype the checkpoint came in)
    _saved_flexolmo(tmp_path / "hf", tok_path, dtype=dtype)
    fk = hf.import_hf(tmp_path / "hf", tmp_path / "fk")
    again = hf.export_hf(fk, tmp_path / "hf2")
    a, b = _safetensors(tmp_path / "hf"), _safetensors(again)
    assert a.keys() == b.keys()
    assert all(_bits_equal(a[k], b[k]) for k in a)
    # flexkern -> transformers -> flexkern: the same state dict, names and notes
    model = _random_model(_cfg(tok_path))
    d = _model_dir(tmp_path / "merged", model, tok_path)
    back = hf.import_hf(hf.export_hf(d, tmp_path / "hf3"), tmp_path / "back")
    m2, names = load_model(back)
    s1, s2 = model.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(_bits_equal(s1[k], s2[k]) for k in s1)
    assert names == NAMES
    assert json.loads((back / "experts.json").read_text())["packages"] == {n: {"name": n} for n in NAMES[1:]}
    assert (back / "tokenizer.json").read_bytes() == tok_path.read_bytes()


def _edit_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, match", [
    (dict(model_type="olmoe", architectures=["OlmoeForCausalLM"]), "model_type 'olmoe'"),
    (dict(num_key_value_heads=1), r"k_proj.weight' has shape \(32, 32\), the config needs \(16, 32\)"),
    (dict(num_key_value_heads=3), "n_kv_heads"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(norm_topk_prob=True), "renormalised top-k"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "RoPE scaling"),
    (dict(intermediate_size=40), "has shape .* the config needs"),
    (dict(num_hidden_layers=3), "model.layers.2.* is missing"),
    (dict(num_hidden_layers=1), "no place for: .*model.layers.1"),
])
def test_import_refuses(tmp_path, tok_path, change, match):
    _saved_flexolmo(tmp_path / "hf", tok_path)
    _edit_config(tmp_path / "hf", **change)
    with pytest.raises(hf.HFFormatError, match=match):
        hf.import_hf(tmp_path / "hf", tmp_path / "fk")
    assert not (tmp_path / "fk").exists()


def test_import_refuses_missing_tensor_and_dense(tmp_path, tok_path):
    _saved_flexolmo(tmp_path / "hf", tok_path)
    t = _safetensors(tmp_path / "hf")
    del t["model.layers.1.mlp.experts.2.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "hf" / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match="experts.2.up_proj.weight' is missing"):
        hf.import_hf(tmp_path / "hf", tmp_path / "fk")
    anchor = _random_model(_cfg(tok_path, num_experts=0, top_k=1))
    olmo2 = hf.export_hf(_model_dir(tmp_path / "anchor", anchor, tok_path), tmp_path / "olmo2")
    with pytest.raises(ValueError, match="needs the public router row"):  # an anchor (tests/test_hf_olmo2.py)
        hf.import_hf(olmo2, tmp_path / "fk")


def test_import_names_and_existing_output(tmp_path, tok_path):
    _saved_flexolmo(tmp_path / "hf", tok_path)
    out = hf.import_hf(tmp_path / "hf", tmp_path / "fk", names=["public", "math", "code"])
    assert load_model(out)[1] == ["public", "math", "code"]
    with pytest.raises(CheckpointError, match="overwrite"):
        hf.import_hf(tmp_path / "hf", out)
    hf.import_hf(tmp_path / "hf", out, overwrite=True)
    with pytest.raises(ValueError, match="starting with 'public'"):
        hf.import_hf(tmp_path / "hf", tmp_path / "fk2", names=["math", "code", "x"])


def test_router_bias_cost_on_folders(tmp_path, tok_path):
    model = _random_model(_cfg(tok_path))
    with torch.no_grad():
        model.blocks[0].ffn.router.bias[1] = -1.5
    d = _model_dir(tmp_path / "merged", model, tok_path)
    for name in ("src_a", "src_b"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(12):
            (folder / f"{i}.txt").write_text(f"def f{i}(x): return x * {i}  # {name} the quick brown fox\n" * 4)
    cost = hf.router_bias_cost_dir(d, [tmp_path / "src_a", tmp_path / "src_b"], seq_len=16)
    assert list(cost) == [str(tmp_path / "src_a"), str(tmp_path / "src_b")]
    assert all(c["delta"] == pytest.approx(c["without_bias"] - c["with_bias"]) for c in cost.values())
    table = hf.format_bias_cost(cost)
    assert "with bias" in table and str(tmp_path / "src_a") in table


def test_import_padded_vocabulary(tmp_path, tok_path):
    """More embedding rows than tokens (as the released FlexOlmo): placeholders for the unused rows."""
    ref = _saved_flexolmo(tmp_path / "hf", tok_path, vocab_pad=5)
    out = hf.import_hf(tmp_path / "hf", tmp_path / "fk")
    model, _ = load_model(out)
    from tokenizers import Tokenizer

    tok, orig = Tokenizer.from_file(str(out / "tokenizer.json")), Tokenizer.from_file(str(tok_path))
    V = orig.get_vocab_size()
    assert tok.get_vocab_size() == model.config.vocab_size == V + 5
    assert tok.token_to_id(hf.PLACEHOLDER.format(4)) == V + 4
    text = "def f7(x): return x * 7  # the quick brown fox"
    assert tok.encode(text).ids == orig.encode(text).ids
    assert json.loads((out / "experts.json").read_text())["hf_import"]["tokenizer_placeholders"] == 5
    check_vs_transformers(model, ref, torch.randint(0, V, (2, 9)))
    again = _safetensors(hf.export_hf(out, tmp_path / "hf2"))
    first = _safetensors(tmp_path / "hf")
    assert first.keys() == again.keys() and all(_bits_equal(first[k], again[k]) for k in first)
