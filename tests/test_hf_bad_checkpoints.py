"""Bad transformers checkpoints get clear errors (HFFormatError, a CheckpointError) naming the file and
the field or tensor, and nothing is written: wrong names, shapes and dtypes, NaN / inf, sizes beyond
flexkern's bounds (refused from config.json alone), and shard indexes that point outside the folder
or at missing files."""
import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers", minversion="5.0")

from flexkern.cli import main  # noqa: E402
from flexkern.flexolmo import hf  # noqa: E402
from flexkern.flexolmo.checkpoint import CheckpointError  # noqa: E402
from hf_tiny import flexolmo, make_tokenizer, olmo2, safetensors_of, save_with_tokenizer  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def ckpt(tmp_path, tok_path):
    save_with_tokenizer(flexolmo(tok_path, kv_heads=2), tmp_path / "hf", tok_path)
    return tmp_path / "hf"


@pytest.fixture
def sharded(tmp_path, tok_path):
    save_with_tokenizer(flexolmo(tok_path, kv_heads=2), tmp_path / "hf", tok_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="30KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    assert (folder / hf.INDEX_FILE).is_file() and len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def _rewrite(folder, edit):
    """Apply ``edit`` to the tensors of a single-file checkpoint and save them back."""
    t = safetensors_of(folder)
    edit(t)
    save_file(t, str(folder / hf.WEIGHTS_FILE), metadata={"format": "pt"})


def _refused(folder, out, match, error=hf.HFFormatError):
    with pytest.raises(error, match=match) as exc:
        hf.import_hf(folder, out)
    assert str(folder) in str(exc.value) and "\n" not in str(exc.value)  # names the checkpoint, one line
    assert not out.exists()


def _index(folder):
    return json.loads((folder / hf.INDEX_FILE).read_text())


def _write_index(folder, index):
    (folder / hf.INDEX_FILE).write_text(json.dumps(index))


def test_the_good_ones_import(ckpt, sharded, tmp_path):
    a, _, _ = hf.load_hf(ckpt)
    b, _, _ = hf.load_hf(sharded)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert issubclass(hf.HFFormatError, CheckpointError)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"model.layers.0.self_attn.query.weight": t.pop(Q0)}), f"tensor '{Q0}' is missing"),
    (lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": torch.zeros(3)}), "no place for: .*shared_expert"),
    (lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 32)}),
     r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \(32, 32\), the config needs \(16, 32\)"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)}),
     "tensor 'model.norm.weight' is stored as I64"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.float64)}), "stored as F64"),
])
def test_names_shapes_dtypes(ckpt, tmp_path, edit, match):
    _rewrite(ckpt, edit)
    _refused(ckpt, tmp_path / "fk", match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_name_the_file_and_tensor(ckpt, sharded, tmp_path, bad):
    def poison(t):
        t[Q0][1, 2] = bad

    _rewrite(ckpt, poison)
    _refused(ckpt, tmp_path / "fk", f"{ckpt / hf.WEIGHTS_FILE}: tensor '{Q0}' holds NaN or infinite values")
    # in a shard: the shard is named
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    shard = sharded / _index(sharded)["weight_map"][name]
    t = safetensors_of_file(shard)
    t[name][0, 0] = bad
    save_file(t, str(shard), metadata={"format": "pt"})
    _refused(sharded, tmp_path / "fk2", f"{shard}: tensor '{name}' holds NaN")


def safetensors_of_file(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("change, match", [
    (dict(vocab_size=1 << 40), r"vocab_size must be an int in \[1, 2097152\]"),
    (dict(hidden_size=1 << 15, num_attention_heads=128, num_key_value_heads=128, num_hidden_layers=1000),
     "parameters, more than"),
    (dict(intermediate_size=-5), "d_ff must be an int"),
    (dict(num_experts=10 ** 6), "num_experts must be an int"),
    (dict(max_position_embeddings=1 << 40), "seq_len must be an int"),
    (dict(num_hidden_layers="32"), "n_layers must be an int"),
    (dict(rms_norm_eps="1e-6"), "norm_eps must be a number"),
    (dict(num_key_value_heads=3), "n_kv_heads=3 must divide n_heads=4"),
])
def test_sizes_beyond_the_bounds_are_refused_from_config_alone(ckpt, tmp_path, change, match):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    (ckpt / hf.WEIGHTS_FILE).unlink()  # never read: the config is refused first
    _refused(ckpt, tmp_path / "fk", f"{ckpt / 'config.json'}: sizes flexkern cannot build: .*{match}")
    assert main(["import-hf", str(ckpt), "--out", str(tmp_path / "fk")]) == 2  # the command refuses up front


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE", "sub/model.safetensors", ".."])
def test_shard_index_pointing_outside_the_folder(sharded, tmp_path, where):
    outside = tmp_path / "outside.safetensors"  # a valid file there: it must still never be read
    save_file({Q0: torch.zeros(32, 32)}, str(outside))
    where = str(outside) if where == "ABSOLUTE" else where
    index = _index(sharded)
    index["weight_map"][Q0] = where
    _write_index(sharded, index)
    _refused(sharded, tmp_path / "fk", rf"{sharded / hf.INDEX_FILE}: field 'weight_map.{Q0}' names .*"
                                       "a path outside the checkpoint folder")


def test_shard_index_problems(sharded, tmp_path):
    index = _index(sharded)
    shard = index["weight_map"][Q0]
    (sharded / shard).rename(tmp_path / "moved.safetensors")
    _refused(sharded, tmp_path / "fk", rf"field 'weight_map' names the shard '{shard}' .*which is missing from")
    (tmp_path / "moved.safetensors").rename(sharded / shard)
    other = next(v for v in index["weight_map"].values() if v != shard)
    index["weight_map"][Q0] = other  # the index places it in a shard that does not hold it
    _write_index(sharded, index)
    _refused(sharded, tmp_path / "fk", f"{sharded / hf.INDEX_FILE} does not match")
    _write_index(sharded, {"weight_map": ["not", "a", "map"]})
    _refused(sharded, tmp_path / "fk", "field 'weight_map' must be an object")
    (sharded / hf.INDEX_FILE).write_text("{not json")
    _refused(sharded, tmp_path / "fk", "is not valid JSON", CheckpointError)


def test_corrupt_or_missing_weights(ckpt, tmp_path):
    data = (ckpt / hf.WEIGHTS_FILE).read_bytes()
    (ckpt / hf.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _refused(ckpt, tmp_path / "fk", f"cannot read {ckpt / hf.WEIGHTS_FILE}")
    (ckpt / hf.WEIGHTS_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    _refused(ckpt, tmp_path / "fk", r"no model.safetensors .*convert them to safetensors")


def test_olmo2_names_and_gqa_shapes(tmp_path, tok_path):
    save_with_tokenizer(olmo2(tok_path, kv_heads=1), tmp_path / "hf", tok_path)
    row = tmp_path / "row"
    hf.import_hf(tmp_path / "hf", row, public=[_docs_folder(tmp_path)])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    with pytest.raises(hf.HFFormatError, match=r"layers.0.self_attn.k_proj.weight' has shape \(8, 32\), the config needs \(16, 32\)"):
        hf.import_hf(tmp_path / "hf", tmp_path / "a", public_row_from=row)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    _rewrite(tmp_path / "hf", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(hf.HFFormatError, match="'model.layers.1.mlp.down_proj.weight' is missing"):
        hf.import_hf(tmp_path / "hf", tmp_path / "a", public_row_from=row)
    assert not (tmp_path / "a").exists()


def _docs_folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"the river {i} ran north of the city, and the king saw it. " * 4)
    return folder
