"""`flexkern export-hf` and `flexkern import-hf`: thin commands over flexkern.flexolmo.hf."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from flexkern.cli import main  # noqa: E402
from flexkern.flexolmo.checkpoint import write_model_dir  # noqa: E402
from flexkern.flexolmo.merge import load_model  # noqa: E402
from flexkern.flexolmo.model import FlexOlmoLM, ModelConfig, anchor_fingerprint  # noqa: E402
from flexkern.flexolmo.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402


@pytest.fixture
def merged(tmp_path):
    tok = train_tokenizer([f"def f{i}(x): return x + {i}  # fox" for i in range(40)], vocab_size=280)
    tok_path = save_tokenizer(tok, tmp_path / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_layers=1, n_heads=2, d_ff=24, seq_len=16,
                      num_experts=3, top_k=2)
    model = FlexOlmoLM(cfg)
    names = ["public", "code", "law"]
    info = {"experts": names, "anchor_fingerprint": anchor_fingerprint(model), "packages": {}}
    return write_model_dir(tmp_path / "merged", model, tok_path, torch.randn(16), "test", info), model


def test_export_import_commands(tmp_path, merged, capsys):
    d, model = merged
    assert main(["export-hf", "--model", str(d), "--out", str(tmp_path / "hf"), "--opt-out", "law"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((tmp_path / "hf" / "flexkern.json").read_text())
    assert info["experts"] == ["public", "code"] and info["removed"] == ["law"]
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, names = load_model(tmp_path / "back")
    assert names == ["public", "code"] and back.config.num_experts == 2
    # existing outputs: refused before any work, replaced with --overwrite
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--overwrite",
                 "--names", "public", "math"]) == 0
    assert load_model(tmp_path / "back")[1] == ["public", "math"]


def test_export_router_bias(tmp_path, merged, capsys):
    d, model = merged
    with torch.no_grad():
        model.blocks[0].ffn.router.bias[1] = -0.5
    d = write_model_dir(tmp_path / "biased", model, tmp_path / "tokenizer.json", torch.randn(16), "test",
                        json.loads((d / "experts.json").read_text()))
    assert main(["export-hf", "--model", str(d), "--out", str(tmp_path / "hf")]) == 1
    assert "--drop-router-bias" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.txt").write_text(f"def f{i}(x): return x + {i}  # the fox\n" * 3)
    assert main(["export-hf", "--model", str(d), "--out", str(tmp_path / "hf"), "--drop-router-bias",
                 "--bias-cost", str(src), "--eval-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "without" in out and str(src) in out


def test_argument_refusals(tmp_path, merged, capsys):
    d, _ = merged
    assert main(["export-hf", "--model", str(d), "--out", str(tmp_path / "hf"), "--opt-out", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export-hf", "--model", str(d), "--out", str(tmp_path / "hf"), "--opt-out", "public"]) == 2
    assert main(["import-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["import-hf", str(d), "--out", str(tmp_path / "x")]) == 2  # a flexkern dir, not transformers'
    assert "flex_olmo" in capsys.readouterr().err
