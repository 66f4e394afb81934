"""Merge: anchor + expert packages -> one n-expert FlexOlmo model; opt-out and opt-in.

The merged model's MoE layer i has
    experts  [public FFN (the anchor's dense FFN of layer i), owner_1 FFN, ..., owner_n FFN]
    router   rows [r_pub; r_1; ...; r_n],  bias [0 (unused for expert 0); b_1; ...; b_n]
and every shared tensor (embeddings, attention, norms, LM head) is the anchor's. No training.

A package only fits when its anchor fingerprint, dense config and public router row are the
anchor's; names must be unique, and the same expert cannot be merged twice. Anything else raises
``MergeError`` naming the package and the problem.

Every writer here (merge, opt_out, opt_in) takes ``overwrite=False``: the output must be a new
path or an empty folder, or, with ``overwrite=True``, an existing flexkern merged model; an output
equal to, inside or containing an input is refused before any work (checkpoint.py's rules).

Opt-out two ways, with the same outputs: ``mask_experts`` (inference-time mask; the softmax skips
the expert) or ``opt_out`` (a new checkpoint without the expert's weights).

The inverse of merge: ``extract_package`` writes one owner expert of a merged model (e.g. a released
2-expert owner model read with import_hf) as a package, recording what merge checks: the model's
anchor fingerprint, dense config, public router row, tokenizer, and the sha256 of its public expert
(``public_expert_sha256``), which must then be the anchor's dense FFN. A model whose layers' public
router rows are not all its public row (router-tuned) is refused: its owner rows were fitted against
other public rows, so on the anchor they would route differently.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, EMBEDDING_FILE, TOKENIZER_FILE, claim_output, file_sha256,
                         read_model_dir, read_public_embedding, write_model_dir)
from .model import FlexOlmoLM, ModelConfig, anchor_fingerprint, shared_state_dict, tensor_sha256
from .package import KIND as PACKAGE_KIND
from .package import PARTS, PackageError, check_name, load_package, package_path, save_package

KIND = "merged"

PUBLIC = "public"


class MergeError(ValueError):
    """Packages and models that cannot be combined (the message names the problem)."""


# ---- expert tensors in package layout ------------------------------------------------------------------
@torch.no_grad()
def dense_expert_tensors(anchor: FlexOlmoLM, router_row_D: torch.Tensor) -> dict[str, torch.Tensor]:
    """The anchor's dense FFNs as one expert in package layout (bias 0)."""
    if anchor.moe_layers():
        raise ValueError("expected the dense anchor model")
    out = {}
    for i, block in enumerate(anchor.blocks):
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[f"layers.{i}.{p}"] = getattr(block.ffn, p).weight.detach().clone()
        out[f"layers.{i}.router_row"] = router_row_D.detach().to(block.ffn.gate_proj.weight).clone()
        out[f"layers.{i}.router_bias"] = torch.zeros((), dtype=block.ffn.gate_proj.weight.dtype)
    return out


@torch.no_grad()
def expert_tensors(model: FlexOlmoLM, index: int) -> dict[str, torch.Tensor]:
    """Expert ``index`` of an MoE model in package layout (CPU copies)."""
    out = {}
    for i, m in enumerate(model.moe_layers()):
        out[f"layers.{i}.gate_proj"] = m.experts.gate_proj[index]
        out[f"layers.{i}.up_proj"] = m.experts.up_proj[index]
        out[f"layers.{i}.down_proj"] = m.experts.down_proj[index]
        out[f"layers.{i}.router_row"] = m.router.weight[index]
        out[f"layers.{i}.router_bias"] = m.router.bias[index]
    if not out:
        raise ValueError("expected an MoE model")
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def public_expert_sha256(expert: dict[str, torch.Tensor]) -> str:
    """sha256 over the FFN tensors (names and bytes, router parts left out) of an expert in package
    layout: the public expert an extracted package ran beside, which merge compares with the anchor's."""
    h = hashlib.sha256()
    for k in sorted(expert):
        if not k.endswith(("router_row", "router_bias")):
            h.update(f"{k}|{expert[k].dtype}|{tensor_sha256(expert[k])}|".encode())
    return h.hexdigest()


@torch.no_grad()
def assemble(anchor: FlexOlmoLM, experts: list[dict[str, torch.Tensor]], top_k: int) -> FlexOlmoLM:
    """MoE model with the anchor's shared weights and ``experts`` (package layout) in order."""
    ref = anchor.lm_head.weight
    model = FlexOlmoLM(anchor.config.dense().with_experts(len(experts), top_k)).to(ref.device, ref.dtype)
    result = model.load_state_dict(shared_state_dict(anchor), strict=False)
    if result.unexpected_keys:
        raise MergeError(f"anchor has unexpected tensors {result.unexpected_keys[:4]}")
    for i, m in enumerate(model.moe_layers()):
        def stack(part):
            return torch.stack([e[f"layers.{i}.{part}"].to(ref.device, ref.dtype) for e in experts])
        m.experts.gate_proj.copy_(stack("gate_proj"))
        m.experts.up_proj.copy_(stack("up_proj"))
        m.experts.down_proj.copy_(stack("down_proj"))
        m.router.weight.copy_(stack("router_row"))
        m.router.bias.copy_(stack("router_bias"))
        m.router.bias[0] = 0.0  # the public expert has no bias
    return model


# ---- loading ----------------------------------------------------------------------------------------------
def load_model(model_dir, device="cpu") -> tuple[FlexOlmoLM, list[str]]:
    """Load an anchor (dense) or merged directory, verifying hashes.

    Returns (model in eval mode, expert names in order: ["public", owner names...]; a dense
    anchor gives ["public"], its single FFN)."""
    model, names, _ = _load(model_dir, device)
    return model, names


def _load(model_dir, device="cpu") -> tuple[FlexOlmoLM, list[str], dict]:
    model, info = read_model_dir(model_dir, device)
    if model.moe_layers():
        names = _check_experts_json(Path(model_dir) / "experts.json", info, model)
    else:
        names, info = [PUBLIC], {}
    return model.eval(), names, info


def _check_experts_json(path: Path, info, model: FlexOlmoLM) -> list[str]:
    """experts.json of a merged model: {"experts": ["public", names...], "anchor_fingerprint", "packages"}."""
    if info is None:
        raise CheckpointError(f"{path.parent}: MoE checkpoint without experts.json")
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
    names = info.get("experts")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: field 'experts' must be a list of expert names, got {names!r:.80}")
    if len(names) != model.config.num_experts:
        raise CheckpointError(f"{path}: field 'experts' names {len(names)} experts, "
                              f"the model has {model.config.num_experts}")
    if names[0] != PUBLIC or len(set(names)) != len(names):
        raise CheckpointError(f"{path}: field 'experts' must start with {PUBLIC!r} and name each expert once")
    for n in names[1:]:
        try:
            check_name(n)
        except PackageError as exc:
            raise CheckpointError(f"{path}: field 'experts': {exc}") from None
    fp = info.get("anchor_fingerprint")
    if fp is not None and fp != anchor_fingerprint(model):
        raise CheckpointError(f"{path}: field 'anchor_fingerprint' does not match the model's shared weights")
    if not isinstance(info.get("packages", {}), dict):
        raise CheckpointError(f"{path}: field 'packages' must be an object")
    return list(names)


def _tokenizer_sha(model_dir) -> str:
    """sha256 of a model directory's tokenizer.json (read_model_dir verified it against the record)."""
    return file_sha256(Path(model_dir) / TOKENIZER_FILE)


def _check_package(path, tensors, manifest, anchor_fp: str, dense_cfg: ModelConfig, public_sha: str,
                   tokenizer_sha: str | None = None, public_ffn_sha: str | None = None) -> None:
    name = manifest["name"]
    if manifest.get("anchor_fingerprint") != anchor_fp:
        raise MergeError(f"package {name!r} ({path}) was trained from a different anchor: its anchor "
                         f"fingerprint {str(manifest.get('anchor_fingerprint'))[:12]}... != {anchor_fp[:12]}...")
    if ModelConfig.from_dict(manifest["config"]) != dense_cfg:
        raise MergeError(f"package {name!r} ({path}) has model config {manifest['config']}, "
                         f"the anchor has {dense_cfg.to_dict()}")
    if manifest.get("public_row_sha256") != public_sha:
        raise MergeError(f"package {name!r} ({path}) was trained against a different public router row "
                         "(public_embedding.safetensors differs)")
    pkg_tok = manifest.get("tokenizer_sha256")
    if pkg_tok is not None and tokenizer_sha is not None and pkg_tok != tokenizer_sha:
        raise MergeError(f"package {name!r} ({path}) was trained with another tokenizer than the model's "
                         f"{TOKENIZER_FILE} (sha256 {pkg_tok[:12]}... != {tokenizer_sha[:12]}...)")
    pkg_pub = manifest.get("public_expert_sha256")
    if pkg_pub is not None and public_ffn_sha is not None and pkg_pub != public_ffn_sha:
        raise MergeError(f"package {name!r} ({path}) was taken from a model whose public expert (FFN) is not "
                         "this model's public FFN; its expert ran beside another public expert")


def _read_packages(paths, anchor_fp, dense_cfg, public_sha, taken_names, taken_hashes, tokenizer_sha=None,
                   public_ffn_sha=None):
    out = []
    for path in paths:
        try:
            tensors, manifest = load_package(path)
        except PackageError as exc:
            raise MergeError(f"cannot merge: {exc}") from None
        _check_package(path, tensors, manifest, anchor_fp, dense_cfg, public_sha, tokenizer_sha, public_ffn_sha)
        name = manifest["name"]
        if name in taken_names:
            raise MergeError(f"duplicate expert name {name!r} ({path}); each expert is merged once")
        digest = tuple(sorted((k, v["sha256"]) for k, v in manifest["tensors"].items()))
        if digest in taken_hashes:
            raise MergeError(f"package {name!r} ({path}) holds the same weights as expert "
                             f"{taken_hashes[digest]!r}; the same expert cannot be merged twice")
        taken_names.add(name)
        taken_hashes[digest] = name
        out.append((name, tensors, manifest))
    return out


def _public_sha(model_dir) -> tuple[torch.Tensor, str, str]:
    row, method = read_public_embedding(model_dir)
    return row, method, tensor_sha256(row.float())


def _summary(manifest) -> dict:
    return {k: manifest.get(k) for k in ("name", "source", "tokens_seen", "steps", "embed_method")}


def merge(anchor_dir, package_paths, out_dir, top_k: int | None = None, *, overwrite: bool = False) -> Path:
    """Write the merged model (anchor + packages) to ``out_dir``; top_k defaults to min(2, n+1)."""
    if isinstance(package_paths, (str, Path)):
        package_paths = [package_paths]
    package_paths = [Path(p) for p in package_paths]
    if not package_paths:
        raise MergeError("merge needs at least one expert package")
    inputs = [anchor_dir, *package_paths]
    with claim_output(out_dir, KIND, overwrite=overwrite, inputs=inputs):
        anchor, names = load_model(anchor_dir)
        if anchor.moe_layers():
            raise MergeError(f"{anchor_dir} is already a merged model; use opt_in to add packages")
        fp = anchor_fingerprint(anchor)
        public_row, method, public_sha = _public_sha(anchor_dir)
        pkgs = _read_packages(package_paths, fp, anchor.config, public_sha, set(), {}, _tokenizer_sha(anchor_dir),
                              public_expert_sha256(dense_expert_tensors(anchor, public_row)))
        E = len(pkgs) + 1
        top_k = min(2, E) if top_k is None else top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
            raise MergeError(f"top_k must be an int in [1, {E}], got {top_k!r}")
        experts = [dense_expert_tensors(anchor, public_row)] + [t for _, t, _ in pkgs]
        model = assemble(anchor, experts, top_k)
        info = {"experts": [PUBLIC] + [n for n, _, _ in pkgs], "anchor_fingerprint": fp,
                "packages": {n: _summary(m) for n, _, m in pkgs}}
        return write_model_dir(out_dir, model, Path(anchor_dir) / TOKENIZER_FILE, public_row, method, info,
                               overwrite=overwrite, inputs=inputs)


def opt_out(model_dir, name: str, out_dir, *, overwrite: bool = False) -> Path:
    """Write a copy of a merged model without expert ``name`` (its weights are gone from the file)."""
    with claim_output(out_dir, KIND, overwrite=overwrite, inputs=[model_dir]):
        model, names, info = _load(model_dir)
        if not model.moe_layers():
            raise MergeError(f"{model_dir} is a dense model; there is no expert to opt out")
        if name == PUBLIC:
            raise MergeError("the public expert cannot be opted out")
        if name not in names:
            raise MergeError(f"no expert named {name!r} in {model_dir}; experts: {names}")
        index = names.index(name)
        E = len(names) - 1
        model.set_top_k(min(model.config.top_k, E))
        for m in model.moe_layers():
            m.remove_expert(index)
        model.config = model.config.with_experts(E, model.config.top_k)
        info = dict(info, experts=[n for n in names if n != name])
        info["packages"] = {k: v for k, v in info.get("packages", {}).items() if k != name}
        public_row, method, _ = _public_sha(model_dir)
        return write_model_dir(out_dir, model, Path(model_dir) / TOKENIZER_FILE, public_row, method, info,
                               overwrite=overwrite, inputs=[model_dir])


def opt_in(model_dir, package_path, out_dir, *, overwrite: bool = False) -> Path:
    """Write a copy of a merged (or dense anchor) model with one more expert from a package."""
    inputs = [model_dir, package_path]
    with claim_output(out_dir, KIND, overwrite=overwrite, inputs=inputs):
        model, names, info = _load(model_dir)
        if not model.moe_layers():
            return merge(model_dir, [package_path], out_dir, overwrite=overwrite)
        fp = anchor_fingerprint(model)
        public_row, method, public_sha = _public_sha(model_dir)
        taken = {}
        for e in range(1, len(names)):  # existing experts, to refuse merging one twice
            t = expert_tensors(model, e)
            taken[tuple(sorted((k, tensor_sha256(v)) for k, v in t.items()))] = names[e]
        [(name, tensors, manifest)] = _read_packages([Path(package_path)], fp, model.config.dense(), public_sha,
                                                      set(names), taken, _tokenizer_sha(model_dir),
                                                      public_expert_sha256(expert_tensors(model, 0)))
        for i, m in enumerate(model.moe_layers()):
            m.add_expert(*(tensors[f"layers.{i}.{p}"] for p in PARTS))
        model.config = model.config.with_experts(len(names) + 1, model.config.top_k)
        info = dict(info, experts=names + [name])
        info["packages"] = dict(info.get("packages", {}), **{name: _summary(manifest)})
        return write_model_dir(out_dir, model, Path(model_dir) / TOKENIZER_FILE, public_row, method, info,
                               overwrite=overwrite, inputs=inputs)


def mask_experts(model: FlexOlmoLM, names_to_mask, expert_names: list[str]) -> torch.Tensor:
    """Opt out at inference: mask the named experts in every layer. Returns the mask (E,) bool."""
    if isinstance(names_to_mask, str):
        names_to_mask = [names_to_mask]
    unknown = [n for n in names_to_mask if n not in expert_names]
    if unknown:
        raise MergeError(f"unknown experts {unknown}; experts: {expert_names}")
    mask_E = torch.tensor([n not in names_to_mask for n in expert_names], dtype=torch.bool)
    model.set_expert_mask(mask_E)
    return mask_E


def extract_package(model_dir, expert: str, out_path, *, name: str | None = None, overwrite: bool = False) -> Path:
    """Write owner expert ``expert`` of a merged model directory as a package (module docstring);
    ``name``: the package's expert name (default ``expert``); ``out_path``: the ``.flexpert``
    folder, or a folder to put ``NAME.flexpert`` in. Returns the package path."""
    from .commands import expert_names

    names = expert_names(model_dir)  # cheap checks first (experts.json only): nothing is written when they fail
    if len(names) == 1:
        raise MergeError(f"{model_dir} is a dense model (an anchor); it holds no owner expert to package")
    if expert == PUBLIC:
        raise MergeError("the public expert is the anchor's FFN, not a package; merge takes it from --anchor")
    if expert not in names:
        raise MergeError(f"no expert named {expert!r} in {model_dir}; experts: {names}")
    name = check_name(expert if name is None else name)
    out = package_path(out_path, name)
    with claim_output(out, PACKAGE_KIND, overwrite=overwrite, inputs=[model_dir]):
        model, names, info = _load(model_dir)
        row, method, public_sha = _public_sha(model_dir)
        for i, m in enumerate(model.moe_layers()):
            if not torch.equal(m.router.weight[0].detach().float().cpu(), row):
                raise MergeError(f"{model_dir}: the public router row of layer {i} is not the model's public row "
                                 f"({EMBEDDING_FILE}), as after router tuning; its owner rows were fitted against "
                                 "other public rows, so a package of them would route differently on the anchor")
        summary = (info.get("packages") or {}).get(expert) or {}
        manifest = {"name": name, "source": f"expert {expert!r} of {model_dir}", "config": model.config.dense().to_dict(),
                    "anchor_fingerprint": anchor_fingerprint(model), "public_row_sha256": public_sha,
                    "embed_method": method, "tokenizer_sha256": _tokenizer_sha(model_dir),
                    "public_expert_sha256": public_expert_sha256(expert_tensors(model, 0)),
                    "training": "extracted from a merged model"}
        for k in ("tokens_seen", "steps"):  # what the model recorded of the package it came from
            if isinstance(summary.get(k), int) and not isinstance(summary.get(k), bool) and summary[k] >= 0:
                manifest[k] = summary[k]
        return save_package(out, expert_tensors(model, names.index(expert)), manifest, overwrite=overwrite,
                            inputs=[model_dir])
