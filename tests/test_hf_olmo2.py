"""OLMo-2 checkpoints as flexkern anchors (import-hf): transformers' logits with and without
grouped-query attention, bit-exact round trips, and an owner expert trained from the imported
anchor, packaged and merged."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from flexkern.cli import main  # noqa: E402
from flexkern.flexolmo import hf  # noqa: E402
from flexkern.flexolmo.checkpoint import artifact_kind, read_public_embedding, write_model_dir  # noqa: E402
from flexkern.flexolmo.data import load_documents, split_documents  # noqa: E402
from flexkern.flexolmo.embed import domain_embedding  # noqa: E402
from flexkern.flexolmo.hf_format import HF_DEFAULTS, flexkern_config  # noqa: E402
from flexkern.flexolmo.merge import expert_tensors, load_model, merge  # noqa: E402
from flexkern.flexolmo.model import FlexOlmoLM, ModelConfig, anchor_fingerprint  # noqa: E402
from flexkern.flexolmo.package import load_package  # noqa: E402
from flexkern.flexolmo.tokenizer import load_tokenizer  # noqa: E402
from flexkern.flexolmo.train import train_expert  # noqa: E402
from hf_tiny import (bits_equal, check_vs_transformers, flexolmo, make_tokenizer, olmo2,  # noqa: E402
                     safetensors_of, save_with_tokenizer, vocab)
from synthetic import synthetic_docs  # noqa: E402

CODE = synthetic_docs("def return import class self if else for while print lambda yield None x", 40, 1)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("public")
    for i, doc in enumerate(synthetic_docs("the a of and to in is was river city king war year people", 30, 2)):
        (folder / f"{i}.txt").write_text(doc)
    return folder


def _ids(V, B=2, S=20):
    return torch.randint(0, V, (B, S))


def test_config_defaults_are_transformers():
    """A field config.json leaves out means what transformers' config class assumes."""
    for mt, cls in (("flex_olmo", transformers.FlexOlmoConfig), ("olmo2", transformers.Olmo2Config)):
        c, want = cls(), HF_DEFAULTS[mt]
        assert c.rope_parameters["rope_theta"] == want["rope_theta"]
        assert c.rms_norm_eps == want["rms_norm_eps"] and c.max_position_embeddings == want["max_position_embeddings"]
        bare = {"model_type": mt, "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 3, "num_experts_per_tok": 2}
        cfg = flexkern_config(bare)
        assert (cfg.rope_theta, cfg.norm_eps, cfg.seq_len, cfg.n_kv_heads) == (
            want["rope_theta"], want["rms_norm_eps"], want["max_position_embeddings"], 4)
        assert cfg.num_experts == (3 if mt == "flex_olmo" else 0)


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, False), (1, True)])
def test_import_olmo2_anchor_same_logits(tmp_path, tok_path, public_dir, kv_heads, tied):
    ref = save_with_tokenizer(olmo2(tok_path, kv_heads=kv_heads, tied=tied), tmp_path / "hf", tok_path)
    out = hf.import_hf(tmp_path / "hf", tmp_path / "anchor", public=[public_dir])
    assert artifact_kind(out) == "anchor" and not (out / "experts.json").exists()
    model, names = load_model(out)
    assert names == ["public"] and model.config.n_kv_heads == kv_heads and not model.moe_layers()
    check_vs_transformers(model, ref, _ids(model.config.vocab_size))
    # r_pub: the mean embedding (the model's own hidden states) of the public documents' training split
    docs = split_documents(load_documents(str(public_dir)))[0]
    row, method = read_public_embedding(out)
    want = domain_embedding(docs, "anchor", model, load_tokenizer(out / "tokenizer.json"), num_docs=256)
    assert method == "anchor" and torch.equal(row, want)
    notes = json.loads((out / hf.IMPORT_FILE).read_text())
    assert notes["hf_import"]["dtype"] == "float32" and notes["hf_import"]["tied_embeddings"] is tied
    assert notes["public_row"]["sources"] == [str(public_dir)] and notes["public_row"]["documents"] == len(docs)


def test_import_flexolmo_with_gqa(tmp_path, tok_path):
    ref = save_with_tokenizer(flexolmo(tok_path, experts=3, kv_heads=2), tmp_path / "hf", tok_path)
    model, names = load_model(hf.import_hf(tmp_path / "hf", tmp_path / "fk"))
    assert names == ["public", "expert_1", "expert_2"] and model.config.n_kv_heads == 2
    check_vs_transformers(model, ref, _ids(model.config.vocab_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_olmo2_round_trips_are_bit_identical(tmp_path, tok_path, public_dir, dtype):
    # transformers -> flexkern anchor -> transformers: the same tensors and config, in the dtype it came in
    save_with_tokenizer(olmo2(tok_path, kv_heads=2), tmp_path / "hf", tok_path, dtype=dtype)
    anchor = hf.import_hf(tmp_path / "hf", tmp_path / "anchor", public=[public_dir])
    again = hf.export_hf(anchor, tmp_path / "hf2")
    a, b = safetensors_of(tmp_path / "hf"), safetensors_of(again)
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["architectures"] == ["Olmo2ForCausalLM"]
    # flexkern GQA anchor -> transformers -> flexkern: the same state dict, bit for bit
    V = vocab(tok_path)
    model = FlexOlmoLM(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                   seq_len=32)).eval()
    d = write_model_dir(tmp_path / "own", model, tok_path, torch.randn(32), "anchor")
    exported = hf.export_hf(d, tmp_path / "hf3")
    check_vs_transformers(model, transformers.AutoModelForCausalLM.from_pretrained(exported).eval(), _ids(V))
    back, _ = load_model(hf.import_hf(exported, tmp_path / "back", public_row_from=d))
    s1, s2 = model.state_dict(), back.state_dict()
    assert s1.keys() == s2.keys() and all(bits_equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(read_public_embedding(tmp_path / "back")[0], read_public_embedding(d)[0])


def test_owner_trains_from_imported_olmo2(tmp_path, tok_path, public_dir):
    """import an OLMo-2 (GQA) -> train one owner expert -> package -> merge."""
    save_with_tokenizer(olmo2(tok_path, kv_heads=2), tmp_path / "hf", tok_path)
    anchor = hf.import_hf(tmp_path / "hf", tmp_path / "anchor", public=[public_dir])
    seen = {}
    pkg = train_expert(anchor, CODE, tmp_path / "experts", name="code", steps=2, batch_size=2, log=False,
                       callback=lambda s, loss, m: seen.setdefault("losses", []).append(loss))
    tensors, manifest = load_package(pkg)
    base, _ = load_model(anchor)
    assert manifest["anchor_fingerprint"] == anchor_fingerprint(base) and manifest["embed_method"] == "anchor"
    assert len(seen["losses"]) == 2 and all(torch.isfinite(torch.tensor(seen["losses"])))
    merged, names = load_model(merge(anchor, [pkg], tmp_path / "merged"))
    assert names == ["public", "code"] and merged.config.n_kv_heads == 2
    assert anchor_fingerprint(merged) == anchor_fingerprint(base)
    own = expert_tensors(merged, 1)
    assert all(torch.equal(own[k], tensors[k]) for k in tensors)
    assert not torch.equal(own["layers.0.up_proj"], base.blocks[0].ffn.up_proj.weight)  # it trained
    # with the owner masked, the merged model is the anchor again (the public expert alone, weight 1
    # only when top_k = 1 over the one active expert)
    merged.set_top_k(1)
    merged.set_expert_mask([True, False])
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), rtol=1e-5, atol=1e-5)


def test_import_hf_command_olmo2(tmp_path, tok_path, public_dir, capsys):
    save_with_tokenizer(olmo2(tok_path, kv_heads=2), tmp_path / "hf", tok_path)
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "anchor")
    assert main(["import-hf", hf_dir, "--out", out]) == 2
    assert "--public" in capsys.readouterr().err and not (tmp_path / "anchor").exists()
    assert main(["import-hf", hf_dir, "--out", out, "--public", str(public_dir), "--names", "public"]) == 2
    assert "dense" in capsys.readouterr().err
    assert main(["import-hf", hf_dir, "--out", out, "--public", str(tmp_path / "nope")]) == 2
    assert main(["import-hf", hf_dir, "--out", out, "--public", str(public_dir), "--embed-method", "minilm"]) == 2
    assert "384" in capsys.readouterr().err and not (tmp_path / "anchor").exists()
    assert main(["import-hf", hf_dir, "--out", out, "--public", str(public_dir), "--embed-docs", "8"]) == 0
    assert artifact_kind(tmp_path / "anchor") == "anchor"
    assert json.loads((tmp_path / "anchor" / hf.IMPORT_FILE).read_text())["public_row"]["documents"] == 8
    # a FlexOlmo checkpoint carries its public row: --public is refused for it
    save_with_tokenizer(flexolmo(tok_path), tmp_path / "flex", tok_path)
    assert main(["import-hf", str(tmp_path / "flex"), "--out", str(tmp_path / "m"), "--public", str(public_dir)]) == 2
    assert "carries its public router row" in capsys.readouterr().err


def test_import_olmo2_leaves_what_it_did_not_create(tmp_path, tok_path, public_dir):
    """An anchor import never deletes or overwrites a folder it did not write, nor its inputs."""
    from flexkern.flexolmo.checkpoint import CheckpointError

    save_with_tokenizer(olmo2(tok_path), tmp_path / "hf", tok_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a flexkern artifact"):
        hf.import_hf(tmp_path / "hf", mine, public=[public_dir], overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError):  # the output may not be (inside) an input
        hf.import_hf(tmp_path / "hf", public_dir / "anchor", public=[public_dir])
    assert not (public_dir / "anchor").exists()
    anchor = hf.import_hf(tmp_path / "hf", tmp_path / "anchor", public=[public_dir])
    before = {p.name: p.read_bytes() for p in anchor.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError):  # --public-row-from the output itself: refused, nothing changed
        hf.import_hf(tmp_path / "hf", anchor, public_row_from=anchor, overwrite=True)
    assert {p.name: p.read_bytes() for p in anchor.iterdir() if p.is_file()} == before
