"""`flexkern package`: one owner expert out of a merged model as a package (merge.extract_package),
so packages from released 2-expert owner models (read with import-hf) merge onto an imported OLMo-2
anchor, with merge's fingerprint checks; merged -> packages -> merge gives the model back bit for bit."""
import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from flexkern.cli import main  # noqa: E402
from flexkern.flexolmo import hf  # noqa: E402
from flexkern.flexolmo.checkpoint import CheckpointError, write_model_dir  # noqa: E402
from flexkern.flexolmo.merge import (MergeError, assemble, dense_expert_tensors, extract_package,  # noqa: E402
                                     load_model, merge, opt_in)
from flexkern.flexolmo.model import FlexOlmoLM, ModelConfig, anchor_fingerprint  # noqa: E402
from flexkern.flexolmo.package import load_package  # noqa: E402
from hf_tiny import (bits_equal, check_vs_transformers, flexolmo, make_tokenizer, olmo2, owner_of,  # noqa: E402
                     safetensors_of, save_with_tokenizer, vocab)

OWNERS = ("math", "code")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def released(tmp_path_factory, tok_path):
    """A public OLMo-2 and two FlexOlmo owner models trained from it, as transformers checkpoints,
    each imported: owners as merged models, the public model as the anchor (r_pub from an owner)."""
    root = tmp_path_factory.mktemp("released")
    public = save_with_tokenizer(olmo2(tok_path, kv_heads=2), root / "public-hf", tok_path)
    r_pub = torch.randn(public.config.hidden_size)
    owners = {}
    for seed, name in enumerate(OWNERS):
        owners[name] = save_with_tokenizer(owner_of(public, tok_path, r_pub, seed), root / f"{name}-hf", tok_path)
        hf.import_hf(root / f"{name}-hf", root / name, names=["public", name])
    anchor = hf.import_hf(root / "public-hf", root / "anchor", public_row_from=root / OWNERS[0])
    return SimpleNamespace(root=root, public=public, owners=owners, r_pub=r_pub, anchor=anchor)


def _merged_reference(released, tok_path, top_k):
    """transformers' FlexOlmo with experts [public FFN, math, code] and rows [r_pub, r_math, r_code]."""
    ref = flexolmo(tok_path, experts=1 + len(OWNERS), top_k=top_k, kv_heads=2)
    state = ref.state_dict()
    dense = released.public.state_dict()
    with torch.no_grad():
        for k in state:
            if k in dense:
                state[k].copy_(dense[k])
        for i in range(released.public.config.num_hidden_layers):
            mlp = f"model.layers.{i}.mlp"
            state[f"{mlp}.experts.gate_up_proj"][0] = torch.cat([dense[f"{mlp}.gate_proj.weight"],
                                                                  dense[f"{mlp}.up_proj.weight"]])
            state[f"{mlp}.experts.down_proj"][0] = dense[f"{mlp}.down_proj.weight"]
            state[f"{mlp}.gate.weight"][0] = released.r_pub
            for e, name in enumerate(OWNERS, 1):
                own = released.owners[name].state_dict()
                for p in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
                    state[f"{mlp}.{p}"][e] = own[f"{mlp}.{p}"][1]
    return ref


def test_owner_model_packages_merge_to_transformers_logits(released, tok_path, tmp_path):
    pkgs = [extract_package(released.root / n, n, tmp_path) for n in OWNERS]
    assert [p.name for p in pkgs] == ["math.flexpert", "code.flexpert"]
    _, manifest = load_package(pkgs[0])
    anchor, _ = load_model(released.anchor)
    assert manifest["anchor_fingerprint"] == anchor_fingerprint(anchor) and manifest["public_expert_sha256"]
    model, names = load_model(merge(released.anchor, pkgs, tmp_path / "merged", top_k=2))
    assert names == ["public", *OWNERS]
    ref = _merged_reference(released, tok_path, top_k=2)
    check_vs_transformers(model, ref, torch.randint(0, model.config.vocab_size, (2, 20)))
    # and its export holds exactly the tensors of the hand-built transformers model
    ref.save_pretrained(tmp_path / "ref-hf")
    out = safetensors_of(hf.export_hf(tmp_path / "merged", tmp_path / "merged-hf"))
    want = safetensors_of(tmp_path / "ref-hf")
    assert out.keys() == want.keys() and all(bits_equal(out[k], want[k]) for k in want)


@pytest.mark.parametrize("change, match", [
    ("shared", "different anchor"), ("public_ffn", "public expert"), ("r_pub", "public router row")])
def test_merge_refuses_a_package_from_another_model(released, tok_path, tmp_path, change, match):
    other = owner_of(released.public, tok_path, released.r_pub, seed=7)
    with torch.no_grad():
        if change == "shared":  # one ulp of one attention weight
            w = other.model.layers[1].self_attn.k_proj.weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(9.0))
        elif change == "public_ffn":
            other.model.layers[0].mlp.experts.down_proj[0, 0, 0] += 1e-3
        else:
            other.model.layers[0].mlp.gate.weight[0] += 1e-3
            other.model.layers[1].mlp.gate.weight[0] += 1e-3
    save_with_tokenizer(other, tmp_path / "other-hf", tok_path)
    hf.import_hf(tmp_path / "other-hf", tmp_path / "other", names=["public", "news"])
    pkg = extract_package(tmp_path / "other", "news", tmp_path / "news.flexpert")
    ok = extract_package(released.root / "math", "math", tmp_path)
    with pytest.raises(MergeError, match=match):
        merge(released.anchor, [ok, pkg], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    good, _ = load_model(merge(released.anchor, [ok], tmp_path / "one"))
    with pytest.raises(MergeError, match=match):  # opt-in checks the same
        opt_in(tmp_path / "one", pkg, tmp_path / "two")


def _flexkern_merged(root, tok_path, num_owners=2):
    """A flexkern anchor dir and a merged dir built from it (random owners, negative biases)."""
    cfg = ModelConfig(vocab_size=vocab(tok_path), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      seq_len=32)
    anchor = FlexOlmoLM(cfg).eval()
    r_pub = torch.randn(32)
    experts = [dense_expert_tensors(anchor, r_pub)]
    for _ in range(num_owners):
        e = {k: torch.randn_like(v) * 0.1 for k, v in experts[0].items()}
        e.update({k: -torch.rand(()) for k in e if k.endswith("router_bias")})
        experts.append(e)
    model = assemble(anchor, experts, top_k=2)
    names = ["public"] + [f"owner{i}" for i in range(1, num_owners + 1)]
    a = write_model_dir(root / "anchor", anchor, tok_path, r_pub, "anchor")
    info = {"experts": names, "anchor_fingerprint": anchor_fingerprint(model),
            "packages": {n: {"name": n, "steps": 5, "tokens_seen": 640} for n in names[1:]}}
    return a, write_model_dir(root / "merged", model, tok_path, r_pub, "anchor", info), model, names


def test_merged_to_packages_and_back_is_bit_identical(tmp_path, tok_path):
    anchor, merged, model, names = _flexkern_merged(tmp_path, tok_path)
    pkgs = [extract_package(merged, n, tmp_path / "pkgs") for n in names[1:]]
    _, manifest = load_package(pkgs[0])
    assert manifest["steps"] == 5 and manifest["tokens_seen"] == 640 and manifest["source"].startswith("expert")
    back, back_names = load_model(merge(anchor, pkgs, tmp_path / "again", top_k=2))
    s1, s2 = model.state_dict(), back.state_dict()
    assert back_names == names and s1.keys() == s2.keys() and all(bits_equal(s1[k], s2[k]) for k in s1)
    # a package of the same expert under another name is still the same expert
    twin = extract_package(merged, "owner1", tmp_path / "twin", name="twin")
    with pytest.raises(MergeError, match="same weights"):
        merge(anchor, [pkgs[0], twin], tmp_path / "dup")


def test_extract_refuses(tmp_path, tok_path):
    anchor, merged, model, names = _flexkern_merged(tmp_path, tok_path)
    with pytest.raises(MergeError, match="dense model"):
        extract_package(anchor, "owner1", tmp_path / "x")
    with pytest.raises(MergeError, match="no expert named 'nope'"):
        extract_package(merged, "nope", tmp_path / "x")
    with pytest.raises(MergeError, match="public expert"):
        extract_package(merged, "public", tmp_path / "x", name="pub")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with torch.no_grad():  # a router-tuned model: the public row of layer 1 moved
        model.blocks[1].ffn.router.weight[0] += 0.01
    info = json.loads((merged / "experts.json").read_text())
    info["anchor_fingerprint"] = anchor_fingerprint(model)
    tuned = write_model_dir(tmp_path / "tuned", model, tok_path, model.blocks[0].ffn.router.weight[0].detach(),
                            "anchor", info)
    with pytest.raises(MergeError, match="layer 1 is not the model's public row"):
        extract_package(tuned, "owner1", tmp_path / "y")
    assert not (tmp_path / "y" / "owner1.flexpert").exists()
    out = extract_package(merged, "owner1", tmp_path / "p")
    with pytest.raises(CheckpointError, match="overwrite"):
        extract_package(merged, "owner1", out)
    extract_package(merged, "owner1", out, overwrite=True)


def test_package_command(tmp_path, tok_path, capsys):
    anchor, merged, _, _ = _flexkern_merged(tmp_path, tok_path)
    out = tmp_path / "owner1.flexpert"
    assert main(["package", "--model", str(merged), "--expert", "owner1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and load_package(out)[1]["name"] == "owner1"
    refused = [
        (["--model", str(anchor), "--expert", "owner1"], "dense model"),
        (["--model", str(merged), "--expert", "public"], "public expert"),
        (["--model", str(merged), "--expert", "nope"], "no such expert"),
        (["--model", str(merged), "--expert", "owner1", "--name", "bad name"], "invalid expert name"),
        (["--model", str(tmp_path / "missing"), "--expert", "owner1"], "does not exist"),
    ]
    for args, match in refused:
        assert main(["package", *args, "--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err
        assert match in err and err.startswith("flexkern: error:") and err.count("\n") == 1
    assert main(["package", "--model", str(merged), "--expert", "owner1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["package", "--model", str(merged), "--expert", "owner1", "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "owner1.flexpert").is_dir() and (mine / "notes.txt").read_text() == "keep"  # put inside
    assert main(["package", "--model", str(merged), "--expert", "owner1", "--out", str(out), "--overwrite"]) == 0
    assert main(["merge", "--anchor", str(anchor), "--packages", str(out), str(tmp_path / "owner2.flexpert"),
                 "--out", str(tmp_path / "m")]) == 2  # owner2's package does not exist yet
    assert main(["package", "--model", str(merged), "--expert", "owner2", "--out", str(tmp_path)]) == 0
    assert main(["merge", "--anchor", str(anchor), "--packages", str(out), str(tmp_path / "owner2.flexpert"),
                 "--out", str(tmp_path / "m")]) == 0
