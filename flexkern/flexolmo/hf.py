"""FlexOlmo checkpoints in and out of Hugging Face transformers.

    export_hf(model_dir, out_dir)   flexkern model dir -> transformers checkpoint dir
        merged (MoE) -> FlexOlmoForCausalLM, dense anchor -> Olmo2ForCausalLM;
        AutoModelForCausalLM.from_pretrained(out_dir) gives flexkern's logits.
    import_hf(hf_dir, out_dir)      transformers checkpoint dir -> flexkern model dir (hf_import.py)
        FlexOlmoForCausalLM -> merged model (public expert = expert 0), so evaluate / opt-out /
        opt-in / package work on it; Olmo2ForCausalLM -> anchor (with a public router row), so
        owners train experts from a real OLMo-2.

The two models are the same network (both OLMo-2 style), mapped tensor by tensor (hf_format.py has
the table), grouped-query attention included (num_key_value_heads = n_kv_heads).

What does not map, and what is done about it:
- transformers' FlexOlmo router has no bias. flexkern adds min(b_e, 0) to the logit of every
  non-public expert; export refuses a model where any of those is below zero unless
  ``drop_router_bias=True`` (``router_bias_cost`` measures what dropping costs per domain).
  Import gives biases of 0 (the same routing).
- A mask (``expert_mask``, mask_mode "reroute") equals deleting the masked experts: export writes
  the model without them. The public expert 0 cannot be removed; "drop" masks do not map.
- RoPE tables: flexkern computes the angles in float64, transformers in float32; the logits
  differ by float32 rounding (what the tests bound), nothing systematic.
- A padded vocabulary (more embedding rows than tokenizer entries, as in the released FlexOlmo)
  imports with placeholder special tokens for the unused rows (flexkern's directories need one
  tokenizer entry per row); the tensors are unchanged.
- Import refuses what flexkern's model cannot express: attention biases, a head_dim other than
  hidden_size / heads, RoPE scaling, sliding windows, renormalised top-k, another activation, sizes
  beyond ModelConfig's bounds, missing, misshapen or unexpected tensors, NaN / infinite weights, a
  shard index naming files outside the folder or missing ones. Tied embeddings are copied into
  flexkern's separate LM head (same logits; they train apart afterwards).

Written folders are atomic and carry flexkern's artifact marker (kind "hf" for exports); an
existing output is replaced only with ``overwrite=True`` and only when flexkern wrote it.
``flexkern.json`` in an exported folder keeps the expert names (and experts.json's notes) so an
import restores them. Needs transformers>=5 for exports (``pip install flexkern[hf]``); imports read
the files directly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .checkpoint import EXPERTS_FILE, TOKENIZER_FILE, atomic_dir, read_json, save_tensors, write_json
from .hf_format import (  # noqa: F401  (flexkern_config is part of this module's surface)
    DTYPES, FLEXKERN_FILE, HF_KIND, INDEX_FILE, MAX_SHARD_BYTES, PROJ, WEIGHTS_FILE, HFFormatError,
    flexkern_config, hf_config_dict, shared_names)
from .hf_import import (  # noqa: F401  (the import side, re-exported: hf.import_hf, hf.load_hf, ...)
    IMPORT_FILE, PLACEHOLDER, HFCheckpoint, flexkern_state_dict, import_hf, load_hf, read_hf_tensors)
from .merge import PUBLIC, load_model
from .model import FlexOlmoLM, anchor_fingerprint
from .tokenizer import EOS_TOKEN, load_tokenizer

# ---- export ---------------------------------------------------------------------------------------------
def _kept_experts(model: FlexOlmoLM) -> list[int]:
    """Indices of the experts left active by the layers' masks (all layers must agree)."""
    layers = model.moe_layers()
    masks = {tuple(m.expert_mask.tolist()) for m in layers}
    if len(masks) != 1:
        raise HFFormatError("the MoE layers have different expert masks; a transformers FlexOlmo model has "
                            "the same experts in every layer")
    mask = masks.pop()
    if not all(mask):
        if any(m.mask_mode != "reroute" for m in layers):
            raise HFFormatError("mask_mode 'drop' has no transformers equivalent (only 'reroute' masks, which "
                                "equal deleting the expert, export)")
        if not mask[0]:
            raise HFFormatError("the public expert (0) is masked; it cannot be removed from the model")
    return [e for e, on in enumerate(mask) if on]


def negative_router_biases(model: FlexOlmoLM, names: list[str] | None = None,
                           experts: list[int] | None = None) -> dict[str, float]:
    """{"layer i / expert": min(b, 0)} for every non-public expert whose effective bias is < 0."""
    out = {}
    for i, m in enumerate(model.moe_layers()):
        eff = m.effective_bias()
        if eff is None:
            continue
        eff = eff.detach()
        for e in experts if experts is not None else range(m.num_experts):
            if e and float(eff[e]) < 0:
                out[f"layer {i} / {names[e] if names else e}"] = float(eff[e])
    return out


@torch.no_grad()
def hf_state_dict(model: FlexOlmoLM, experts: list[int] | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The transformers tensors of ``model`` (names as save_pretrained writes them), keeping
    ``experts`` (default: all) in order; router biases are left out (checked by the caller)."""
    cfg, state = model.config, model.state_dict()
    out = {hf: state[fk] for fk, hf in shared_names(cfg.n_layers).items()}
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}.mlp"
        if cfg.num_experts:
            ffn = block.ffn
            keep = list(range(ffn.num_experts)) if experts is None else experts
            out[f"{pre}.gate.weight"] = ffn.router.weight[keep]
            for j, e in enumerate(keep):
                for p in PROJ:
                    out[f"{pre}.experts.{j}.{p}.weight"] = getattr(ffn.experts, p)[e]
        else:
            for p in PROJ:
                out[f"{pre}.{p}.weight"] = getattr(block.ffn, p).weight
    return {k: v.detach().to(dtype or v.dtype).contiguous().clone() for k, v in out.items()}


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or shards + index when larger than ``max_shard_bytes`` (as transformers)."""
    meta = {"format": "pt"}
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        b = t.numel() * t.element_size()
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + b
    shards.append(cur)
    if len(shards) == 1:
        save_tensors(folder / WEIGHTS_FILE, shards[0], meta)
        return
    n, weight_map = len(shards), {}
    for s, shard in enumerate(shards, 1):
        name = f"model-{s:05d}-of-{n:05d}.safetensors"
        save_tensors(folder / name, shard, meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_tokenizer(folder: Path, tokenizer_json: Path, seq_len: int) -> int:
    """tokenizer.json (flexkern's file as is) + the configs AutoTokenizer reads. Returns EOS's id."""
    eos = load_tokenizer(tokenizer_json).token_to_id(EOS_TOKEN)
    shutil.copyfile(tokenizer_json, folder / TOKENIZER_FILE)
    write_json(folder / "tokenizer_config.json",
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": None,
                "pad_token": None, "unk_token": None, "model_max_length": seq_len,
                "clean_up_tokenization_spaces": False, "add_prefix_space": False})
    write_json(folder / "special_tokens_map.json", {"eos_token": EOS_TOKEN})
    return eos


def export_model(model: FlexOlmoLM, tokenizer_json, out_dir, *, names: list[str] | None = None,
                 notes: dict | None = None, drop_router_bias: bool = False, overwrite: bool = False,
                 dtype: torch.dtype | str | None = None, inputs=(), max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` as a transformers checkpoint folder (see the module docstring).

    ``names``: expert names (default public, expert_1, ...); masked experts are left out.
    ``dtype``: of the written weights (default the model's). Returns ``out_dir``."""
    from transformers import FlexOlmoConfig, GenerationConfig, Olmo2Config

    if not isinstance(model, FlexOlmoLM):
        raise TypeError(f"export_model expects a FlexOlmoLM, got {type(model).__name__}")
    cfg = model.config
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype or model.lm_head.weight.dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    info = {"format": "flexkern-hf-export", "version": 1, "anchor_fingerprint": anchor_fingerprint(model)}
    if cfg.num_experts:
        names = list(names) if names is not None else [PUBLIC] + [f"expert_{e}" for e in range(1, cfg.num_experts)]
        if len(names) != cfg.num_experts:
            raise ValueError(f"names has {len(names)} entries for {cfg.num_experts} experts")
        keep = _kept_experts(model)
        if len(keep) < cfg.top_k:
            raise HFFormatError(f"{len(keep)} active experts are fewer than top_k={cfg.top_k}")
        biased = negative_router_biases(model, names, keep)
        if biased and not drop_router_bias:
            worst = sorted(biased.items(), key=lambda kv: kv[1])[:4]
            raise HFFormatError(
                f"{len(biased)} router biases are below zero (e.g. {', '.join(f'{k}: {v:.3g}' for k, v in worst)}); "
                "transformers' FlexOlmo router has no bias, so the exported model would route differently. "
                "Pass drop_router_bias=True (--drop-router-bias) to export without them; "
                "router_bias_cost() measures what that costs per domain")
        out_cfg = FlexOlmoConfig(**dict(hf_config_dict(cfg, 0, dtype), num_experts=len(keep)))
        info.update(experts=[names[e] for e in keep], dropped_router_bias=biased, removed=[names[e] for e in range(
            cfg.num_experts) if e not in keep])
    else:
        keep = None
        out_cfg = Olmo2Config(**hf_config_dict(cfg, 0, dtype))
    info["notes"] = notes or {}
    tensors = hf_state_dict(model, keep, dtype)
    with atomic_dir(out_dir, kind=HF_KIND, overwrite=overwrite, inputs=inputs) as tmp:
        eos = _write_tokenizer(tmp, Path(tokenizer_json), cfg.seq_len)
        out_cfg.eos_token_id = eos
        out_cfg.architectures = ["FlexOlmoForCausalLM" if cfg.num_experts else "Olmo2ForCausalLM"]
        out_cfg.save_pretrained(tmp)
        GenerationConfig(eos_token_id=eos, bos_token_id=None, pad_token_id=None).save_pretrained(tmp)
        _write_weights(tmp, tensors, max_shard_bytes)
        write_json(tmp / FLEXKERN_FILE, info)
    return Path(out_dir)


def export_hf(model_dir, out_dir, *, opt_out=(), drop_router_bias: bool = False, overwrite: bool = False,
              dtype: torch.dtype | str | None = None) -> Path:
    """Export a flexkern model directory (merged or anchor); ``opt_out``: expert names to leave out
    (as masking them). ``dtype`` defaults to the dtype an imported model came in, else float32."""
    model, names = load_model(model_dir)
    d = Path(model_dir)  # a merged model's notes are in experts.json, an imported anchor's in hf_import.json
    notes_file = d / EXPERTS_FILE if (d / EXPERTS_FILE).exists() else d / IMPORT_FILE
    experts_info = read_json(notes_file) if notes_file.exists() else {}
    if not isinstance(experts_info, dict):
        raise HFFormatError(f"{notes_file}: expected a JSON object, got {type(experts_info).__name__}")
    if isinstance(opt_out, str):
        opt_out = [opt_out]
    if opt_out:
        from .merge import mask_experts

        if PUBLIC in opt_out:
            raise HFFormatError("the public expert cannot be opted out")
        mask_experts(model, list(opt_out), names)
    if dtype is None:
        dtype = (experts_info.get("hf_import") or {}).get("dtype")
    notes = {k: v for k, v in experts_info.items() if k not in ("experts", "anchor_fingerprint")}
    if isinstance(notes.get("packages"), dict):  # summaries of the experts that stay
        notes["packages"] = {k: v for k, v in notes["packages"].items() if k not in opt_out}
    return export_model(model, Path(model_dir) / TOKENIZER_FILE, out_dir, names=names, notes=notes,
                        drop_router_bias=drop_router_bias, overwrite=overwrite, dtype=dtype, inputs=[model_dir])


# ---- what dropping the router bias costs ----------------------------------------------------------------
@torch.no_grad()
def router_bias_cost(model: FlexOlmoLM, streams: dict[str, torch.Tensor], seq_len: int | None = None,
                     max_tokens: int | None = None) -> dict[str, dict[str, float]]:
    """{domain: {"with_bias", "without_bias", "delta"}} held-out loss (nats/token) of ``model``
    with its router biases and with them set to zero (what a transformers export computes)."""
    from .evaluate import domain_losses

    seq_len = seq_len or model.config.seq_len
    with_bias = domain_losses(model, streams, seq_len, max_tokens)
    saved = [(m.router.bias, m.router.bias.detach().clone()) for m in model.moe_layers() if m.router.bias is not None]
    try:
        for b, _ in saved:
            b.zero_()
        without = domain_losses(model, streams, seq_len, max_tokens)
    finally:
        for b, old in saved:
            b.copy_(old)
    return {d: {"with_bias": with_bias[d], "without_bias": without[d], "delta": without[d] - with_bias[d]}
            for d in streams}


def router_bias_cost_dir(model_dir, sources, max_bytes: int | None = None, max_tokens: int | None = 20_000,
                         seq_len: int | None = None) -> dict[str, dict[str, float]]:
    """``router_bias_cost`` of a model directory on the held-out documents of ``sources`` (domain
    names or folders of text files, split as for training)."""
    from .evaluate import heldout_streams

    model, _ = load_model(model_dir)
    tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
    streams = heldout_streams(tok, list(sources), max_bytes)
    return router_bias_cost(model, streams, seq_len, max_tokens)


def format_bias_cost(cost: dict[str, dict[str, float]]) -> str:
    """A small table of ``router_bias_cost``'s result (loss in nats/token, + = worse without bias)."""
    w = max([len("domain")] + [len(d) for d in cost])
    lines = [f"{'domain':<{w}}  with bias  without  change", f"{'-' * w}  ---------  -------  ------"]
    for d, c in cost.items():
        lines.append(f"{d:<{w}}  {c['with_bias']:9.4f}  {c['without_bias']:7.4f}  {c['delta']:+.4f}")
    return "\n".join(lines)
