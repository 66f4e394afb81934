"""FlexOlmo checkpoints in and out of Hugging Face transformers.

    export_hf(model_dir, out_dir)   flexkern model dir -> transformers checkpoint dir
        merged (MoE) -> FlexOlmoForCausalLM, dense anchor -> Olmo2ForCausalLM;
        AutoModelForCausalLM.from_pretrained(out_dir) gives flexkern's logits.
    import_hf(hf_dir, out_dir)      transformers FlexOlmoForCausalLM dir -> flexkern merged model dir
        (public expert = expert 0), so evaluate / opt-out / opt-in / packages work on it.

The two models are the same network (both OLMo-2 style), mapped tensor by tensor:
    flexkern                              transformers (on disk, as save_pretrained writes it)
    embed.weight                          model.embed_tokens.weight
    blocks.i.attn.{q,k,v,o}_proj.weight   model.layers.i.self_attn.{q,k,v,o}_proj.weight
    blocks.i.attn.{q,k}_norm.weight       model.layers.i.self_attn.{q,k}_norm.weight  (QK-norm over all heads)
    blocks.i.attn_norm.weight             model.layers.i.post_attention_layernorm.weight  (post-norm)
    blocks.i.ffn_norm.weight              model.layers.i.post_feedforward_layernorm.weight
    final_norm.weight / lm_head.weight    model.norm.weight / lm_head.weight  (untied)
    MoE: blocks.i.ffn.router.weight       model.layers.i.mlp.gate.weight
         blocks.i.ffn.experts.X[e]        model.layers.i.mlp.experts.e.X.weight  (X = gate/up/down_proj)
    dense: blocks.i.ffn.X.weight          model.layers.i.mlp.X.weight
Config: d_model=hidden_size, n_heads=num_attention_heads=num_key_value_heads, d_ff=intermediate_size,
seq_len=max_position_embeddings, rope_theta (default RoPE), norm_eps=rms_norm_eps, top_k=
num_experts_per_tok, norm_topk_prob=False (FlexOlmo's unnormalised top-k), SiLU.

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
- Import refuses what flexkern's model cannot express: grouped-query attention, attention biases,
  a head_dim other than hidden_size / heads, RoPE scaling, renormalised top-k, another
  activation, sizes that do not fit, missing or unexpected tensors. Tied embeddings are copied
  into flexkern's separate LM head (same logits; they train apart afterwards).

Written folders are atomic and carry flexkern's artifact marker (kind "hf" for exports); an
existing output is replaced only with ``overwrite=True`` and only when flexkern wrote it.
``flexkern.json`` in an exported folder keeps the expert names (and experts.json's notes) so an
import restores them. Needs transformers>=5 for exports (``pip install flexkern[hf]``); imports read
the files directly.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import (CONFIG_FILE, EXPERTS_FILE, TOKENIZER_FILE, CheckpointError, atomic_dir,
                         read_json, save_tensors, write_json, write_model_dir)
from .merge import PUBLIC, load_model
from .model import FlexOlmoLM, ModelConfig, anchor_fingerprint
from .tokenizer import EOS_TOKEN, load_tokenizer

HF_KIND = "hf"  # artifact kind of an exported folder
FLEXKERN_FILE = "flexkern.json"
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default shard size
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFFormatError(CheckpointError):
    """A transformers checkpoint that flexkern cannot read exactly, or a model it cannot export."""


# ---- names ---------------------------------------------------------------------------------------------
_TOP = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {f"attn.{p}.weight": f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "q_norm", "k_norm")}
_LAYER.update({"attn_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "post_feedforward_layernorm.weight"})
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _shared_names(n_layers: int) -> dict[str, str]:
    """flexkern name -> transformers name of every tensor outside the FFN."""
    out = dict(_TOP)
    for i in range(n_layers):
        out.update({f"blocks.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LAYER.items()})
    return out


# ---- configs --------------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, eos_token_id: int, dtype: torch.dtype) -> dict:
    """The transformers config (FlexOlmoConfig / Olmo2Config keyword arguments) of ``cfg``."""
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.seq_len,
               rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
               attention_bias=False, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
               eos_token_id=eos_token_id, dtype=str(dtype).replace("torch.", ""))
    if cfg.num_experts:
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False)
    return out


def flexkern_config(hf: dict, where="config.json") -> ModelConfig:
    """The flexkern ModelConfig of a transformers FlexOlmo config, or HFFormatError naming what
    flexkern's model cannot express."""
    if not isinstance(hf, dict):
        raise HFFormatError(f"{where} is not a JSON object")
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "flex_olmo":
        raise HFFormatError(f"{where}: model_type {hf.get('model_type')!r} (architectures {arch}); import-hf "
                            "reads FlexOlmo checkpoints (model_type 'flex_olmo', FlexOlmoForCausalLM)")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_experts", "num_experts_per_tok")
    missing = [k for k in need if k not in hf]
    if missing:
        raise HFFormatError(f"{where} lacks {missing}")
    D, H = hf["hidden_size"], hf["num_attention_heads"]

    def refuse(reason):
        raise HFFormatError(f"{where}: {reason}; flexkern's FlexOlmo model cannot express it")

    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r} (flexkern's experts are SwiGLU)")
    if hf.get("num_key_value_heads") not in (None, H):
        refuse(f"grouped-query attention (num_key_value_heads={hf['num_key_value_heads']}, heads={H})")
    if hf.get("attention_bias"):
        refuse("attention_bias=true")
    if hf.get("head_dim") not in (None, D // H if isinstance(D, int) and isinstance(H, int) and H else None):
        refuse(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads")
    if hf.get("norm_topk_prob"):
        refuse("norm_topk_prob=true (renormalised top-k)")
    if hf.get("sliding_window"):
        refuse(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))  # FlexOlmoConfig.default_theta
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        refuse(f"RoPE scaling {rope.get('rope_type') or hf.get('rope_scaling')!r}")
    try:
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"], n_heads=H,
                           d_ff=hf["intermediate_size"], seq_len=hf.get("max_position_embeddings", 4096),
                           num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                           rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    except (TypeError, ValueError) as exc:
        raise HFFormatError(f"{where}: sizes flexkern cannot build: {exc}") from None


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
    out = {hf: state[fk] for fk, hf in _shared_names(cfg.n_layers).items()}
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}.mlp"
        if cfg.num_experts:
            ffn = block.ffn
            keep = list(range(ffn.num_experts)) if experts is None else experts
            out[f"{pre}.gate.weight"] = ffn.router.weight[keep]
            for j, e in enumerate(keep):
                for p in _PROJ:
                    out[f"{pre}.experts.{j}.{p}.weight"] = getattr(ffn.experts, p)[e]
        else:
            for p in _PROJ:
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
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype or model.lm_head.weight.dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
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
    experts_info = read_json(Path(model_dir) / EXPERTS_FILE) if (Path(model_dir) / EXPERTS_FILE).exists() else {}
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


# ---- import ---------------------------------------------------------------------------------------------
def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint folder (model.safetensors or sharded with an index)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        bins = [p.name for p in hf_dir.glob("*.bin")]
        raise HFFormatError(f"{hf_dir} has no {WEIGHTS_FILE} or {INDEX_FILE}"
                            + (f" (only {bins}: convert them to safetensors first)" if bins else ""))
    out = {}
    for name in files:
        path = hf_dir / name
        if Path(name).name != name or not path.is_file():
            raise HFFormatError(f"{hf_dir}: weight file {name!r} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except Exception as exc:  # safetensors' own error types for corrupt files
            raise HFFormatError(f"cannot read {path}: {exc}") from None
    return out


def _take(tensors: dict, name: str, shape: tuple, where) -> torch.Tensor:
    t = tensors.pop(name, None)
    if t is None:
        raise HFFormatError(f"{where}: tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise HFFormatError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the config needs {tuple(shape)}")
    if not t.is_floating_point():
        raise HFFormatError(f"{where}: tensor {name!r} is {t.dtype}, not a float tensor")
    return t


def flexkern_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tied: bool = False,
                        where="checkpoint") -> dict[str, torch.Tensor]:
    """flexkern state dict of a FlexOlmo transformers checkpoint's tensors (per-expert names, as
    save_pretrained writes them, or the fused in-memory gate_up_proj / down_proj). Refuses missing,
    misshapen and left-over tensors."""
    tensors = dict(tensors)
    D, Fw, E, V = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.vocab_size
    if tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    shapes = {"embed.weight": (V, D), "final_norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.attn.{p}.weight": (D, D) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({f"blocks.{i}.{p}.weight": (D,) for p in ("attn.q_norm", "attn.k_norm", "attn_norm", "ffn_norm")})
    state = {fk: _take(tensors, hf, shapes[fk], where) for fk, hf in _shared_names(cfg.n_layers).items()}
    for i in range(cfg.n_layers):
        pre, out = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        state[f"{out}.router.weight"] = _take(tensors, f"{pre}.gate.weight", (E, D), where)
        if f"{pre}.experts.gate_up_proj" in tensors:  # fused, as in memory
            gate_up = _take(tensors, f"{pre}.experts.gate_up_proj", (E, 2 * Fw, D), where)
            state[f"{out}.experts.gate_proj"], state[f"{out}.experts.up_proj"] = gate_up[:, :Fw], gate_up[:, Fw:]
            state[f"{out}.experts.down_proj"] = _take(tensors, f"{pre}.experts.down_proj", (E, D, Fw), where)
        else:
            want = {"gate_proj": (Fw, D), "up_proj": (Fw, D), "down_proj": (D, Fw)}
            for p, shape in want.items():
                state[f"{out}.experts.{p}"] = torch.stack(
                    [_take(tensors, f"{pre}.experts.{e}.{p}.weight", shape, where) for e in range(E)])
        state[f"{out}.router.bias"] = torch.zeros(E, dtype=state[f"{out}.router.weight"].dtype)
    if tied:
        tensors.pop("model.embed_tokens.weight", None)
    if tensors:
        raise HFFormatError(f"{where}: tensors flexkern's model has no place for: {sorted(tensors)[:6]}"
                            + (f" and {len(tensors) - 6} more" if len(tensors) > 6 else ""))
    return state


def load_hf(hf_dir) -> tuple[FlexOlmoLM, list[str], dict]:
    """A transformers FlexOlmo checkpoint folder as a flexkern model (float32, eval mode).

    Returns (model, expert names, notes for experts.json). Names come from flexkern.json when
    flexkern exported the folder, else public, expert_1, ..."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFFormatError(f"{hf_dir} is not a folder")
    hf_cfg = read_json(hf_dir / CONFIG_FILE)
    cfg = flexkern_config(hf_cfg, hf_dir / CONFIG_FILE)
    tensors = read_hf_tensors(hf_dir)
    dtypes = {t.dtype for t in tensors.values()}
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    state = flexkern_state_dict(cfg, tensors, tied, hf_dir)
    model = FlexOlmoLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = {k for k, _ in model.named_parameters()} - set(state)
    if missing:  # cannot happen when flexkern_state_dict covers the model; a guard against drift
        raise HFFormatError(f"{hf_dir}: no tensors for {sorted(missing)[:4]}")
    info = _read_info(hf_dir)
    names = info.get("experts") if isinstance(info.get("experts"), list) else None
    if names is None or len(names) != cfg.num_experts:  # no record (or another model's): defaults
        names = [PUBLIC] + [f"expert_{e}" for e in range(1, cfg.num_experts)]
    _check_names(names, cfg.num_experts, f"{hf_dir / FLEXKERN_FILE}: experts")
    notes = dict(info.get("notes") or {}) if info.get("anchor_fingerprint") == anchor_fingerprint(model) else {}
    src_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    notes["hf_import"] = {"source": str(hf_dir), "dtype": str(src_dtype).replace("torch.", ""),
                          "tied_embeddings": tied}
    return model.eval(), names, notes


def _check_names(names: list, E: int, what: str) -> list[str]:
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


def import_hf(hf_dir, out_dir, *, names: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write a transformers FlexOlmo checkpoint folder as a flexkern merged model directory.

    The public router row recorded with it (public_embedding.safetensors) is expert 0's router
    row of layer 0. ``names``: expert names, "public" first (default: from flexkern.json, else
    public, expert_1, ...)."""
    hf_dir = Path(hf_dir)
    model, found, notes = load_hf(hf_dir)
    if names is not None:
        names = _check_names(list(names), model.config.num_experts, "names")
    names = names or found
    if not (hf_dir / TOKENIZER_FILE).is_file():
        raise HFFormatError(f"{hf_dir} has no {TOKENIZER_FILE}; a flexkern model directory needs the tokenizer")
    row = model.moe_layers()[0].router.weight[0].detach().float()
    experts = {"experts": names, "anchor_fingerprint": anchor_fingerprint(model), "packages": {}, **notes}
    with tempfile.TemporaryDirectory(prefix="flexkern-import-") as tmp:
        tok_path, pad = _tokenizer_for(hf_dir / TOKENIZER_FILE, model.config.vocab_size, Path(tmp))
        if pad:
            experts["hf_import"]["tokenizer_placeholders"] = pad
        return write_model_dir(out_dir, model, tok_path, row, "hf-import (layer 0 router row 0)",
                               experts, overwrite=overwrite, inputs=[hf_dir])


PLACEHOLDER = "<|flexkern_unused_{}|>"


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
