"""The pipeline's files under misuse (micro preset): no output path loses data, concurrent writers
are refused, an interrupted directory swap is finished by the next run, and malformed, forged or
non-finite packages and model directories are refused with PackageError / CheckpointError naming
the file and field."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flexkern.flexolmo import checkpoint
from flexkern.flexolmo.checkpoint import (ARTIFACT_FILE, CheckpointError, OutputError, OutputLockedError,
                                          artifact_kind, load_tensors, read_public_embedding, save_tensors,
                                          write_model_dir)
from flexkern.flexolmo.merge import MergeError, load_model, mask_experts, merge, opt_in, opt_out
from flexkern.flexolmo.model import tensor_sha256
from flexkern.flexolmo.package import PackageError, load_package, save_package
from flexkern.flexolmo.train import TrainingInterrupted, train_anchor, train_expert
from synthetic import synthetic_docs as _docs

REPO = Path(__file__).resolve().parents[1]



PUBLIC = _docs("the a of and to in is was he she it they river city king war year people north", 80, 0)
CODE = _docs("def return import class self if else for while print lambda yield None True x", 40, 1)
LAW = _docs("court shall party agreement law section herein pursuant license warranty liability", 40, 2)
EXPERT = dict(steps=2, batch_size=4, log=False, embed_docs=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    anchor = train_anchor(root / "anchor", preset="micro", data=[PUBLIC], steps=4, batch_size=4,
                          embed_method="anchor", log=False)
    code = train_expert(anchor, CODE, root / "packages", name="code", **EXPERT)
    law = train_expert(anchor, LAW, root / "packages", name="law", **EXPERT)
    merged = merge(anchor, [code], root / "merged")
    return SimpleNamespace(root=root, anchor=anchor, code=code, law=law, merged=merged)


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones included): files by bytes, folders and links by kind."""
    root = Path(root)
    out = {}
    if root.is_file():
        return {".": root.read_bytes()}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<link>" if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return out


def hidden_or_lock(folder: Path) -> list[str]:
    """Leftovers a finished command must not leave next to its output."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(".") or p.name.endswith(".lock") or ".stale-" in p.name)


# ---- data loss ------------------------------------------------------------------------------------------
def _writers(world, out):
    """Every writer, aimed at ``out`` (each call refuses or writes)."""
    anchor, _ = load_model(world.anchor)
    row, method = read_public_embedding(world.anchor)
    tensors, manifest = load_package(world.code)
    return {
        "merge": lambda **kw: merge(world.anchor, [world.code], out, **kw),
        "opt_out": lambda **kw: opt_out(world.merged, "code", out, **kw),
        "opt_in": lambda **kw: opt_in(world.merged, world.law, out, **kw),
        "write_model_dir": lambda **kw: write_model_dir(out, anchor, world.anchor / "tokenizer.json", row, method, **kw),
        "save_package": lambda **kw: save_package(out, tensors, manifest, **kw),
        "train_anchor": lambda **kw: train_anchor(out, preset="micro", data=[PUBLIC], steps=1, batch_size=4,
                                                  embed_method="anchor", log=False, **kw),
        "train_expert": lambda **kw: train_expert(world.anchor, CODE, out, name="code", **EXPERT, **kw),
    }


@pytest.mark.parametrize("writer", ["merge", "opt_out", "opt_in", "write_model_dir", "save_package",
                                    "train_anchor", "train_expert"])
def test_folder_of_other_files_is_never_replaced(world, tmp_path, writer):
    out = tmp_path / "mine.flexpert"  # (a package path, so train_expert writes it and not a file in it)
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = snapshot(tmp_path)
    fn = _writers(world, out)[writer]
    with pytest.raises(OutputError, match="exists and is not empty .*not a flexkern artifact"):
        fn()
    with pytest.raises(OutputError, match="not a flexkern artifact"):
        fn(overwrite=True)  # --overwrite replaces only a flexkern artifact of the same kind
    assert snapshot(tmp_path) == before


def test_out_overlapping_an_input_is_refused_before_any_work(world, tmp_path, monkeypatch):
    before = snapshot(world.root)
    called = []
    monkeypatch.setattr("flexkern.flexolmo.merge.load_model", lambda *a, **k: called.append(a))
    cases = [(world.anchor, "is the input"), (world.root, "contains the input"),
             (world.anchor / "sub", "is inside the input"), (world.code, "is the input")]
    for out, msg in cases:
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=msg):
                merge(world.anchor, [world.code], out, overwrite=overwrite)
    with pytest.raises(OutputError, match="is the input"):
        opt_out(world.merged, "code", world.merged, overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        opt_in(world.merged, world.law, world.root / "packages", overwrite=True)
    with pytest.raises(OutputError, match="input"):
        train_expert(world.anchor, CODE, world.anchor, name="code", overwrite=True, **EXPERT)
    assert not called  # refused before anything was read
    assert snapshot(world.root) == before


def test_out_on_a_package_or_another_kind_is_refused(world, tmp_path):
    other = tmp_path / "other.flexpert"
    shutil.copytree(world.law, other)
    before = snapshot(tmp_path)
    assert artifact_kind(other) == "package"
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="a flexkern package"):
            merge(world.anchor, [world.code], other, overwrite=overwrite)
    anchor_copy = tmp_path / "anchor_copy"
    shutil.copytree(world.anchor, anchor_copy)
    with pytest.raises(OutputError, match="a flexkern anchor"):
        merge(world.anchor, [world.code], anchor_copy, overwrite=True)
    with pytest.raises(OutputError, match="a flexkern merged"):
        train_anchor(world.merged, preset="micro", data=[PUBLIC], steps=1, overwrite=True, log=False)
    assert snapshot(other) == snapshot(world.law) and before
    assert snapshot(anchor_copy) == snapshot(world.anchor)


def test_out_on_a_regular_file_or_below_one(world, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"precious")
    for out in (f, f / "merged"):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="file"):
                merge(world.anchor, [world.code], out, overwrite=overwrite)
    link = tmp_path / "link"
    link.symlink_to(world.merged)
    with pytest.raises(OutputError, match="symbolic link"):
        merge(world.anchor, [world.code], link, overwrite=True)
    assert f.read_bytes() == b"precious" and link.resolve() == world.merged.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model.bin"]


def test_out_dot_is_refused_without_leaving_anything(world, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", "sub/.."):
        with pytest.raises(OutputError, match="current folder|parent folder"):
            merge(world.anchor, [world.code], out)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_existing_artifact_needs_overwrite_and_leaves_no_hidden_folder(world, tmp_path):
    out = tmp_path / "m"
    merge(world.anchor, [world.code], out, top_k=1)
    before = snapshot(out)
    with pytest.raises(OutputError, match="already holds a flexkern merged; pass --overwrite"):
        merge(world.anchor, [world.code], out, top_k=2)
    assert snapshot(out) == before
    merge(world.anchor, [world.code], out, top_k=2, overwrite=True)
    assert load_model(out)[0].config.top_k == 2
    assert json.loads((out / ARTIFACT_FILE).read_text())["kind"] == "merged"
    assert hidden_or_lock(tmp_path) == []
    # an empty folder is a fine output
    empty = tmp_path / "empty"
    empty.mkdir()
    merge(world.anchor, [world.code], empty)
    assert artifact_kind(empty) == "merged" and hidden_or_lock(tmp_path) == []


class _Killed(BaseException):
    pass


def _kill_between_renames(monkeypatch):
    real = os.rename

    def rename(src, dst):
        if str(src).endswith(".flexkern-new"):
            raise _Killed  # after the old folder moved aside, before the new one moved in
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("rerun", ["load", "merge", "opt_out"])
def test_kill_between_the_renames_is_finished_by_the_next_run(world, tmp_path, monkeypatch, rerun):
    out = tmp_path / "m"
    merge(world.anchor, [world.code], out, top_k=1)
    old = snapshot(out)
    with monkeypatch.context() as m:
        _kill_between_renames(m)
        with pytest.raises(_Killed):
            merge(world.anchor, [world.code], out, top_k=2, overwrite=True)
    assert not out.exists()  # the state a kill leaves: old and new both hidden
    assert sorted(hidden_or_lock(tmp_path)) == [".m.flexkern-new", ".m.flexkern-old"]
    if rerun == "load":  # a reader finishes the swap
        model, _ = load_model(out)
        assert model.config.top_k == 2
    elif rerun == "merge":  # the same command again: finished, then refused without --overwrite
        with pytest.raises(OutputError, match="--overwrite"):
            merge(world.anchor, [world.code], out, top_k=1)
        assert load_model(out)[0].config.top_k == 2
    else:  # another command reading it as its input
        opt_out(out, "code", tmp_path / "no_code")
        assert load_model(out)[0].config.top_k == 2
    assert snapshot(out) != old and hidden_or_lock(tmp_path) == []


def test_folder_made_at_the_path_after_a_kill_is_kept(world, tmp_path, monkeypatch):
    out = tmp_path / "m"
    merge(world.anchor, [world.code], out, top_k=1)
    with monkeypatch.context() as m:
        _kill_between_renames(m)
        with pytest.raises(_Killed):
            merge(world.anchor, [world.code], out, top_k=2, overwrite=True)
    out.mkdir()
    (out / "mine.txt").write_text("made after the kill")
    before = snapshot(out)
    with pytest.raises(OutputError, match="not a flexkern artifact"):
        merge(world.anchor, [world.code], out, overwrite=True)
    assert snapshot(out) == before and hidden_or_lock(tmp_path) == []


def test_incomplete_build_and_orphaned_old_are_rolled_back(world, tmp_path, monkeypatch):
    out = tmp_path / "m"
    merge(world.anchor, [world.code], out, top_k=1)
    before = snapshot(out)

    def fail(*a, **k):
        raise _Killed
    with monkeypatch.context() as m:  # killed while the new folder was being written
        m.setattr(checkpoint, "save_tensors", fail)
        with pytest.raises(_Killed):
            merge(world.anchor, [world.code], out, top_k=2, overwrite=True)
    assert snapshot(out) == before and hidden_or_lock(tmp_path) == []
    # what a real kill during the build leaves (the temp folder), and an old folder whose new
    # version is gone: the next run deletes the first and restores the second
    (tmp_path / ".m.flexkern-tmp").mkdir()
    (tmp_path / ".m.flexkern-tmp" / "model.safetensors").write_bytes(b"half")
    os.rename(out, tmp_path / ".m.flexkern-old")
    model, _ = load_model(out)
    assert model.config.top_k == 1 and snapshot(out) == before and hidden_or_lock(tmp_path) == []


def test_hidden_old_folder_of_an_earlier_version_is_restored(world, tmp_path):
    """Earlier flexkern swaps moved the old version to .NAME.XXXX.old/x; a kill there lost NAME."""
    out = tmp_path / "m"
    merge(world.anchor, [world.code], out)
    before = snapshot(out)
    (tmp_path / ".m.abc123.old").mkdir()
    os.rename(out, tmp_path / ".m.abc123.old" / "x")
    load_model(out)
    assert snapshot(out) == before and hidden_or_lock(tmp_path) == []
    (tmp_path / ".m.def456.old").mkdir()  # a completed replacement whose old copy stayed behind
    shutil.copytree(out, tmp_path / ".m.def456.old" / "x")
    merge(world.anchor, [world.code], out, overwrite=True)
    assert hidden_or_lock(tmp_path) == []


# ---- concurrent writers ------------------------------------------------------------------------------------
_HOLD = """
import sys, time
from flexkern.flexolmo.checkpoint import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_lock_held_by_another_process_refuses_then_stale_lock_is_taken_over(world, tmp_path, capfd):
    out = tmp_path / "pkgs" / "code.flexpert"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"process {holder.pid} on {socket.gethostname()}"):
            train_expert(world.anchor, CODE, out, name="code", **EXPERT)
        assert not out.exists() and not (tmp_path / "pkgs" / "code.flexpert.ckpt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock, as after kill -9
        holder.wait()
    assert (tmp_path / "pkgs" / "code.flexpert.lock").exists()
    capfd.readouterr()
    train_expert(world.anchor, CODE, out, name="code", **EXPERT)
    err = capfd.readouterr().err
    assert "took over the stale lock" in err and f"of process {holder.pid} " in err
    load_package(out)
    assert hidden_or_lock(tmp_path / "pkgs") == []


def test_foreign_or_remote_lock_is_not_removed(world, tmp_path):
    out = tmp_path / "m"
    lock = tmp_path / "m.lock"
    lock.write_text("not a lock of ours\n")
    with pytest.raises(OutputLockedError, match="not a flexkern lock"):
        merge(world.anchor, [world.code], out)
    assert lock.read_text() == "not a lock of ours\n"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(OutputLockedError, match="elsewhere.example.*delete the lock"):
        merge(world.anchor, [world.code], out)
    assert not out.exists()


_TRAIN = """
import sys
from flexkern.flexolmo.checkpoint import OutputError
from flexkern.flexolmo.train import train_expert
docs = [" ".join(["court shall party law section"] * 12) + f" {i}." for i in range(40)]
try:
    train_expert(sys.argv[1], docs, sys.argv[2], name="law", steps=int(sys.argv[3]), batch_size=4, log=False)
    print("WROTE")
except OutputError as exc:
    print("REFUSED", exc)
"""


def test_two_train_expert_runs_to_one_package(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pkgs"
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN, str(world.anchor), str(out), "10"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    lines = sorted(r[0].strip().splitlines()[-1] if r[0].strip() else r[1][-500:] for r in results)
    assert lines[1] == "WROTE" and lines[0].startswith("REFUSED"), lines
    assert "being written by another run" in lines[0] or "already holds a flexkern package" in lines[0]
    load_package(out / "law.flexpert")
    assert sorted(p.name for p in out.iterdir()) == ["law.flexpert"]


# ---- packages: values, dtypes, bounds, structure ---------------------------------------------------------
def _rewrite(pkg: Path, tensors: dict, manifest: dict | None = None, rehash: bool = True) -> None:
    """Replace a package's tensors (and manifest) by hand, with the sha256 table recomputed."""
    manifest = json.loads((pkg / "manifest.json").read_text()) if manifest is None else manifest
    save_file(tensors, str(pkg / "expert.safetensors"))
    if rehash and isinstance(manifest.get("tensors"), dict):
        for k, t in tensors.items():
            if isinstance(manifest["tensors"].get(k), dict):
                manifest["tensors"][k]["sha256"] = tensor_sha256(t)
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def _copy_pkg(world, tmp_path, name="p.flexpert") -> Path:
    dst = tmp_path / name
    shutil.copytree(world.code, dst)
    return dst


@pytest.mark.parametrize("part", ["router_row", "router_bias", "down_proj"])
def test_non_finite_package_is_refused(world, tmp_path, part):
    pkg = _copy_pkg(world, tmp_path)
    tensors, manifest = load_package(pkg)
    bad = {k: v.clone() for k, v in tensors.items()}
    bad[f"layers.1.{part}"].view(-1)[0] = float("nan") if part != "down_proj" else float("inf")
    with pytest.raises(PackageError, match=f"layers.1.{part}.*NaN or infinite"):
        save_package(tmp_path / "n.flexpert", bad, manifest)
    _rewrite(pkg, bad)  # hashes fine: only the finite check can catch it
    with pytest.raises(PackageError, match=f"expert.safetensors.*layers.1.{part}.*NaN"):
        load_package(pkg)
    with pytest.raises(MergeError, match="NaN"):
        merge(world.anchor, [pkg], tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "n.flexpert").exists()


def test_dtype_other_than_the_manifest_is_refused_not_cast(world, tmp_path):
    pkg = _copy_pkg(world, tmp_path)
    tensors, _ = load_package(pkg)
    _rewrite(pkg, {k: v.to(torch.bfloat16) if k == "layers.0.up_proj" else v for k, v in tensors.items()})
    with pytest.raises(PackageError, match="layers.0.up_proj.*BF16.*float32.*not cast"):
        load_package(pkg)
    _rewrite(pkg, {k: v.double() for k, v in tensors.items()})
    with pytest.raises(PackageError, match="F64"):
        load_package(pkg)
    manifest = json.loads((world.code / "manifest.json").read_text())
    manifest["tensors"]["layers.0.up_proj"]["dtype"] = "float64"
    _rewrite(pkg, dict(tensors), manifest)
    with pytest.raises(PackageError, match="tensors.layers.0.up_proj.dtype"):
        load_package(pkg)


@pytest.mark.parametrize("field,value", [("n_layers", 10**9), ("vocab_size", 10**12), ("d_ff", 2**40),
                                         ("d_model", 2**31), ("n_layers", 1000)])
def test_huge_config_is_refused_without_allocating(world, tmp_path, field, value):
    pkg = _copy_pkg(world, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["config"][field] = value
    if field == "n_layers" and value == 1000:  # within the layer bound: the size check of the table refuses
        manifest["config"].update(d_model=32, d_ff=64)
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    t0 = time.perf_counter()
    with pytest.raises(PackageError, match="config|tensors"):
        load_package(pkg)
    with pytest.raises(MergeError):
        merge(world.anchor, [pkg], tmp_path / "m")
    assert time.perf_counter() - t0 < 5
    model_dir = tmp_path / "anchor"
    shutil.copytree(world.anchor, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(model_dir)
    assert time.perf_counter() - t0 < 10


def _manifest_cases(m):
    t = dict(m["tensors"])
    first = sorted(t)[0]
    return {
        "a list": [m],
        "a string": "manifest",
        "tensor entry a string": {**m, "tensors": {**t, first: "abc"}},
        "tensors a list": {**m, "tensors": list(t.values())},
        "tensors missing": {k: v for k, v in m.items() if k != "tensors"},
        "config missing": {k: v for k, v in m.items() if k != "config"},
        "config a list": {**m, "config": [1, 2]},
        "config field a string": {**m, "config": {**m["config"], "d_model": "32"}},
        "config field a bool": {**m, "config": {**m["config"], "n_heads": True}},
        "config NaN": {**m, "config": {**m["config"], "rope_theta": float("nan")}},
        "config unknown field": {**m, "config": {**m["config"], "dropout": 0.1}},
        "name a number": {**m, "name": 7},
        "fingerprint a dict": {**m, "anchor_fingerprint": {}},
        "steps negative": {**m, "steps": -3},
        "shape strings": {**m, "tensors": {**t, first: {**t[first], "shape": ["64", "32"]}}},
        "sha256 missing": {**m, "tensors": {**t, first: {"shape": t[first]["shape"], "dtype": "float32"}}},
        "MoE config": {**m, "config": {**m["config"], "num_experts": 2, "top_k": 1}},
        "format version a bool": {**m, "format_version": True},
    }


def test_malformed_manifests_give_package_errors(world, tmp_path):
    m = json.loads((world.code / "manifest.json").read_text())
    for label, bad in _manifest_cases(m).items():
        pkg = tmp_path / f"{len(list(tmp_path.iterdir()))}.flexpert"
        shutil.copytree(world.code, pkg)
        (pkg / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(PackageError, match="manifest.json") as info:
            load_package(pkg)
        assert type(info.value) is PackageError, label
    (pkg / "manifest.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PackageError, match="manifest.json"):
        load_package(pkg)


def test_malformed_model_dirs_give_checkpoint_errors(world, tmp_path):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(world.merged, d)
        return d

    d = copy("empty_experts")
    (d / "experts.json").write_text("{}")
    with pytest.raises(CheckpointError, match="experts.json: field 'experts'"):
        load_model(d)
    d = copy("list_experts")
    (d / "experts.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="experts.json: expected a JSON object"):
        load_model(d)
    d = copy("wrong_names")
    (d / "experts.json").write_text(json.dumps({"experts": ["code", "public"]}))
    with pytest.raises(CheckpointError, match="start with 'public'"):
        load_model(d)
    d = copy("edited_config")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_ff": 128}))
    with pytest.raises(CheckpointError, match=r"config.json needs .*\(edited config or weights\?\)"):
        load_model(d)
    d = copy("config_missing_field")
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_layers"}))
    with pytest.raises(CheckpointError, match="config.json: missing ModelConfig fields"):
        load_model(d)
    d = copy("config_list")
    (d / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(d)
    d = copy("nan_weights")  # hashes recomputed: the finite check refuses
    state, meta = load_tensors(d / "model.safetensors")
    state["blocks.0.ffn.router.weight"][1, 0] = float("nan")
    save_tensors(d / "model.safetensors", state, meta)
    with pytest.raises(CheckpointError, match="blocks.0.ffn.router.weight.*NaN"):
        load_model(d)
    d = copy("frozen_wrong_length")
    state, meta = load_tensors(d / "model.safetensors")
    assert "blocks.0.ffn.expert_frozen" in state
    state["blocks.0.ffn.expert_frozen"] = torch.zeros(3, dtype=torch.bool)
    save_tensors(d / "model.safetensors", state, meta)
    with pytest.raises(CheckpointError, match="expert_frozen.*needs torch.bool"):
        load_model(d)
    d = copy("short_public_row")
    save_tensors(d / "public_embedding.safetensors", {"embedding": torch.zeros(5)}, {"method": "anchor"})
    with pytest.raises(CheckpointError, match="public_embedding.safetensors: the public router row has 5 values"):
        load_model(d)
    d = copy("double_weights")
    state, meta = load_tensors(d / "model.safetensors")
    save_tensors(d / "model.safetensors", {k: v.double() if v.is_floating_point() else v for k, v in state.items()},
                 meta)
    with pytest.raises(CheckpointError, match="float64.*needs torch.float32"):
        load_model(d)


def test_broken_or_permuted_tokenizer_is_refused(world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(world.anchor, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match="broken/tokenizer.json"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        merge(broken, [world.code], tmp_path / "m")
    permuted = tmp_path / "permuted"
    shutil.copytree(world.anchor, permuted)
    tok = json.loads((permuted / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10], sorted(vocab)[20]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (permuted / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="permuted/tokenizer.json: the tokenizer differs"):
        load_model(permuted)
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        merge(permuted, [world.code], tmp_path / "m")
    # a package trained with another tokenizer (its manifest says so; hashes consistent)
    pkg = _copy_pkg(world, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert len(manifest["tokenizer_sha256"]) == 64
    (pkg / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(MergeError, match="another tokenizer"):
        merge(world.anchor, [pkg], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---- the layer's saved state ------------------------------------------------------------------------------
def test_mask_survives_save_and_old_files_without_it_load(world, tmp_path):
    model, names = load_model(world.merged)
    model.set_top_k(1)
    mask_experts(model, ["code"], names)
    row, method = read_public_embedding(world.merged)
    info = json.loads((world.merged / "experts.json").read_text())
    out = write_model_dir(tmp_path / "masked", model, world.merged / "tokenizer.json", row, method, info)
    back, _ = load_model(out)
    assert all(m.expert_mask.tolist() == [True, False] for m in back.moe_layers())
    state, meta = load_tensors(out / "model.safetensors")  # a file written before the buffers were saved
    old = {k: v for k, v in state.items() if not k.endswith((".expert_mask", ".expert_frozen"))}
    assert len(old) < len(state)
    save_tensors(out / "model.safetensors", old, meta)
    back, _ = load_model(out)
    assert all(m.expert_mask.all() for m in back.moe_layers())


# ---- training ------------------------------------------------------------------------------------------------
def test_expert_checkpoints_resume_message_and_ctrl_c(world, tmp_path, capfd):
    args = dict(name="law", steps=6, batch_size=4, checkpoint_every=2, log=False)
    ref = train_expert(world.anchor, LAW, tmp_path / "ref", **args)

    def ctrl_c_at_3(step, loss, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train_expert(world.anchor, LAW, tmp_path / "run", callback=ctrl_c_at_3, **args)
    exc = info.value
    ckpt = tmp_path / "run" / "law.flexpert.ckpt" / "checkpoint.pt"
    # the callback is part of step 3, so the stop is seen at the end of step 3
    assert isinstance(exc, KeyboardInterrupt) and exc.checkpoint == ckpt and exc.step == 3 and exc.steps == 6
    assert str(exc) == f"stopped; kept checkpoint at {ckpt} at step 3 of 6; rerun the same command to resume"
    assert not (tmp_path / "run" / "law.flexpert").exists() and hidden_or_lock(tmp_path / "run") == []
    capfd.readouterr()
    steps = []
    out = train_expert(world.anchor, LAW, tmp_path / "run", callback=lambda s, l, m: steps.append(s), **args)
    assert f"resuming from step 3 of 6 ({ckpt})" in capfd.readouterr().err
    assert steps == [4, 5, 6] and not ckpt.parent.exists()
    a, b = load_package(ref)[0], load_package(out)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another run's checkpoint: the message names the flag that starts over
    with pytest.raises(_Killed):
        train_expert(world.anchor, LAW, tmp_path / "run2", callback=_raise_at(3), **args)
    with pytest.raises(CheckpointError, match=r"other settings \(differs in \['schedule'\]\).*--no-resume"):
        train_expert(world.anchor, LAW, tmp_path / "run2", **{**args, "steps": 8})
    train_expert(world.anchor, LAW, tmp_path / "run2", resume=False, **args)


def _raise_at(n):
    def cb(step, loss, model):
        if step == n:
            raise _Killed
    return cb


def test_refused_training_leaves_nothing(world, tmp_path):
    with pytest.raises(ValueError, match="merged model"):
        train_expert(world.merged, LAW, tmp_path / "p", name="law", **EXPERT)
    with pytest.raises(ValueError, match="seq_len"):
        train_expert(world.anchor, LAW, tmp_path / "p", name="law", seq_len=10**6, **EXPERT)
    assert list(tmp_path.iterdir()) == [tmp_path / "p"] and list((tmp_path / "p").iterdir()) == []


def test_anchor_resume_message_and_foreign_checkpoint_folder(world, tmp_path, capfd):
    args = dict(preset="micro", data=[PUBLIC], steps=4, batch_size=4, embed_method="anchor", log=False,
                checkpoint_every=1)
    with pytest.raises(_Killed):
        train_anchor(tmp_path / "a", callback=_raise_at(2), **args)
    capfd.readouterr()
    train_anchor(tmp_path / "a", **args)
    # a crash inside step 2's callback loses step 2 (the callback is part of the step)
    assert f"resuming from step 1 of 4 ({tmp_path / 'a.ckpt' / 'checkpoint.pt'})" in capfd.readouterr().err
    assert artifact_kind(tmp_path / "a") == "anchor" and hidden_or_lock(tmp_path) == []
    foreign = tmp_path / "b.ckpt"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for resume in (True, False):
        with pytest.raises(OutputError, match="b.ckpt exists and is not empty"):
            train_anchor(tmp_path / "b", resume=resume, **args)
    assert (foreign / "thesis.tex").read_text() == "years of work" and not (tmp_path / "b").exists()


# ---- fuzz ------------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=6)


@st.composite
def _mutation(draw):
    """A path into the manifest (top level, config, tensors, one tensor entry) and a new value."""
    where = draw(st.sampled_from(["top", "config", "tensors", "entry", "whole", "delete"]))
    return where, draw(st.text(max_size=10)), draw(_json), draw(st.integers(0, 10**6))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(muts=st.lists(_mutation(), min_size=0, max_size=3),
       retensor=st.none() | st.tuples(st.integers(0, 99), st.lists(st.integers(0, 70), max_size=3).map(tuple),
                                      st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
                                      st.booleans()))
def test_fuzz_manifest_loads_or_raises_package_error(world, tmp_path_factory, muts, retensor):
    pkg = tmp_path_factory.mktemp("fuzz") / "p.flexpert"
    shutil.copytree(world.code, pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    fields = sorted(m)
    for where, key, value, pick in muts:
        if not isinstance(m, dict):
            break
        if where == "whole":
            m = value
        elif where == "top":
            m[fields[pick % len(fields)] if pick % 2 else key] = value
        elif where == "delete":
            m.pop(fields[pick % len(fields)], None)
        elif where == "config" and isinstance(m.get("config"), dict):
            cf = sorted(m["config"]) or [key]
            m["config"][cf[pick % len(cf)] if pick % 2 else key] = value
        elif where == "tensors" and isinstance(m.get("tensors"), dict):
            names = sorted(m["tensors"]) or [key]
            m["tensors"][names[pick % len(names)] if pick % 2 else key] = value
        elif where == "entry" and isinstance(m.get("tensors"), dict) and m["tensors"]:
            entry = m["tensors"][sorted(m["tensors"])[pick % len(m["tensors"])]]
            if isinstance(entry, dict):
                entry[["sha256", "shape", "dtype", key][pick % 4]] = value
    (pkg / "manifest.json").write_text(json.dumps(m, allow_nan=True))
    expected, _ = load_package(world.code)
    if retensor is not None and isinstance(m, dict) and isinstance(m.get("tensors"), dict):
        # a tensor with another shape / dtype / values, its manifest entry kept consistent with it
        (name_pick, shape, dtype, nan) = retensor
        k = sorted(expected)[name_pick % len(expected)]
        t = (torch.randn(shape) * (float("nan") if nan else 1.0)).to(dtype)
        expected[k] = t
        m["tensors"][k] = {"sha256": tensor_sha256(t), "shape": list(shape), "dtype": str(dtype)[6:]}
        _rewrite(pkg, expected, m, rehash=False)
    try:
        tensors, manifest = load_package(pkg)
    except PackageError:
        return
    # accepted: then it holds exactly the data written, in the manifest's dtype, all finite
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in tensors.values())
