"""What a transformers OLMo-2 / FlexOlmo checkpoint is in flexkern's terms: tensor names and shapes,
and the config both ways. Shared by the export (hf.py) and the import (hf_import.py).

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
Config: d_model=hidden_size, n_heads=num_attention_heads, n_kv_heads=num_key_value_heads,
d_ff=intermediate_size, seq_len=max_position_embeddings, rope_theta (default RoPE),
norm_eps=rms_norm_eps, top_k=num_experts_per_tok, norm_topk_prob=False (FlexOlmo's unnormalised
top-k), SiLU. A field a config.json leaves out takes the transformers config class's default
(``HF_DEFAULTS``; a test checks them against transformers).
"""
from __future__ import annotations

import torch

from .checkpoint import CheckpointError
from .model import ModelConfig

HF_KIND = "hf"  # artifact kind of an exported folder
FLEXKERN_FILE = "flexkern.json"
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model_type -> (architecture, what flexkern makes of it)
ARCHITECTURES = {"flex_olmo": ("FlexOlmoForCausalLM", "merged"), "olmo2": ("Olmo2ForCausalLM", "anchor")}
# what transformers' FlexOlmoConfig / Olmo2Config assume for a field config.json leaves out
HF_DEFAULTS = {"flex_olmo": {"rope_theta": 500000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096},
               "olmo2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}}


class HFFormatError(CheckpointError):
    """A transformers checkpoint that flexkern cannot read exactly, or a model it cannot export."""


# ---- names ---------------------------------------------------------------------------------------------
_TOP = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {f"attn.{p}.weight": f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "q_norm", "k_norm")}
_LAYER.update({"attn_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "post_feedforward_layernorm.weight"})
PROJ = ("gate_proj", "up_proj", "down_proj")


def shared_names(n_layers: int) -> dict[str, str]:
    """flexkern name -> transformers name of every tensor outside the FFN."""
    out = dict(_TOP)
    for i in range(n_layers):
        out.update({f"blocks.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LAYER.items()})
    return out


def shared_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """flexkern name -> shape of every tensor outside the FFN (k and v are kv_dim wide)."""
    D, KV, V = cfg.d_model, cfg.kv_dim, cfg.vocab_size
    out = {"embed.weight": (V, D), "final_norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        out.update({f"{b}.attn.q_proj.weight": (D, D), f"{b}.attn.k_proj.weight": (KV, D),
                    f"{b}.attn.v_proj.weight": (KV, D), f"{b}.attn.o_proj.weight": (D, D),
                    f"{b}.attn.q_norm.weight": (D,), f"{b}.attn.k_norm.weight": (KV,),
                    f"{b}.attn_norm.weight": (D,), f"{b}.ffn_norm.weight": (D,)})
    return out


# ---- configs --------------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, eos_token_id: int, dtype: torch.dtype) -> dict:
    """The transformers config (FlexOlmoConfig / Olmo2Config keyword arguments) of ``cfg``."""
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_kv_heads, hidden_act="silu", max_position_embeddings=cfg.seq_len,
               rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
               attention_bias=False, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
               eos_token_id=eos_token_id, dtype=str(dtype).replace("torch.", ""))
    if cfg.num_experts:
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False)
    return out


def model_type(hf: dict, where="config.json") -> str:
    """"flex_olmo" or "olmo2" (HFFormatError naming the file for anything else)."""
    if not isinstance(hf, dict):
        raise HFFormatError(f"{where} is not a JSON object")
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise HFFormatError(f"{where}: model_type {mt!r} (architectures {hf.get('architectures') or []}); "
                            "import-hf reads FlexOlmo (model_type 'flex_olmo', FlexOlmoForCausalLM) and "
                            "OLMo-2 (model_type 'olmo2', Olmo2ForCausalLM) checkpoints")
    return mt


def flexkern_config(hf: dict, where="config.json") -> ModelConfig:
    """The flexkern ModelConfig of a transformers FlexOlmo or OLMo-2 config, or HFFormatError naming
    the file and what flexkern's model cannot express. Only numbers are read: sizes beyond
    ModelConfig's bounds are refused here, before anything is allocated."""
    mt = model_type(hf, where)
    moe = mt == "flex_olmo"
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    need += ("num_experts", "num_experts_per_tok") if moe else ()
    missing = [k for k in need if k not in hf]
    if missing:
        raise HFFormatError(f"{where} lacks {missing}")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    defaults = HF_DEFAULTS[mt]

    def refuse(reason):
        raise HFFormatError(f"{where}: {reason}; flexkern's model cannot express it")

    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r} (flexkern's FFNs are SwiGLU)")
    if hf.get("attention_bias"):
        refuse("attention_bias=true")
    if hf.get("head_dim") not in (None, D // H if isinstance(D, int) and isinstance(H, int) and H else None):
        refuse(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads")
    if moe and hf.get("norm_topk_prob"):
        refuse("norm_topk_prob=true (renormalised top-k)")
    if hf.get("sliding_window"):
        refuse(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise HFFormatError(f"{where}: rope_parameters must be an object, got {rope!r:.80}")
    theta = rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        refuse(f"RoPE scaling {rope.get('rope_type') or hf.get('rope_scaling')!r}")
    kv = hf.get("num_key_value_heads")
    sizes = dict(vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"], n_heads=H,
                 n_kv_heads=H if kv is None else kv, d_ff=hf["intermediate_size"],
                 seq_len=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
                 num_experts=hf["num_experts"] if moe else 0, top_k=hf["num_experts_per_tok"] if moe else 1,
                 rope_theta=theta, norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]))
    if moe and sizes["num_experts"] == 0:
        refuse("num_experts=0")
    try:
        for k in ("rope_theta", "norm_eps"):  # numbers only: a string or a list is not converted
            if isinstance(sizes[k], bool) or not isinstance(sizes[k], (int, float)):
                raise ValueError(f"{k} must be a number, got {sizes[k]!r:.40}")
            sizes[k] = float(sizes[k])
        return ModelConfig(**sizes)
    except (TypeError, ValueError) as exc:
        raise HFFormatError(f"{where}: sizes flexkern cannot build: {exc}") from None
