"""Expert packages: exactly what one data owner contributes, and nothing of its data.

A package is a folder ``NAME.flexpert/`` with
    expert.safetensors   per layer i (F ffn width, D d_model):
                             layers.{i}.gate_proj (F, D)   layers.{i}.up_proj (F, D)
                             layers.{i}.down_proj (D, F)   layers.{i}.router_row (D,)
                             layers.{i}.router_bias ()     (applied as min(b, 0))
    manifest.json        format, format_version, name, source, tokens_seen, steps, config (the
                         anchor's dense ModelConfig), anchor_fingerprint, public_row_sha256 (the
                         frozen public router row the owner trained against), embed_method,
                         tensors: {name: {sha256, shape, dtype}}; a package extracted from a
                         merged model also public_expert_sha256 (merge.extract_package)
    .flexkern-artifact   the marker (kind "package"; see checkpoint.py for the output rules)
The folder is written atomically. On load, before any tensor data is read: the manifest's structure
and every field (the config against ModelConfig's bounds, the tensor table's names, shapes and one
floating dtype); then the safetensors header against the table (no cast); then every tensor's
sha256 and finite values. Any problem is a PackageError naming the file and the field.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, atomic_dir, atomic_path, check_finite, read_json, recover_output, write_json
from .model import SIZE_FIELDS, ModelConfig, tensor_sha256

FORMAT, FORMAT_VERSION = "flexkern-expert", 1
SUFFIX = ".flexpert"
KIND = "package"
TENSOR_FILE, MANIFEST_FILE = "expert.safetensors", "manifest.json"
PARTS = ("gate_proj", "up_proj", "down_proj", "router_row", "router_bias")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# optional manifest fields and their JSON types (bool is not an int here)
_OPTIONAL = {"source": str, "tokens_seen": int, "steps": int, "public_row_sha256": str, "embed_method": str,
             "tokenizer_sha256": str, "training": str, "public_expert_sha256": str}


class PackageError(ValueError):
    """An expert package is missing, corrupt, or does not fit."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "public":
        raise PackageError(f"invalid expert name {name!r}: use letters, digits, '_', '-', '.' "
                           "(at most 64 characters, not 'public')")
    return name


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, Fw = config.d_model, config.d_ff
    shapes = {"gate_proj": (Fw, D), "up_proj": (Fw, D), "down_proj": (D, Fw), "router_row": (D,), "router_bias": ()}
    return {f"layers.{i}.{p}": shapes[p] for i in range(config.n_layers) for p in PARTS}


def _check_names_shapes(shapes: dict[str, tuple], want: dict[str, tuple], where: str) -> None:
    if set(shapes) != set(want):
        missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
        raise PackageError(f"{where}: tensors do not match the model config "
                           f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for k, shape in shapes.items():
        if tuple(shape) != want[k]:
            raise PackageError(f"{where}: tensor {k!r} has shape {tuple(shape)}, expected {want[k]}")


def _check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    _check_names_shapes({k: tuple(t.shape) for k, t in tensors.items()}, expected_shapes(config), where)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
        raise PackageError(f"{where}: tensors must share one dtype of {sorted(DTYPES)}, got {sorted(map(str, dtypes))}")
    check_finite(tensors, where, PackageError)


def _config(d, where: str) -> ModelConfig:
    try:
        config = ModelConfig.from_dict(d, require=SIZE_FIELDS)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{where}: field 'config': {exc}") from None
    if config.num_experts:
        raise PackageError(f"{where}: field 'config': a package records the anchor's dense config "
                           f"(num_experts 0), got num_experts={config.num_experts}")
    return config


def save_package(path, tensors: dict[str, torch.Tensor], manifest: dict, *, overwrite: bool = False,
                 inputs=()) -> Path:
    """Write a package folder atomically. ``manifest`` needs name and config (a dict); the tensor
    table and format fields are filled in here. Returns the package path.

    ``path`` must be free, an empty folder, or (``overwrite=True``) a flexkern package; ``inputs``
    are paths it must not overlap. Refuses NaN/inf tensors."""
    path = Path(path)
    if not isinstance(manifest, dict):
        raise PackageError(f"package manifest must be a dict, got {type(manifest).__name__}")
    manifest = copy.deepcopy(manifest)
    for key in ("name", "config", "anchor_fingerprint"):
        if key not in manifest:
            raise PackageError(f"package manifest needs {key!r}")
    check_name(manifest["name"])
    config = _config(manifest["config"], str(path))
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _check_tensors(cpu, config, str(path))
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, tensors={
        k: {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, t in sorted(cpu.items())
    })
    _check_manifest(manifest, str(path / MANIFEST_FILE))
    with atomic_dir(path, kind=KIND, overwrite=overwrite, inputs=inputs) as tmp:
        with atomic_path(tmp / TENSOR_FILE) as f:
            save_file(cpu, str(f))
        write_json(tmp / MANIFEST_FILE, manifest)
    return path


def _check_manifest(manifest, where: str) -> tuple[ModelConfig, dict]:
    """Validate a manifest's structure and fields; returns (config, tensor table)."""
    if not isinstance(manifest, dict):
        raise PackageError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{where}: not an expert package (field 'format' is {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION or isinstance(manifest.get("format_version"), bool):
        raise PackageError(f"{where}: package format version {manifest.get('format_version')!r} is not "
                           f"supported (this flexkern reads version {FORMAT_VERSION})")
    try:
        check_name(manifest.get("name"))
    except PackageError as exc:
        raise PackageError(f"{where}: field 'name': {exc}") from None
    if "config" not in manifest:
        raise PackageError(f"{where}: missing field 'config' (the anchor's model config)")
    config = _config(manifest["config"], where)
    fp = manifest.get("anchor_fingerprint")
    if not isinstance(fp, str) or not _SHA_RE.match(fp):
        raise PackageError(f"{where}: field 'anchor_fingerprint' must be a sha256 hex string, got {fp!r:.80}")
    for key, typ in _OPTIONAL.items():
        v = manifest.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0)):
            raise PackageError(f"{where}: field {key!r} must be a{' non-negative' if typ is int else ''} "
                               f"{typ.__name__}, got {v!r:.80}")
    table = manifest.get("tensors")
    if not isinstance(table, dict):
        raise PackageError(f"{where}: field 'tensors' must be an object {{name: {{sha256, shape, dtype}}}}, "
                           f"got {type(table).__name__}")
    want = expected_shapes(config)
    shapes, dtypes = {}, set()
    for k, entry in table.items():
        if not isinstance(entry, dict):
            raise PackageError(f"{where}: field 'tensors.{k}' must be an object, got {type(entry).__name__}")
        sha, shape, dtype = entry.get("sha256"), entry.get("shape"), entry.get("dtype")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise PackageError(f"{where}: field 'tensors.{k}.sha256' must be a sha256 hex string")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise PackageError(f"{where}: field 'tensors.{k}.shape' must be a list of ints, got {shape!r:.80}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise PackageError(f"{where}: field 'tensors.{k}.dtype' must be one of {sorted(DTYPES)}, got {dtype!r:.80}")
        shapes[k], dtypes = tuple(shape), dtypes | {dtype}
    _check_names_shapes(shapes, want, f"{where} (field 'tensors')")
    if len(dtypes) != 1:
        raise PackageError(f"{where}: field 'tensors': all tensors must share one dtype, got {sorted(dtypes)}")
    return config, table


def load_package(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a package: (tensors, manifest). Raises PackageError on any mismatch."""
    path = Path(path)
    try:
        recover_output(path, wait=False)
    except (CheckpointError, OSError) as exc:
        raise PackageError(f"{path}: an interrupted write could not be recovered: {exc}") from None
    if not path.is_dir():
        raise PackageError(f"expert package {path} does not exist (expected a folder NAME{SUFFIX})")
    try:
        manifest = read_json(path / MANIFEST_FILE)
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    config, table = _check_manifest(manifest, str(path / MANIFEST_FILE))
    tensor_file = path / TENSOR_FILE
    if not tensor_file.is_file():
        raise PackageError(f"{path}: missing {TENSOR_FILE}")
    dtype = DTYPES[next(iter(table.values()))["dtype"]]
    try:
        with safe_open(str(tensor_file), framework="pt") as f:
            keys = list(f.keys())
            if set(keys) != set(table):
                raise PackageError(f"{tensor_file}: holds other tensors than the manifest lists")
            for k in keys:  # the header against the manifest, before any data is read
                sl = f.get_slice(k)
                shape, got = tuple(sl.get_shape()), sl.get_dtype()
                if shape != tuple(table[k]["shape"]):
                    raise PackageError(f"{tensor_file}: tensor {k!r} has shape {shape}, the manifest says "
                                       f"{tuple(table[k]['shape'])}")
                if got != {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]:
                    raise PackageError(f"{tensor_file}: tensor {k!r} is stored as {got}, the manifest says "
                                       f"{table[k]['dtype']} (refused, not cast)")
            tensors = {k: f.get_tensor(k) for k in keys}
    except PackageError:
        raise
    except Exception as exc:
        raise PackageError(f"{path}: cannot read {TENSOR_FILE}: {exc}") from None
    for k, t in tensors.items():
        if tensor_sha256(t) != table[k]["sha256"]:
            raise PackageError(f"{path}: tensor {k!r} does not match its sha256 in the manifest "
                               "(the package was modified or corrupted)")
    _check_tensors(tensors, config, str(tensor_file))
    return tensors, manifest


def package_path(out_path, name: str) -> Path:
    """``out_path`` itself when it ends in .flexpert, else ``out_path/NAME.flexpert``."""
    out_path = Path(out_path)
    return out_path if out_path.name.endswith(SUFFIX) else out_path / f"{name}{SUFFIX}"
