"""Evaluation, baselines (soup, BTM, sub-models), router tuning, report and CLI on a micro model."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flexkern.flexolmo.baselines import BTMEnsemble, btm_weights, expert_submodel, model_soup
from flexkern.flexolmo.evaluate import average_loss, domain_losses, perplexities, stream_windows
from flexkern.flexolmo.model import PRESETS, FlexOlmoLM, lm_loss
from flexkern.flexolmo.report import write_report
from flexkern.flexolmo.router_tuning import tune_router

CFG = PRESETS["micro"]


def _dense(seed=None, dtype=torch.float32):
    torch.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return FlexOlmoLM(CFG).to(dtype).eval()


@torch.no_grad()
def _merged_from(dense, num_experts, top_k, copies=True):
    """A merged model sharing ``dense``'s weights; experts copy its FFN (or are random)."""
    m = FlexOlmoLM(CFG.with_experts(num_experts, top_k)).to(next(dense.parameters()).dtype).eval()
    m.load_state_dict({k: v for k, v in dense.state_dict().items() if ".ffn." not in k}, strict=False)
    for blk_d, moe in zip(dense.blocks, m.moe_layers()):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(blk_d.ffn, name).weight
            src = w.expand_as(getattr(moe.experts, name)) if copies else torch.randn_like(getattr(moe.experts, name)) * 0.05
            getattr(moe.experts, name).copy_(src)
        moe.router.weight.normal_(0, 0.5)
        moe.router.bias.uniform_(-1, 0)
    return m


def _ids(B=3, S=CFG.seq_len):
    return torch.randint(0, CFG.vocab_size, (B, S))


def _assert_close_rel(out32, ref64, torch32):
    """err(out vs fp64 ref) <= 2 * err(plain fp32 torch vs fp64 ref) + floor."""
    err = (out32.double() - ref64).abs().max().item()
    base = (torch32.double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-5, (err, base)


def test_stream_windows_cover_every_target_once():
    s = torch.arange(100)
    w = stream_windows(s, 9)
    assert w.shape == (11, 10)
    targets = w[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, 100))
    assert stream_windows(s, 9, max_tokens=30).shape == (3, 10)
    with pytest.raises(ValueError):
        stream_windows(torch.arange(5), 9)


def test_domain_losses_match_lm_loss():
    model = _dense()
    streams = {"a": torch.randint(0, CFG.vocab_size, (300,)), "b": torch.randint(0, CFG.vocab_size, (200,))}
    got = domain_losses(model, streams, CFG.seq_len, max_tokens=150, batch_size=2)
    for name, s in streams.items():
        w = stream_windows(s, CFG.seq_len, 150)
        with torch.no_grad():
            ref = lm_loss(model, w).item()
        assert math.isclose(got[name], ref, rel_tol=1e-5)
    assert math.isclose(average_loss(got), (got["a"] + got["b"]) / 2)
    assert math.isclose(perplexities(got)["a"], math.exp(got["a"]))


def test_btm_weights_sum_to_one_and_follow_prefix_likelihood():
    M, B, S, V = 3, 2, 7, 11
    logp = F.log_softmax(torch.randn(M, B, S, V), dim=-1)
    ids = torch.randint(0, V, (B, S))
    w = btm_weights(logp, ids)
    assert w.shape == (M, B, S)
    torch.testing.assert_close(w.sum(0), torch.ones(B, S))
    torch.testing.assert_close(w[:, :, 0], torch.full((M, B), 1 / M))  # no context yet: uniform
    tok = logp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(M, B, S - 1, 1))[..., 0]
    t = 4  # context ids[:, :5] -> log-likelihood of ids[1..4]
    torch.testing.assert_close(w[:, :, t], torch.softmax(tok[:, :, :t].sum(-1), dim=0))


def test_btm_of_identical_models_equals_the_model():
    model = _dense()
    ids = _ids()
    with torch.no_grad():
        ref = F.log_softmax(model(ids).float(), -1)
        got = BTMEnsemble([model, model, model])(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_btm_follows_the_better_member():
    good, bad = _dense(), _dense()
    with torch.no_grad():
        bad.lm_head.weight.mul_(0).add_(torch.randn_like(bad.lm_head.weight) * 3)  # a confidently wrong model
        ids = _ids(2)
        ens = BTMEnsemble([good, bad])(ids[:, :-1])
        loss = lambda lp: F.nll_loss(lp.flatten(0, 1), ids[:, 1:].flatten()).item()
        lg = loss(F.log_softmax(good(ids[:, :-1]), -1))
        lb = loss(F.log_softmax(bad(ids[:, :-1]), -1))
    assert lb > lg
    assert loss(ens) < lg + 0.5 * (lb - lg)


def test_soup_of_identical_experts_equals_dense_model():
    dense = _dense()
    merged = _merged_from(dense, 4, 2)
    ids = _ids()
    dense64 = _dense().double()
    dense64.load_state_dict(dense.state_dict())
    with torch.no_grad():
        ref64, plain32 = dense64(ids), dense(ids)
        for mode in ("owners", "dense"):
            _assert_close_rel(model_soup(merged, mode)(ids), ref64, plain32)
        # one expert kept, top-1: exactly the dense FFN path
        _assert_close_rel(expert_submodel(merged, [0])(ids), ref64, plain32)


def test_expert_submodel_equals_masked_merged_model():
    dense = _dense()
    merged = _merged_from(dense, 4, 2, copies=False)
    ids = _ids()
    with torch.no_grad():
        sub = expert_submodel(merged, [0, 2, 3], top_k=2)(ids)
        merged.set_expert_mask(torch.tensor([True, False, True, True]))
        masked = merged(ids)
    torch.testing.assert_close(sub, masked, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        expert_submodel(merged, [0, 0])


def test_soup_averages_owner_experts():
    merged = _merged_from(_dense(), 3, 2, copies=False)
    soup = model_soup(merged, "owners")
    for src, dst in zip(merged.moe_layers(), soup.moe_layers()):
        torch.testing.assert_close(dst.experts.up_proj[0], src.experts.up_proj[0])
        torch.testing.assert_close(dst.experts.up_proj[1], src.experts.up_proj[1:].mean(0))
        torch.testing.assert_close(dst.router.weight[1], src.router.weight[1:].mean(0))
    with pytest.raises(ValueError):
        model_soup(merged, "nope")


def test_tune_router_changes_only_router_tensors():
    merged = _merged_from(_dense(), 3, 1, copies=False)
    for m in merged.moe_layers():
        m.expert_frozen[0] = True
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    streams = {"p": torch.randint(0, CFG.vocab_size, (500,)), "q": torch.randint(0, CFG.vocab_size, (400,))}
    losses = tune_router(merged, streams, steps=3, batch_size=2, lr=1e-2, progress=False)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = merged.state_dict()
    for k, v in before.items():
        if ".router.weight" in k:
            assert not torch.equal(v, after[k]), k
        elif ".router.bias" not in k:
            assert torch.equal(v, after[k]), k
    assert merged.moe_layers()[0].top_k == 1 and bool(merged.moe_layers()[0].expert_frozen[0])


def test_report_renders(tmp_path):
    doms = ["code", "legal", "math"]
    results = {
        "domains": doms,
        "models": {"public": dict(zip(doms, [3.0, 3.1, 3.2])), "merged": dict(zip(doms, [2.5, 2.6, 2.7]))},
        "opt_out": {"code": dict(zip(doms, [2.9, 2.6, 2.7]))},
        "opt_out_base": "merged",
        "owner_domain": {"code": "code"},
        "timings": {"anchor": 1.0},
        "notes": ["a note"],
    }
    md = write_report(results, tmp_path)
    text = md.read_text()
    assert "| merged | 2.500 | 2.600 | 2.700 | **2.600** |" in text and "Opt-out" in text
    for f in ("losses.png", "opt_out.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    with pytest.raises(ValueError):
        write_report({"domains": doms, "models": {"x": {"code": 1.0}}}, tmp_path)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "flexkern.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("demo", "anchor", "train-expert", "merge", "evaluate", "opt-out", "opt-in", "tune-router"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "flexkern.cli", "evaluate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--opt-out" in out.stdout


def test_member_and_btm_losses_match_separate_evaluation():
    from flexkern.flexolmo.baselines import member_and_btm_losses
    from flexkern.flexolmo.evaluate import stream_loss
    a, b = _dense(), _dense()
    stream = torch.randint(0, CFG.vocab_size, (200,))
    per, btm = member_and_btm_losses({"a": a, "b": b}, stream, CFG.seq_len, max_tokens=96)
    assert math.isclose(per["a"], stream_loss(a, stream, CFG.seq_len, 96), rel_tol=1e-5)
    assert math.isclose(per["b"], stream_loss(b, stream, CFG.seq_len, 96), rel_tol=1e-5)
    assert math.isclose(btm, stream_loss(BTMEnsemble([a, b]), stream, CFG.seq_len, 96), rel_tol=1e-5)
