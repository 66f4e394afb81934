"""Atomic, verified files: model directories (anchor or merged), JSON, safetensors with hashes,
and the rules every output path follows.

Every write goes to a temporary name in the same folder and is moved into place with os.replace,
so a reader never sees a half-written file or directory. Model tensors are stored with their
sha256 in the safetensors metadata and checked on load.

A model directory holds:
    model.safetensors              full state dict (+ per-tensor sha256 and the tokenizer's sha256
                                   in the metadata)
    config.json                    ModelConfig.to_dict()
    tokenizer.json                 the anchor's tokenizer
    public_embedding.safetensors   {"embedding": (D,)} the public router row (+ metadata "method")
    experts.json                   merged models only: {"experts": [names], "anchor_fingerprint": ...}
    hf_import.json                 anchors imported from transformers only: where from, dtype, how
                                   the public row was made (written with ``files=``)
    .flexkern-artifact             the marker (below)

Output paths (every writer: write_model_dir, save_package, merge, opt_out, opt_in, train_anchor,
train_expert):
- Nothing is deleted or replaced that flexkern did not create. Every folder flexkern writes holds a
  marker file ``.flexkern-artifact`` (JSON: format, kind, version). An existing output is replaced
  only with ``overwrite=True`` (the CLI's ``--overwrite``) and only when it is a flexkern artifact of
  the same kind (anchor, merged, package, checkpoint); an empty folder may be used; a regular file,
  a symbolic link, a folder of other files, the current folder, or a path equal to / inside /
  containing an input is refused (``OutputError``) before any work.
- One writer per output: ``output_lock`` holds ``NAME.lock`` next to the output (created with
  O_CREAT|O_EXCL, naming pid and host); a second writer gets ``OutputLockedError``; a lock left by a
  dead process on this host is taken over with a message.
- The directory swap is recoverable. A folder is built as ``.NAME.flexkern-tmp``, renamed to
  ``.NAME.flexkern-new`` once complete (the commit point), then the old ``NAME`` goes to
  ``.NAME.flexkern-old``, the new one to ``NAME``, and the old one is deleted. A run killed anywhere in
  between is finished (a complete ``-new`` becomes ``NAME``) or rolled back (an incomplete ``-tmp``
  is deleted) by the next writer or reader of that path (``recover_output``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import SIZE_FIELDS, FlexOlmoLM, ModelConfig, tensor_sha256

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
EMBEDDING_FILE, EXPERTS_FILE = "public_embedding.safetensors", "experts.json"
ARTIFACT_FILE, ARTIFACT_FORMAT, ARTIFACT_VERSION = ".flexkern-artifact", "flexkern-artifact", 1
LOCK_SUFFIX = ".lock"
_HASH_KEY, _TOKENIZER_KEY = "tensor_sha256", "tokenizer_sha256"
# Folders written before markers existed are recognised by their exact file set.
_LEGACY = {"anchor": {MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, EMBEDDING_FILE},
           "merged": {MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, EMBEDDING_FILE, EXPERTS_FILE},
           "package": {"expert.safetensors", "manifest.json"},
           "checkpoint": {"checkpoint.pt", TOKENIZER_FILE}}


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp/mkdtemp create private (0600/0700) entries; published files get the usual modes.
_FILE_MODE, _DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, corrupt or inconsistent."""


class OutputError(CheckpointError):
    """An output path that cannot be written without losing data (exists, overlaps an input, ...)."""


class OutputLockedError(OutputError):
    """Another live process is writing the same output."""


def _say(msg: str) -> None:
    print(f"flexkern: {msg}", file=sys.stderr, flush=True)


# ---- atomic writes ----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- artifacts: the marker file ---------------------------------------------------------------------
def write_marker(folder, kind: str) -> None:
    """Mark ``folder`` as a flexkern artifact of ``kind`` (written atomically)."""
    write_json(Path(folder) / ARTIFACT_FILE, {"format": ARTIFACT_FORMAT, "kind": kind, "version": ARTIFACT_VERSION})


def artifact_kind(folder) -> str | None:
    """The kind of the flexkern artifact at ``folder`` (its marker, or the exact file set of a folder
    written before markers existed), or None when it is not one."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    marker = folder / ARTIFACT_FILE
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(info, dict) and info.get("format") == ARTIFACT_FORMAT and isinstance(info.get("kind"), str)
        return info["kind"] if ok else None
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    for kind, files in _LEGACY.items():
        if names and names == files or (kind == "checkpoint" and "checkpoint.pt" in names and names <= files):
            return kind
    return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output(path, kind: str | None, *, overwrite: bool = False, inputs=()) -> Path:
    """Refuse (OutputError) an output path that would lose data; returns the path.

    Pure checks (nothing is written): see the module docstring for the rules. ``kind`` None: the
    path must be missing or an empty folder. ``inputs``: paths the command reads."""
    path = Path(path)
    if path.name in ("", ".", "..") or not str(path):
        raise OutputError(f"output {str(path)!r} names the current or a parent folder; "
                          "give the name of a new folder (e.g. runs/merged)")
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"output {path} is the current folder or contains it; give the name of a new folder")
    for inp in inputs:
        if inp is None:
            continue
        rel = _relation(real, Path(inp).resolve())
        if rel is not None:
            raise OutputError(f"output {path} {rel} the input {inp}; write to another folder "
                              "(an output never replaces what the command reads)")
    for parent in [path.parent, *path.parent.parents]:
        if os.path.lexists(parent) and not parent.is_dir():
            raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    if path.is_symlink():
        raise OutputError(f"output {path} is a symbolic link; flexkern does not replace it")
    if not path.exists() or _is_empty_dir(path):
        return path
    if not path.is_dir():
        raise OutputError(f"output {path} is an existing file; flexkern never replaces files: choose another path")
    have = artifact_kind(path)
    if have is not None and have == kind:
        if overwrite:
            return path
        raise OutputError(f"{path} already holds a flexkern {kind}; pass --overwrite (overwrite=True) "
                          "to replace it, or choose another path")
    what = f"a flexkern {have}" if have else "not a flexkern artifact"
    raise OutputError(f"{path} exists and is not empty ({what}); flexkern does not replace it "
                      f"(--overwrite replaces only a flexkern {kind or 'artifact'} folder): choose another path")
# ---- one writer per output: the lock file ---------------------------------------------------------------
_HELD: dict[tuple[int, str], int] = {}  # (pid, lock path) -> depth; reentrant within one process


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read_lock(lock: Path) -> dict | None:
    try:
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)
    return info if ok else None


def _try_create_lock(lock: Path, content: bytes) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over_stale(lock: Path, holder: dict) -> None:
    """Remove a lock whose holder is dead, unless another process replaced it in the meantime."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) == holder:
        os.unlink(aside)
        _say(f"took over the stale lock {lock} of process {holder['pid']} on {holder['host']} "
             "(no longer running)")
        return
    with contextlib.suppress(FileExistsError):  # a fresh lock: put it back
        os.link(aside, lock)
    os.unlink(aside)


@contextlib.contextmanager
def output_lock(path):
    """Hold ``NAME.lock`` next to ``path`` for the duration (reentrant in one process).

    Raises OutputLockedError when a live process holds it; a lock left by a dead process on this
    host is taken over with a message on stderr."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), str(lock.resolve()))
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "argv": sys.argv[:8]}
    content = (json.dumps(me) + "\n").encode()
    for _ in range(5):
        if _try_create_lock(lock, content):
            break
        holder = _read_lock(lock)
        if holder == {}:
            continue  # released in the meantime
        if holder is None:
            raise OutputLockedError(f"{lock} exists but is not a flexkern lock file; flexkern does not "
                                    "remove it: move it away if nothing else uses it")
        same_host = holder["host"] == me["host"]
        if same_host and not _pid_alive(holder["pid"]):
            _take_over_stale(lock, holder)
            continue
        raise OutputLockedError(
            f"{path} is being written by another run (process {holder['pid']} on {holder['host']}, "
            f"since {holder.get('started', '?')}; lock {lock}); wait for it to finish"
            + ("" if same_host else ", or delete the lock file if that run is gone"))
    else:
        raise OutputLockedError(f"could not take the lock {lock} (it keeps changing hands)")
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        if _read_lock(lock) == me:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)


# ---- the recoverable directory swap --------------------------------------------------------------------
def _swap_names(path: Path) -> tuple[Path, Path, Path]:
    return tuple(path.with_name(f".{path.name}.flexkern-{s}") for s in ("tmp", "new", "old"))


def _legacy_olds(path: Path) -> list[Path]:
    """``.NAME.XXXX.old/x``: the old version that earlier flexkern versions moved aside during a swap."""
    if not path.parent.is_dir():
        return []
    found = [d for d in path.parent.glob(f".{glob_escape(path.name)}.*.old") if (d / "x").is_dir()]
    return sorted(found, key=lambda d: d.stat().st_mtime)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _leftovers(path: Path) -> bool:
    return any(os.path.lexists(p) for p in _swap_names(path)) or bool(_legacy_olds(path))


def _finish_swap(path: Path) -> str | None:
    """Bring ``path`` to a consistent state from whatever a (possibly killed) swap left; returns
    what was done (None when there was nothing to do). Caller holds the lock."""
    tmp, new, old = _swap_names(path)
    done = None
    if os.path.lexists(tmp):  # an incomplete build: roll back
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else os.unlink(tmp)
        done = f"removed the incomplete {tmp.name} of an interrupted write of {path}"
    if new.is_dir() and os.path.lexists(path) and not (
            _is_empty_dir(path) or artifact_kind(path) not in (None,) and artifact_kind(path) == artifact_kind(new)):
        # something else took the path since the swap was interrupted: keep it, drop our version
        shutil.rmtree(new)
        done = f"dropped an interrupted write of {path}: the path now holds something else, which is kept"
    if new.is_dir():  # complete: finish the swap
        if os.path.lexists(path):
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(new, path)
        done = f"finished an interrupted replacement of {path}"
    if old.is_dir():
        if os.path.lexists(path):
            shutil.rmtree(old)
        else:  # the new version is gone: roll back to the old one
            os.rename(old, path)
            done = f"restored {path} from an interrupted replacement"
    for legacy in _legacy_olds(path)[::-1]:  # newest first
        if not os.path.lexists(path):
            os.rename(legacy / "x", path)
            done = f"restored {path} from {legacy.name}, left by an interrupted replacement"
        elif artifact_kind(legacy / "x") is None:
            continue  # not recognisably ours: left alone
        else:
            shutil.rmtree(legacy / "x")
            done = done or f"removed {legacy.name}, the old version of {path} an earlier run replaced"
        with contextlib.suppress(OSError):
            legacy.rmdir()
    return done


def recover_output(path, *, wait: bool = True) -> str | None:
    """Finish or roll back an interrupted directory swap at ``path`` (no-op when there is none).

    Takes the output's lock; with ``wait=False`` a lock held by a live process is left alone
    (that process is mid-write) and None is returned."""
    path = Path(path)
    if path.name in ("", ".", "..") or not _leftovers(path):
        return None
    try:
        with output_lock(path):
            done = _finish_swap(path)
    except OutputLockedError:
        if wait:
            raise
        return None
    if done:
        _say(done)
    return done


@contextlib.contextmanager
def claim_output(path, kind: str | None, *, overwrite: bool = False, inputs=()):
    """Lock ``path``, finish any interrupted swap there, and check it may be written (check_output).
    Hold it around a whole command so the checks hold until the output is in place."""
    path = Path(path)
    recover_output(path)  # only when an interrupted swap left something (then the parent exists)
    check_output(path, kind, overwrite=overwrite, inputs=inputs)  # refuse before creating anything
    with output_lock(path):
        done = _finish_swap(path)
        if done:
            _say(done)
        check_output(path, kind, overwrite=overwrite, inputs=inputs)
        yield path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, kind: str | None = None, overwrite: bool = False, inputs=()):
    """Yield an empty temporary directory; on success it takes the place of ``path``.

    ``path`` must be free or replaceable (check_output with ``kind``/``overwrite``/``inputs``); the
    new folder gets the ``kind`` marker. ``path`` is always either the old complete directory or
    the new complete one, and an interrupted swap is finished by the next run (module docstring)."""
    path = Path(path)
    with claim_output(path, kind, overwrite=overwrite, inputs=inputs):
        tmp, new, _ = _swap_names(path)
        os.mkdir(tmp, _DIR_MODE)
        try:
            yield tmp
            if kind is not None:
                write_marker(tmp, kind)
            os.chmod(tmp, _DIR_MODE)
            os.rename(tmp, new)  # the commit point: from here on the new version wins
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _finish_swap(path)


def remove_artifact(path, kind: str) -> bool:
    """Delete ``path`` only if it is a flexkern artifact of ``kind``; returns whether it did."""
    path = Path(path)
    if artifact_kind(path) != kind:
        return False
    shutil.rmtree(path)
    return True


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """Parsed JSON of ``path`` (CheckpointError naming the file when missing or not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def check_finite(tensors: dict[str, torch.Tensor], where, error=None) -> None:
    """Refuse NaN/inf in any floating tensor (``error``: the exception type, CheckpointError)."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise (error or CheckpointError)(f"{where}: tensor {k!r} holds NaN or infinite values")


# ---- safetensors with hashes -------------------------------------------------------------------------
def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Save tensors (contiguous CPU copies) with their sha256 in the metadata; returns the hashes."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    hashes = {k: tensor_sha256(v) for k, v in cpu.items()}
    meta = dict(metadata or {})
    meta[_HASH_KEY] = json.dumps(hashes, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)
    return hashes


def load_tensors(path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load (tensors, metadata); with ``verify`` every tensor must match its stored sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if verify:
        if _HASH_KEY not in meta:
            raise CheckpointError(f"{path} has no tensor hashes in its metadata")
        try:
            expected = json.loads(meta[_HASH_KEY])
        except ValueError:
            expected = None
        if not isinstance(expected, dict) or set(expected) != set(tensors):
            raise CheckpointError(f"{path}: tensor names do not match the recorded hashes")
        for k, t in tensors.items():
            if tensor_sha256(t) != expected[k]:
                raise CheckpointError(f"{path}: tensor {k!r} does not match its sha256 (corrupt file?)")
    meta.pop(_HASH_KEY, None)
    return tensors, meta


# ---- model directories ---------------------------------------------------------------------------------
def model_kind(model: FlexOlmoLM) -> str:
    """The artifact kind of a model directory: "merged" for an MoE model, "anchor" for a dense one."""
    return "merged" if model.moe_layers() else "anchor"


def write_model_dir(out_dir, model: FlexOlmoLM, tokenizer_json: str | Path, public_embedding: torch.Tensor,
                    embed_method: str, experts: dict | None = None, *, overwrite: bool = False, inputs=(),
                    kind: str | None = None, files: dict[str, object] | None = None) -> Path:
    """Write a complete model directory atomically (see the module docstring).

    ``out_dir`` must be free, an empty folder, or (``overwrite=True``) a flexkern model directory of
    the same ``kind`` (default: model_kind(model)); ``inputs`` are paths it must not overlap.
    ``files``: more JSON files written into the folder ({file name: object}, e.g. import notes).
    Refuses NaN/inf weights and a tokenizer that does not load; records the tokenizer's sha256."""
    out_dir = Path(out_dir)
    kind = kind or model_kind(model)
    state = model.state_dict()
    check_finite(state, f"model for {out_dir}")
    row = public_embedding.detach().float().cpu()
    if row.shape != (model.config.d_model,) or not bool(torch.isfinite(row).all()):
        raise CheckpointError(f"the public router row must be {model.config.d_model} finite values, "
                              f"got shape {tuple(row.shape)}")
    inputs = (*inputs, tokenizer_json)  # the tokenizer is read while the folder is written
    with atomic_dir(out_dir, kind=kind, overwrite=overwrite, inputs=inputs) as tmp:
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
        tok_sha = check_tokenizer_file(tmp / TOKENIZER_FILE, vocab_size=model.config.vocab_size,
                                       where=str(tokenizer_json))
        save_tensors(tmp / MODEL_FILE, state, {_TOKENIZER_KEY: tok_sha})
        write_json(tmp / CONFIG_FILE, model.config.to_dict())
        save_tensors(tmp / EMBEDDING_FILE, {"embedding": row}, {"method": embed_method})
        if experts is not None:
            write_json(tmp / EXPERTS_FILE, experts)
        for name, obj in (files or {}).items():
            if Path(name).name != name or name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, EMBEDDING_FILE,
                                                   EXPERTS_FILE, ARTIFACT_FILE):
                raise ValueError(f"files: {name!r} is not a free file name in a model directory")
            write_json(tmp / name, obj)
    return out_dir


def check_tokenizer_file(path, expected_sha256: str | None = None, vocab_size: int | None = None,
                         where: str | None = None) -> str:
    """Verify a tokenizer.json: its sha256 (when one was recorded), that it loads, has the EOS token,
    ``vocab_size`` entries, and round-trips a probe string. Returns its sha256; CheckpointError
    naming the file otherwise."""
    from .tokenizer import TokenizerError, verify_tokenizer

    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {where}")
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise CheckpointError(f"{where}: the tokenizer differs from the one this model was written with "
                              f"(sha256 {sha[:12]}... != recorded {str(expected_sha256)[:12]}...)")
    try:
        verify_tokenizer(path, vocab_size)
    except TokenizerError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return sha


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(model_dir) -> ModelConfig:
    """The directory's config.json, validated against ModelConfig's bounds (nothing allocated)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(read_json(path), require=SIZE_FIELDS)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_public_embedding(model_dir) -> tuple[torch.Tensor, str]:
    """(public router row (D,) float32, the embedding method that made it)."""
    path = Path(model_dir) / EMBEDDING_FILE
    tensors, meta = load_tensors(path)
    row = tensors.get("embedding")
    if row is None or row.dim() != 1 or row.dtype != torch.float32:
        raise CheckpointError(f"{path} has no float32 'embedding' vector")
    check_finite(tensors, path)
    return row, meta.get("method", "unknown")


# FlexMoE's expert_mask / expert_frozen buffers: checkpoints written before they were saved lack them
# (the defaults then hold: every expert active, none frozen).
_OPTIONAL_BUFFERS = (".expert_mask", ".expert_frozen")


def _fit_state(model_dir: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit config.json, before anything is allocated (the shapes come
    from a model on the meta device)."""
    layers = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    if len(layers) != config.n_layers:  # cheap first: no model of a forged depth is even built on meta
        raise CheckpointError(f"{model_dir}: {MODEL_FILE} holds {len(layers)} layers, {CONFIG_FILE} says "
                              f"n_layers={config.n_layers} (edited config or weights?)")
    with torch.device("meta"):
        want = {k: (tuple(v.shape), v.dtype) for k, v in FlexOlmoLM(config).state_dict().items()}
    missing = [k for k in want if k not in state and not k.endswith(_OPTIONAL_BUFFERS)]
    unexpected = [k for k in state if k not in want and not k.endswith(_OPTIONAL_BUFFERS)]
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: {MODEL_FILE} does not fit {CONFIG_FILE} "
                              f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    for k, t in state.items():
        if k not in want:
            continue
        shape, dtype = want[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"{model_dir}: tensor {k!r} in {MODEL_FILE} is {t.dtype} {tuple(t.shape)}, "
                                  f"{CONFIG_FILE} needs {dtype} {shape} (edited config or weights?)")


def read_model_dir(model_dir, device="cpu") -> tuple[FlexOlmoLM, dict | None]:
    """Build the model from a directory, verifying every tensor. Returns (model, experts.json or None).

    Checks, each a CheckpointError naming the file: config bounds, weights that fit the config
    (shapes and dtypes, no cast), sha256 of every tensor, finite values, the tokenizer (recorded
    sha256, loads, round-trips), the public router row (finite, d_model wide)."""
    model_dir = Path(model_dir)
    recover_output(model_dir, wait=False)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    config = read_config(model_dir)
    state, meta = load_tensors(model_dir / MODEL_FILE)
    _fit_state(model_dir, config, state)
    check_finite(state, model_dir / MODEL_FILE)
    check_tokenizer_file(model_dir / TOKENIZER_FILE, meta.get(_TOKENIZER_KEY), config.vocab_size)
    row, _ = read_public_embedding(model_dir)
    if row.shape != (config.d_model,):
        raise CheckpointError(f"{model_dir / EMBEDDING_FILE}: the public router row has {row.numel()} values, "
                              f"d_model is {config.d_model}")
    model = FlexOlmoLM(config)
    own = model.state_dict()
    extra = {k: state.pop(k) for k in list(state) if k not in own}  # optional buffers the layer lacks
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for k, t in extra.items():  # copy them in when the layer has such a (non-persistent) buffer
            owner, _, attr = k.rpartition(".")
            try:
                buf = getattr(model.get_submodule(owner), attr, None)
            except AttributeError:
                buf = None
            if isinstance(buf, torch.Tensor) and buf.shape == t.shape and buf.dtype == t.dtype:
                buf.copy_(t)
            else:
                raise CheckpointError(f"{model_dir}: tensor {k!r} in {MODEL_FILE} does not fit the model")
    experts = read_json(model_dir / EXPERTS_FILE) if (model_dir / EXPERTS_FILE).exists() else None
    return model.to(device), experts
