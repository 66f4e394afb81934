"""FlexOlmo pipeline on the micro preset with tiny synthetic text: owner training, packages,
merge, opt-out / opt-in, resume after an interruption, and torchrun with 2 processes on gloo."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flexkern.flexolmo.checkpoint import CheckpointError, read_public_embedding, write_model_dir
from flexkern.flexolmo.merge import (MergeError, load_model, mask_experts, merge, opt_in, opt_out)
from flexkern.flexolmo.model import FlexOlmoLM, anchor_fingerprint, shared_state_dict
from flexkern.flexolmo.package import PackageError, load_package, save_package
from flexkern.flexolmo.train import train_anchor, train_expert
from synthetic import synthetic_docs as _docs

REPO = Path(__file__).resolve().parents[1]



PUBLIC = _docs("the a of and to in is was he she it they river city king war year people north", 120, 0)
CODE = _docs("def return import class self if else for while print lambda yield None True x", 60, 1)
LAW = _docs("court shall party agreement law section herein pursuant license warranty liability", 60, 2)
EXPERT = dict(steps=6, batch_size=4, log=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flexolmo")
    anchor = train_anchor(root / "anchor", preset="micro", data=[PUBLIC], steps=12, batch_size=8,
                          embed_method="anchor", log=False)
    seen = {}
    code = train_expert(anchor, CODE, root / "packages", name="code", callback=lambda s, l, m: seen.update(model=m),
                        **EXPERT)
    law = train_expert(anchor, LAW, root / "packages", name="law", **EXPERT)
    return SimpleNamespace(root=root, anchor=anchor, code=code, law=law, code_model=seen["model"].eval())


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (3, model.config.seq_len), generator=g)
    with torch.no_grad():
        return model(ids)


def test_package_round_trip_and_corruption(world, tmp_path):
    tensors, manifest = load_package(world.code)
    assert world.code.name == "code.flexpert" and manifest["name"] == "code"
    assert manifest["tokens_seen"] == 6 * 4 * 32 and manifest["embed_method"] == "anchor"
    copy = save_package(tmp_path / "copy.flexpert", tensors, manifest)
    tensors2, manifest2 = load_package(copy)
    assert manifest2 == manifest and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    # a flipped weight no longer matches its recorded sha256
    bad = dict(tensors)
    bad["layers.1.up_proj"] = bad["layers.1.up_proj"].clone()
    bad["layers.1.up_proj"][0, 0] += 1.0
    save_file(bad, str(copy / "expert.safetensors"))
    with pytest.raises(PackageError, match="sha256"):
        load_package(copy)
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "missing.flexpert")
    with pytest.raises(PackageError, match="shape"):
        save_package(tmp_path / "x.flexpert", {**tensors, "layers.0.router_row": torch.zeros(3)}, manifest)


def test_merge_refuses_mismatches(world, tmp_path):
    tensors, manifest = load_package(world.code)
    # an anchor whose shared weights differ in one attention weight
    anchor, _ = load_model(world.anchor)
    with torch.no_grad():
        anchor.blocks[0].attn.q_proj.weight[0, 0] += 1e-3
    row, method = read_public_embedding(world.anchor)
    other = write_model_dir(tmp_path / "other_anchor", anchor, world.anchor / "tokenizer.json", row, method)
    with pytest.raises(MergeError, match="different anchor"):
        merge(other, [world.code], tmp_path / "m0")
    renamed = save_package(tmp_path / "p" / "theta.flexpert", tensors,
                           {**manifest, "name": "theta", "config": {**manifest["config"], "rope_theta": 500.0}})
    with pytest.raises(MergeError, match="model config"):
        merge(world.anchor, [renamed], tmp_path / "m1")
    with pytest.raises(MergeError, match="duplicate expert name"):
        merge(world.anchor, [world.code, world.code], tmp_path / "m2")
    twin = save_package(tmp_path / "p" / "code2.flexpert", tensors, {**manifest, "name": "code2"})
    with pytest.raises(MergeError, match="same weights"):
        merge(world.anchor, [world.code, twin], tmp_path / "m3")
    forged = save_package(tmp_path / "p" / "forged.flexpert", tensors,
                          {**manifest, "name": "forged", "anchor_fingerprint": "0" * 64})
    with pytest.raises(MergeError, match="different anchor"):
        merge(world.anchor, [forged], tmp_path / "m4")
    assert not any((tmp_path / f"m{i}").exists() for i in range(5))


def test_merge_equals_hand_built_model(world, tmp_path):
    merged, names = load_model(merge(world.anchor, [world.code, world.law], tmp_path / "merged"))
    assert names == ["public", "code", "law"] and merged.config.num_experts == 3 and merged.config.top_k == 2
    anchor, _ = load_model(world.anchor)
    public_row, _ = read_public_embedding(world.anchor)
    pkgs = [load_package(p)[0] for p in (world.code, world.law)]
    hand = FlexOlmoLM(anchor.config.with_experts(3, 2))
    hand.load_state_dict(shared_state_dict(anchor), strict=False)
    with torch.no_grad():
        for i, (m, block) in enumerate(zip(hand.moe_layers(), anchor.blocks)):
            for part in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(m.experts, part)
                w[0] = getattr(block.ffn, part).weight
                for e, t in enumerate(pkgs, start=1):
                    w[e] = t[f"layers.{i}.{part}"]
            m.router.weight.copy_(torch.stack([public_row] + [t[f"layers.{i}.router_row"] for t in pkgs]))
            m.router.bias.copy_(torch.stack([torch.tensor(0.0)] + [t[f"layers.{i}.router_bias"] for t in pkgs]))
    hand.eval()
    assert torch.equal(_logits(merged), _logits(hand))
    merged.set_top_k(3)
    hand.set_top_k(3)
    assert torch.equal(_logits(merged), _logits(hand))
    # merging a single package gives back exactly the model its owner trained
    single, _ = load_model(merge(world.anchor, [world.code], tmp_path / "single"))
    assert torch.equal(_logits(single), _logits(world.code_model))


def test_opt_out_mask_equals_removed_checkpoint(world, tmp_path):
    path = merge(world.anchor, [world.code, world.law], tmp_path / "merged")
    full, names = load_model(path)
    out, out_names = load_model(opt_out(path, "code", tmp_path / "no_code"))
    assert out_names == ["public", "law"] and out.config.num_experts == 2
    code_row = load_package(world.code)[0]["layers.0.router_row"]
    assert not any(torch.equal(r, code_row) for r in out.moe_layers()[0].router.weight)
    before = _logits(full)
    mask = mask_experts(full, ["code"], names)
    assert mask.tolist() == [True, False, True]
    masked = _logits(full)
    torch.testing.assert_close(masked, _logits(out), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(masked, before)
    # opting back in restores the full model (experts in another order, same function)
    back, back_names = load_model(opt_in(tmp_path / "no_code", world.code, tmp_path / "back"))
    assert back_names == ["public", "law", "code"]
    torch.testing.assert_close(_logits(back), before, rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeError, match="duplicate"):
        opt_in(path, world.code, tmp_path / "twice")
    with pytest.raises(MergeError, match="no expert named"):
        opt_out(path, "math", tmp_path / "nope")


def test_owner_training_keeps_frozen_tensors_bit_identical(world):
    model, (anchor, _) = world.code_model, load_model(world.anchor)
    public_row, _ = read_public_embedding(world.anchor)
    shared, ref = shared_state_dict(model), shared_state_dict(anchor)
    assert shared.keys() == ref.keys() and all(torch.equal(shared[k], ref[k]) for k in ref)
    assert anchor_fingerprint(model) == anchor_fingerprint(anchor)
    for m, block in zip(model.moe_layers(), anchor.blocks):
        for part in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(m.experts, part)
            assert torch.equal(w[0], getattr(block.ffn, part).weight)  # public expert untouched
            assert not torch.equal(w[1], w[0])  # own expert trained
        assert torch.equal(m.router.weight[0], public_row)
        assert not torch.equal(m.router.weight[1], public_row)
        assert m.router.bias[0] == 0 and m.router.bias[1] <= 0


class _Killed(Exception):
    pass


def _raise_at(n):
    def cb(step, loss, model):
        if step == n:
            raise _Killed
    return cb


def test_resume_after_interruption_matches_uninterrupted_run(world, tmp_path):
    args = dict(name="law", checkpoint_every=2, **EXPERT)
    ref = train_expert(world.anchor, LAW, tmp_path / "ref", **args)

    with pytest.raises(_Killed):
        train_expert(world.anchor, LAW, tmp_path / "run", callback=_raise_at(5), **args)
    assert (tmp_path / "run" / "law.flexpert.ckpt" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "law.flexpert").exists()
    steps = []
    out = train_expert(world.anchor, LAW, tmp_path / "run", callback=lambda s, l, m: steps.append(s), **args)
    assert steps == [5, 6]  # continued from the checkpoint of step 4
    assert not (tmp_path / "run" / "law.flexpert.ckpt").exists()
    a, b = load_package(ref)[0], load_package(out)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_gloo(world, tmp_path):
    folder = tmp_path / "law_docs"
    folder.mkdir()
    for i, doc in enumerate(LAW):
        (folder / f"{i:03d}.txt").write_text(doc)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flexkern.cli", "train-expert", "--anchor", str(world.anchor), "--source", str(folder),
           "--out", str(tmp_path / "ddp"), "--name", "law", "--steps", "4", "--batch-size", "4", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train_expert(world.anchor, str(folder), tmp_path / "single", name="law", steps=4, batch_size=4, log=False)
    ddp_t, ddp_m = load_package(tmp_path / "ddp" / "law.flexpert")
    one_t, _ = load_package(single)
    init = load_package(world.law)[1]  # same anchor and config
    assert ddp_m["anchor_fingerprint"] == init["anchor_fingerprint"] and ddp_m["tokens_seen"] == 4 * 4 * 32
    anchor, _ = load_model(world.anchor)
    moved = (one_t["layers.0.up_proj"] - anchor.blocks[0].ffn.up_proj.weight).abs().max()
    assert moved > 1e-3  # training moved the weights far more than the tolerance below
    for k in one_t:  # the same global batches, gradients averaged over the two ranks
        torch.testing.assert_close(ddp_t[k], one_t[k], rtol=0, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_owner_training_and_merged_model_on_gpu(world, tmp_path):
    """Owner training on CUDA (fast backends) keeps the frozen tensors exact (train_expert checks
    that before writing), lands near the CPU run, and the merged model matches the CPU logits."""
    args = dict(name="law", **EXPERT)
    gpu = train_expert(world.anchor, LAW, tmp_path / "gpu", device="cuda", **args)
    cpu = train_expert(world.anchor, LAW, tmp_path / "cpu", **args)
    g, c = load_package(gpu)[0], load_package(cpu)[0]
    anchor, _ = load_model(world.anchor)
    for i, block in enumerate(anchor.blocks):
        moved = (c[f"layers.{i}.up_proj"] - block.ffn.up_proj.weight).abs().max()
        torch.testing.assert_close(g[f"layers.{i}.up_proj"], c[f"layers.{i}.up_proj"], rtol=0,
                                   atol=0.05 * float(moved))
    merged_dir = merge(world.anchor, [world.code, gpu], tmp_path / "merged")
    model, _ = load_model(merged_dir)
    model_gpu, _ = load_model(merged_dir, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (3, model.config.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(model_gpu(ids.cuda()).cpu(), model(ids), rtol=1e-4, atol=1e-4)


def test_no_coordinated_training_trains_the_ffn_alone(world, tmp_path):
    """dense_ffn: the owner's FFN replaces the dense FFN (weight exactly 1, public expert masked) and
    its router row and bias stay the initial ones; merged, it is an ordinary expert."""
    from flexkern.flexolmo.merge import dense_expert_tensors
    from flexkern.flexolmo.tokenizer import load_tokenizer
    from flexkern.flexolmo.train import _embedding, _train_docs, owner_model

    anchor, _ = load_model(world.anchor)
    public_row, _ = read_public_embedding(world.anchor)
    own = torch.randn(anchor.config.d_model)
    m = owner_model(anchor, public_row, own, dense_ffn=True)
    dense = FlexOlmoLM(anchor.config)
    dense.load_state_dict(anchor.state_dict())
    with torch.no_grad():
        for moe, block in zip(m.moe_layers(), dense.blocks):
            moe.experts.gate_proj[1].mul_(1.5)  # a different own FFN ...
            block.ffn.gate_proj.weight.mul_(1.5)  # ... equals the dense model with that FFN
    assert torch.equal(_logits(m), _logits(dense))
    seen = {}
    pkg = train_expert(world.anchor, CODE, tmp_path, name="code", dense_ffn=True,
                       callback=lambda s, l, mod: seen.update(model=mod), **EXPERT)
    tensors, manifest = load_package(pkg)
    assert manifest["training"].startswith("dense FFN alone")
    tok = load_tokenizer(world.anchor / "tokenizer.json")
    init = _embedding(_train_docs(CODE, None, 0.1), "anchor", anchor, tok, anchor.config.d_model, 256)
    ref = dense_expert_tensors(anchor, init)
    for i in range(anchor.config.n_layers):
        assert torch.equal(tensors[f"layers.{i}.router_row"], seen["model"].moe_layers()[i].router.weight[1].cpu())
        assert torch.allclose(tensors[f"layers.{i}.router_row"], ref[f"layers.{i}.router_row"], atol=1e-6)
        assert float(tensors[f"layers.{i}.router_bias"]) == 0.0
        assert not torch.equal(tensors[f"layers.{i}.gate_proj"], ref[f"layers.{i}.gate_proj"])
    merged = merge(world.anchor, [world.law, pkg], tmp_path / "m", top_k=2)
    model, names = load_model(merged)
    assert names == ["public", "law", "code"] and torch.isfinite(_logits(model)).all()


def test_extension_resume_matches_uninterrupted_run(world, tmp_path):
    """The extension's own optimizer state travels with the checkpoint: killed and resumed, the
    package is bit-identical to an uninterrupted run's."""
    from flexkern.flexolmo.tokenizer import encode_documents, load_tokenizer
    from flexkern.flexolmo.variants import PublicRouterLoss

    stream = encode_documents(load_tokenizer(world.anchor / "tokenizer.json"), PUBLIC)
    seq = load_model(world.anchor)[0].config.seq_len

    def ext():
        return PublicRouterLoss(stream, 1.0, 1e-3, 2, seq, 0)
    args = dict(name="law", checkpoint_every=2, **EXPERT)
    ref = train_expert(world.anchor, LAW, tmp_path / "ref", callback=ext(), **args)

    class KilledAt5(PublicRouterLoss):
        def __call__(self, step, loss, model):
            super().__call__(step, loss, model)
            if step == 5:
                raise _Killed
    with pytest.raises(_Killed):
        train_expert(world.anchor, LAW, tmp_path / "run", callback=KilledAt5(stream, 1.0, 1e-3, 2, seq, 0), **args)
    out = train_expert(world.anchor, LAW, tmp_path / "run", callback=ext(), **args)
    a, b = load_package(ref)[0], load_package(out)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = load_package(train_expert(world.anchor, LAW, tmp_path / "plain", **args))[0]
    assert not torch.equal(plain["layers.0.router_row"], a["layers.0.router_row"])  # the extension did act
    # a checkpoint of a plain run cannot resume an extension run (its state would be missing)
    with pytest.raises(_Killed):
        train_expert(world.anchor, LAW, tmp_path / "mixed", callback=_raise_at(5), **args)
    with pytest.raises(CheckpointError, match="no state for this run's callback"):
        train_expert(world.anchor, LAW, tmp_path / "mixed", callback=ext(), **args)


def test_balanced_extension_pushes_the_row_up_on_own_data(world, tmp_path):
    """extension-balanced adds the own-data side: on the owner's windows its margin over r_pub ends
    higher than with the one-sided extension, with the same public term and seed."""
    from flexkern.flexolmo.tokenizer import encode_documents, load_tokenizer
    from flexkern.flexolmo.variants import PublicRouterLoss

    tok = load_tokenizer(world.anchor / "tokenizer.json")
    pub, own = encode_documents(tok, PUBLIC), encode_documents(tok, LAW)
    seq = load_model(world.anchor)[0].config.seq_len
    margins = {}
    for tag, own_stream in (("one-sided", None), ("two-sided", own)):
        cb = PublicRouterLoss(pub, 5.0, 1e-2, 2, seq, 0, own_stream=own_stream)
        seen = {}

        def both(step, loss, model, cb=cb, seen=seen):
            cb(step, loss, model)
            seen["model"] = model
        train_expert(world.anchor, LAW, tmp_path / tag, name="law", callback=both, **EXPERT)
        m = seen["model"]
        hs = cb._router_inputs(m, m.moe_layers(), own, torch.Generator().manual_seed(123))
        margins[tag] = float(torch.stack([x.mean() for x in cb._margins(m.moe_layers(), hs)]).mean())
    assert margins["two-sided"] > margins["one-sided"]
    with pytest.raises(ValueError, match="own stream is too short"):
        PublicRouterLoss(pub, 1.0, 1e-3, 2, seq, 0, own_stream=own[:3])
