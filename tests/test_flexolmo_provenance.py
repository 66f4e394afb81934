"""Per-token attribution and generation (with opt-out) on a micro model."""
import pytest
import torch

from flexkern.flexolmo.attribution import attribute, routing_weights, expert_outputs, write_heatmap, write_html
from flexkern.flexolmo.generate import generate_ids
from flexkern.flexolmo.model import PRESETS, FlexOlmoLM

CFG = PRESETS["micro"]


@torch.no_grad()
def _merged(E=4, k=2):
    torch.manual_seed(torch.seed() % 2**31)
    m = FlexOlmoLM(CFG.with_experts(E, k)).eval()
    for moe in m.moe_layers():
        moe.router.weight.normal_(0, 1.0)
        moe.router.bias.uniform_(-0.5, 0)
        for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            p.normal_(0, 0.2)
    return m


def test_routing_weights_reproduce_the_layer_output():
    model = _merged()
    moe = model.moe_layers()[0]
    x = torch.randn(10, CFG.d_model)
    w = routing_weights(moe, x)
    assert ((w > 0).sum(-1) == moe.top_k).all()
    y = sum(w[:, e:e + 1] * o for e, o in expert_outputs(moe, x, range(moe.num_experts)).items())
    torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-4)


def test_shares_sum_to_one_per_token_and_opt_out_is_zero(tmp_path):
    model = _merged()
    ids = torch.randint(0, CFG.vocab_size, (CFG.seq_len,))
    sh = attribute(model, ids)
    assert sh.shape == (CFG.seq_len, 4) and (sh >= 0).all()
    torch.testing.assert_close(sh.sum(-1), torch.ones(CFG.seq_len))
    assert (sh[:, 2] > 0).any()
    model.set_expert_mask(torch.tensor([True, True, False, True]))
    sh2 = attribute(model, ids)
    assert torch.equal(sh2[:, 2], torch.zeros(CFG.seq_len))
    torch.testing.assert_close(sh2.sum(-1), torch.ones(CFG.seq_len))
    toks = [f"t{i}" for i in range(CFG.seq_len)]
    names = ["public", "a", "b", "c"]
    assert "a 0." in write_html(toks, sh, names, tmp_path / "x.html").read_text()
    assert write_heatmap(toks, sh, names, tmp_path / "x.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        attribute(FlexOlmoLM(CFG), ids)


def test_generation_with_opt_out_equals_the_model_without_the_expert():
    model = _merged()
    prompt = torch.randint(0, CFG.vocab_size, (5,)).tolist()
    full = generate_ids(model, prompt, 12)
    assert full[:5] == prompt and len(full) == 17
    assert generate_ids(model, prompt, 12) == full  # greedy is deterministic
    model.set_expert_mask(torch.tensor([True, False, True, True]))
    masked = generate_ids(model, prompt, 12)
    removed = _merged()
    removed.load_state_dict(model.state_dict())
    for m in removed.moe_layers():
        m.remove_expert(1)
    assert generate_ids(removed, prompt, 12) == masked
    s1 = generate_ids(model, prompt, 12, method="top-p", top_p=0.8, seed=3)
    assert s1 == generate_ids(model, prompt, 12, method="top-p", top_p=0.8, seed=3)
    with pytest.raises(ValueError):
        generate_ids(model, prompt, 3, method="beam")


def _model_dir(tmp_path):
    import random
    from flexkern.flexolmo.checkpoint import write_model_dir
    from flexkern.flexolmo.tokenizer import save_tokenizer, train_tokenizer
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "law", "verse", "sum", "integral"]
    texts = [" ".join(rng.choice(words) + rng.choice(["", "s", "ed", "ing"]) for _ in range(200)) for _ in range(20)]
    save_tokenizer(train_tokenizer(texts, vocab_size=CFG.vocab_size), tmp_path / "tok.json")
    model = _merged()
    write_model_dir(tmp_path / "m", model, tmp_path / "tok.json", torch.full((CFG.d_model,), 0.1), "anchor",
                    {"experts": ["public", "a", "b", "c"]})
    return tmp_path / "m", model


def test_attribute_and_generate_on_a_model_directory(tmp_path):
    from flexkern.flexolmo.attribution import attribute_dir
    from flexkern.flexolmo.generate import generate_dir
    path, _ = _model_dir(tmp_path)
    text = "alpha betas gamma delta return law verse integral sum " * 3
    res = attribute_dir(path, text, tmp_path / "att")
    assert (tmp_path / "att.html").is_file() and (tmp_path / "att.png").is_file()
    assert all(abs(sum(s) - 1) < 1e-5 for s in res["shares"])
    out = attribute_dir(path, text, tmp_path / "att2", opt_out=["b"])
    assert all(s[2] == 0 for s in out["shares"]) and out["mean_share"]["b"] == 0
    g1 = generate_dir(path, "alpha beta", max_new_tokens=8, opt_out=["a"])
    assert isinstance(g1, str) and g1 == generate_dir(path, "alpha beta", max_new_tokens=8, opt_out=["a"])
    with pytest.raises(ValueError):
        generate_dir(path, "alpha", opt_out=["nobody"])


def test_attribute_and_generate_commands(tmp_path):
    import subprocess
    import sys
    path, _ = _model_dir(tmp_path)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flexkern.cli", *map(str, args)], capture_output=True, text=True)
    p = cli("attribute", "--model", path, "--text", "alpha betas gamma delta law", "--out", tmp_path / "a",
            "--opt-out", "b")
    assert p.returncode == 0, p.stderr
    assert "b 0.00" in p.stdout and (tmp_path / "a.html").is_file() and (tmp_path / "a.png").is_file()
    g = cli("generate", "--model", path, "--prompt", "alpha beta", "--max-new-tokens", "5", "--opt-out", "a")
    assert g.returncode == 0 and g.stdout.startswith("alpha beta"), g.stderr
    bad = cli("generate", "--model", path, "--prompt", "x", "--opt-out", "nobody")
    assert bad.returncode == 2 and "nobody" in bad.stderr
