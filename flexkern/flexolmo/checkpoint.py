"""Atomic, verified files: model directories (anchor or merged), JSON, safetensors with hashes.

Every write goes to a temporary name in the same folder and is moved into place with os.replace,
so a reader never sees a half-written file or directory. Model tensors are stored with their
sha256 in the safetensors metadata and checked on load.

A model directory holds:
    model.safetensors              full state dict (+ per-tensor sha256 in the metadata)
    config.json                    ModelConfig.to_dict()
    tokenizer.json                 the anchor's tokenizer
    public_embedding.safetensors   {"embedding": (D,)} the public router row (+ metadata "method")
    experts.json                   merged models only: {"experts": [names], "anchor_fingerprint": ...}
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import FlexOlmoLM, ModelConfig, tensor_sha256

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
EMBEDDING_FILE, EXPERTS_FILE = "public_embedding.safetensors", "experts.json"
_HASH_KEY = "tensor_sha256"


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp/mkdtemp create private (0600/0700) entries; published files get the usual modes.
_FILE_MODE, _DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, corrupt or inconsistent."""


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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary directory; on success it takes the place of ``path``.

    An existing ``path`` is moved aside first and deleted after the swap, so ``path`` is always
    either the old complete directory or the new complete one (never a mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


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
        expected = json.loads(meta[_HASH_KEY])
        if set(expected) != set(tensors):
            raise CheckpointError(f"{path}: tensor names do not match the recorded hashes")
        for k, t in tensors.items():
            if tensor_sha256(t) != expected[k]:
                raise CheckpointError(f"{path}: tensor {k!r} does not match its sha256 (corrupt file?)")
    meta.pop(_HASH_KEY, None)
    return tensors, meta


# ---- model directories ---------------------------------------------------------------------------------
def write_model_dir(out_dir, model: FlexOlmoLM, tokenizer_json: str | Path, public_embedding: torch.Tensor,
                    embed_method: str, experts: dict | None = None) -> Path:
    """Write a complete model directory atomically (see the module docstring)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / MODEL_FILE, model.state_dict())
        write_json(tmp / CONFIG_FILE, model.config.to_dict())
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
        save_tensors(tmp / EMBEDDING_FILE, {"embedding": public_embedding}, {"method": embed_method})
        if experts is not None:
            write_json(tmp / EXPERTS_FILE, experts)
    return out_dir


def read_config(model_dir) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_json(Path(model_dir) / CONFIG_FILE))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{model_dir}/{CONFIG_FILE}: {exc}") from None


def read_public_embedding(model_dir) -> tuple[torch.Tensor, str]:
    """(public router row (D,) float32, the embedding method that made it)."""
    tensors, meta = load_tensors(Path(model_dir) / EMBEDDING_FILE)
    if "embedding" not in tensors:
        raise CheckpointError(f"{model_dir}/{EMBEDDING_FILE} has no 'embedding' tensor")
    return tensors["embedding"], meta.get("method", "unknown")


def read_model_dir(model_dir, device="cpu") -> tuple[FlexOlmoLM, dict | None]:
    """Build the model from a directory, verifying every tensor. Returns (model, experts.json or None)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    config = read_config(model_dir)
    state, _ = load_tensors(model_dir / MODEL_FILE)
    model = FlexOlmoLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: weights do not fit config.json "
                              f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    experts = read_json(model_dir / EXPERTS_FILE) if (model_dir / EXPERTS_FILE).exists() else None
    return model.to(device), experts
