"""The ``flexkern`` command as a user meets it: subprocess runs of ``python -m flexkern.cli``.

One-line errors (and exit status 2 for refused arguments) for missing paths, unknown names and
sources, --debug tracebacks, an instant torch-free --help, help text on every option, Ctrl-C
during training (exit 130, one line, the rerun resumes), --out refusals that leave existing files
byte-identical, and the [flexolmo] extra (import flexkern needs none of it; a pipeline command
without it says what to install)."""
from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
PIPELINE_MODULES = ("safetensors", "tokenizers", "tqdm", "matplotlib")


def cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexkern.cli", *map(str, args)], cwd=cwd or REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


_BATCH = """
import contextlib, io, json, sys
from flexkern.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
    results.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def cli_batch(*cases, timeout=300) -> list[SimpleNamespace]:
    """Run ``flexkern.cli.main(args)`` for each case in one interpreter (torch is imported once);
    each result has returncode, stdout and stderr like a subprocess of its own."""
    import json
    proc = subprocess.run([sys.executable, "-c", _BATCH, json.dumps([[str(a) for a in c] for c in cases])],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [SimpleNamespace(returncode=r, stdout=o, stderr=e) for r, o, e in json.loads(proc.stdout)]


def one_line_error(proc: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The process failed with ``status`` and printed exactly one line, an error naming ``needles``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("flexkern: error: "), proc.stderr[-2000:]
    assert proc.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes (or 'dir')} of everything under ``root`` (``root`` itself if a file)."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _docs(words: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = words.split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(30, 60))) + "." for _ in range(n)]


def _folder(path: Path, docs: list[str]) -> Path:
    path.mkdir(parents=True)
    for i, d in enumerate(docs):
        (path / f"{i:03d}.txt").write_text(d)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro anchor, one owner package and their merge, written by the library."""
    from flexkern.flexolmo.merge import merge
    from flexkern.flexolmo.train import train_anchor, train_expert

    root = tmp_path_factory.mktemp("cli")
    public = _folder(root / "public_docs", _docs("the a of and to in is was he she it river city king war", 80, 0))
    law = _folder(root / "law", _docs("court shall party agreement law section herein pursuant license", 40, 2))
    anchor = train_anchor(root / "anchor", preset="micro", data=[str(public)], steps=8, batch_size=8,
                          embed_method="anchor", log=False)
    package = train_expert(anchor, str(law), root / "packages", name="law", steps=4, batch_size=4, log=False)
    merged = merge(anchor, [package], root / "merged")
    return SimpleNamespace(root=root, public=public, law=law, anchor=anchor, package=package, merged=merged)


# ---- --help: instant, torch-free, every option explained ------------------------------------------------------
def test_parser_imports_no_torch_and_help_is_instant():
    code = ("import sys, time; t = time.perf_counter(); from flexkern.cli import build_parser; build_parser(); "
            "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'numpy', 'tokenizers', 'safetensors', "
            "'matplotlib', 'tqdm', 'triton') if m in sys.modules]; print(heavy, dt)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    heavy, dt = out.stdout.rsplit(" ", 1)
    assert heavy == "[]", out.stdout + out.stderr
    assert float(dt) < 0.5, dt  # import + parser build; torch alone takes seconds
    for args in (["--help"], ["train-expert", "--help"], ["demo", "--help"]):
        t0 = time.perf_counter()
        proc = cli(*args)
        wall = time.perf_counter() - t0
        assert proc.returncode == 0 and "usage: flexkern" in proc.stdout, proc.stderr
        assert wall < 2.0, (args, wall)  # interpreter start-up included; ~0.1 s on an idle machine


def test_python_m_flexkern_is_the_same_cli():
    a = subprocess.run([sys.executable, "-m", "flexkern", "--help"], env=ENV, capture_output=True, text=True)
    b = cli("--help")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    for cmd in ("demo", "anchor", "train-expert", "merge", "evaluate", "opt-out", "opt-in", "tune-router"):
        assert cmd in b.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    from flexkern.cli import build_parser
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"demo", "anchor", "train-expert", "merge", "evaluate", "opt-out", "opt-in", "tune-router"} <= set(commands)
    for name, p in [("flexkern", parser), *commands.items()]:
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and len(action.help) > 8, f"{name} {flag} has no help text"
            takes_value = action.nargs != 0
            if takes_value and not action.required:
                rendered = p._get_formatter()._expand_help(action)
                assert "default" in rendered, f"{name} {flag}: help does not say its default: {rendered!r}"
        assert "--debug" in text


def test_cli_defaults_are_the_pipelines():
    from flexkern.cli import DOMAIN_NAMES
    from flexkern.flexolmo import defaults
    from flexkern.flexolmo.data import DOMAINS
    from flexkern.flexolmo.demo import DemoConfig
    from flexkern.flexolmo.model import PRESETS
    from flexkern.flexolmo.train import train_anchor, train_expert

    assert DOMAIN_NAMES == DOMAINS and set(defaults.PRESET_NAMES) == set(PRESETS)
    for fn, d in ((train_anchor, defaults.ANCHOR), (train_expert, defaults.EXPERT)):
        params = inspect.signature(fn).parameters
        for field in ("steps", "lr", "batch_size", "checkpoint_every"):
            assert params[field].default == getattr(d, field), (fn.__name__, field)
    assert inspect.signature(train_anchor).parameters["preset"].default == defaults.ANCHOR_PRESET
    demo = DemoConfig()
    for field, value in vars(defaults.DEMO).items():
        assert getattr(demo, field) == value, field


# ---- one-line errors ------------------------------------------------------------------------------------------
def test_missing_paths_give_one_line(tmp_path):
    missing = tmp_path / "nope"
    one_line_error(cli("evaluate", "--model", missing), 2, str(missing), "does not exist")  # a real process
    (tmp_path / "empty").mkdir()
    merge, expert, opt_out = cli_batch(
        ["merge", "--anchor", missing, "--packages", missing, "--out", tmp_path / "m"],
        ["train-expert", "--anchor", missing, "--source", "code", "--out", tmp_path / "x"],
        ["opt-out", "--model", tmp_path / "empty", "--name", "x", "--out", tmp_path / "o"])
    one_line_error(merge, 2, str(missing))
    one_line_error(expert, 2, "--anchor")
    one_line_error(opt_out, 2, "not a model directory")


def test_bad_names_fail_before_any_loading(world, tmp_path):
    # a copy of the merged model with unreadable weights: a name error must come before reading them
    import shutil
    broken = tmp_path / "merged"
    shutil.copytree(world.merged, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    one_line_error(cli("evaluate", "--model", broken, "--opt-out", "bogus"), 2, "'bogus'", "public, law")
    results = cli_batch(
        ["opt-out", "--model", broken, "--name", "bogus", "--out", tmp_path / "o"],
        ["opt-out", "--model", broken, "--name", "public", "--out", tmp_path / "o"],
        ["evaluate", "--model", world.anchor, "--opt-out", "law"],
        ["tune-router", "--model", broken, "--owner", "bogus=code", "--out", tmp_path / "t"],
        ["evaluate", "--model", broken, "--top-k", "3"],
        # the unreadable weights do give a one-line error (status 1) once the command works on them
        ["evaluate", "--model", broken, "--data", world.law])
    for proc, (status, needle) in zip(results, [(2, "'bogus'"), (2, "public"), (2, "dense"), (2, "bogus"),
                                                (2, "--top-k"), (1, "model.safetensors")]):
        one_line_error(proc, status, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_bad_sources_and_numbers(world, tmp_path):
    one_line_error(cli("train-expert", "--anchor", world.anchor, "--source", "bogus", "--out", tmp_path), 2,
                   "'bogus'", "code, legal")
    cases = [(["anchor", "--out", tmp_path / "a", "--data", "bogus"], "--data"),
             (["evaluate", "--model", world.merged, "--data", tmp_path / "nope"], "--data"),
             (["train-expert", "--anchor", world.anchor, "--source", world.law, "--name", "bad name!",
               "--out", tmp_path], "invalid expert name"),
             (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", tmp_path / "m",
               "--top-k", "3"], "--top-k")]
    for args in (["--steps", "0"], ["--lr", "-1"], ["--batch-size", "x"], ["--max-bytes", "0"],
                 ["--device", "gpu"], ["--preset", "huge"]):
        cases.append((["anchor", "--out", tmp_path / "a", *args], args[0]))
    for proc, (_, needle) in zip(cli_batch(*[c for c, _ in cases]), cases):
        one_line_error(proc, 2, needle)
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    for args in (["--debug", "evaluate", "--model", tmp_path], ["evaluate", "--model", tmp_path, "--debug"]):
        proc = cli(*args)
        assert proc.returncode == 2
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("flexkern: error: ")


def test_a_bug_still_prints_its_traceback(world):
    """Only the package's error types and bad arguments are one-liners; any other exception is a bug."""
    code = ("import sys; import flexkern.flexolmo.commands as c\n"
            "def boom(*a, **k): raise KeyError('a bug')\n"
            "c.evaluate_model_dir = boom\n"
            "from flexkern.cli import main\n"
            f"sys.exit(main(['evaluate', '--model', {str(world.merged)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'a bug'" in proc.stderr
    assert "flexkern: error" not in proc.stderr


def test_pipeline_command_without_the_extra_names_it(tmp_path):
    for missing in ("tokenizers", "safetensors"):
        code = (f"import sys; sys.modules[{missing!r}] = None; from flexkern.cli import main; "
                f"sys.exit(main(['evaluate', '--model', {str(tmp_path)!r}]))")
        proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
        one_line_error(proc, 1, missing, "pip install 'flexkern[flexolmo]'")


def test_import_flexkern_needs_none_of_the_pipeline_modules():
    """Every module of the package outside flexolmo/, integrations/ and the CLI imports (and the
    layer runs) with safetensors, tokenizers, tqdm and matplotlib unimportable."""
    code = f"""
import importlib, pkgutil, sys
for m in {PIPELINE_MODULES!r} + ("transformers",):
    sys.modules[m] = None
import flexkern, torch
skip = ("flexkern.flexolmo", "flexkern.integrations", "flexkern.cli", "flexkern.__main__")
names = [m.name for m in pkgutil.walk_packages(flexkern.__path__, "flexkern.") if not m.name.startswith(skip)]
for name in names:
    importlib.import_module(name)
moe = flexkern.FlexMoE(d_model=16, d_ff=32, num_experts=4, top_k=2)
assert moe(torch.randn(5, 16)).shape == (5, 16)
print(len(names))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 10  # the ops, nn, triton and cuda modules were all imported


def test_evaluate_with_an_expert_opted_out(world):
    proc = cli("evaluate", "--model", world.merged, "--data", world.public, world.law, "--opt-out", "law",
               "--eval-tokens", "128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("without") else ""): line.split()[-3:]
            for line in proc.stdout.splitlines() if line.startswith(("model ", "without "))}
    assert set(rows) == {"model", "without law"}, proc.stdout
    losses = {k: [float(x) for x in v] for k, v in rows.items()}
    assert all(0 < x < 20 for v in losses.values() for x in v)
    assert losses["model"] != losses["without law"]  # masking the owner's expert changes the outputs


# ---- --out never replaces what flexkern did not create --------------------------------------------------------
def test_out_refusals_leave_existing_files_byte_identical(world, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("my notes")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "b.bin").write_bytes(os.urandom(64))
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file")
    cases = [  # (args, path that must stay byte-identical)
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", foreign], foreign),
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", foreign, "--overwrite"], foreign),
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", a_file], a_file),
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", world.root], world.root),
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", world.merged], world.merged),
        (["merge", "--anchor", world.anchor, "--packages", world.package, "--out", world.package, "--overwrite"],
         world.package),
        (["opt-out", "--model", world.merged, "--name", "law", "--out", world.merged, "--overwrite"], world.merged),
        (["opt-in", "--model", world.anchor, "--package", world.package, "--out", world.anchor, "--overwrite"],
         world.anchor),
        (["anchor", "--out", foreign, "--overwrite", "--preset", "micro"], foreign),
        (["train-expert", "--anchor", world.anchor, "--source", world.law, "--out", world.package.parent],
         world.package.parent),
    ]
    before = [tree_digest(keep) for _, keep in cases]
    for proc, (args, keep), digest in zip(cli_batch(*[args for args, _ in cases]), cases, before):
        one_line_error(proc, 2)
        assert tree_digest(keep) == digest, (args, proc.stderr)
    # the demo refuses a folder that is not a demo run as its first step (exit 1: the demo's check)
    for extra in ([], ["--overwrite"]):
        before = tree_digest(foreign)
        one_line_error(cli("demo", "--out", foreign, "--no-install", *extra), 1, str(foreign))
        assert tree_digest(foreign) == before


def test_overwrite_replaces_a_flexkern_output_of_the_same_kind(world, tmp_path):
    out = tmp_path / "merged"
    proc = cli("merge", "--anchor", world.anchor, "--packages", world.package, "--out", out)
    assert proc.returncode == 0 and f"wrote {out}" in proc.stdout, proc.stderr
    first = tree_digest(out)
    one_line_error(cli("merge", "--anchor", world.anchor, "--packages", world.package, "--out", out), 2,
                   "--overwrite")
    assert tree_digest(out) == first
    proc = cli("merge", "--anchor", world.anchor, "--packages", world.package, "--out", out, "--overwrite",
               "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) != first  # replaced (top-k 1 is another config.json)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers


# ---- Ctrl-C -----------------------------------------------------------------------------------------------------
def test_ctrl_c_during_training_stops_cleanly_and_the_rerun_resumes(world, tmp_path):
    out = tmp_path / "anchor"
    args = [sys.executable, "-m", "flexkern.cli", "anchor", "--out", str(out), "--preset", "micro",
            "--data", str(world.public), "--steps", "40", "--batch-size", "4", "--checkpoint-every", "4",
            "--embed-method", "anchor", "--quiet"]
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "anchor.ckpt"
    deadline = time.monotonic() + 180
    while not (ckpt.is_dir() and any(p.suffix == ".pt" for p in ckpt.iterdir())):  # training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    # training acknowledges the first Ctrl-C at once, then the one line of what was kept
    assert 1 <= len(lines) <= 2 and all(line.startswith("flexkern: ") for line in lines), stderr[-3000:]
    assert "rerun the same command" in lines[-1] and str(ckpt) in lines[-1], lines[-1]
    assert not out.exists() and ckpt.is_dir()  # nothing half-written; the checkpoint is kept
    rerun = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step" in rerun.stdout + rerun.stderr, rerun.stdout + rerun.stderr
    assert (out / "model.safetensors").is_file() and not ckpt.exists()
