"""FlexOlmoLM: a small OLMo-2-style decoder whose FFN is dense (the anchor) or a FlexMoE.

Shapes: B batch, S sequence, D d_model, H heads, G key/value heads, V vocabulary, E experts.

OLMo-2 "reordered" post-norm: each residual branch is normalised *after* its sublayer,
    h   = x + attn_norm(attn(x))
    out = h + ffn_norm(ffn(h))
so the router and the experts see the raw residual stream h. Attention has QK-norm (RMSNorm over
the full q and k projections) and RoPE; the FFN is SwiGLU; the LM head is untied. Grouped-query
attention (``n_kv_heads`` < ``n_heads``, as OLMo-2 32B): G key/value heads, each shared by H / G
consecutive query heads; k_proj, v_proj and k_norm are then G * D / H wide.

Parameter names (the package / merge code relies on them):
    embed.weight, blocks.{i}.attn.{q,k,v,o}_proj.weight, blocks.{i}.attn.{q,k}_norm.weight,
    blocks.{i}.attn_norm.weight, blocks.{i}.ffn_norm.weight, final_norm.weight, lm_head.weight
    dense FFN:  blocks.{i}.ffn.{gate,up,down}_proj.weight
    MoE FFN:    blocks.{i}.ffn.router.{weight,bias}, blocks.{i}.ffn.experts.{gate,up,down}_proj
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import FlexMoE


# Upper bounds for every size field: a config read from a file (manifest.json, config.json) is
# checked against them before anything is allocated, so a forged file cannot ask for terabytes.
CONFIG_LIMITS = {"vocab_size": 1 << 21, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024,
                 "n_kv_heads": 1024, "d_ff": 1 << 18, "seq_len": 1 << 20, "num_experts": 1024}
MAX_PARAMETERS = 1 << 34  # 17e9 parameters (68 GB in float32)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 384
    n_layers: int = 4
    n_heads: int = 6
    d_ff: int = 1024
    seq_len: int = 256
    num_experts: int = 0  # 0 = dense FFN (the anchor); > 0 = FlexMoE
    top_k: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    n_kv_heads: int | None = None  # key/value heads; None = n_heads (files written before GQA lack it)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len",
                     "num_experts", "top_k"):
            v, lo = getattr(self, name), 0 if name == "num_experts" else 1
            hi = CONFIG_LIMITS.get(name, CONFIG_LIMITS["num_experts"])
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"ModelConfig.{name} must be an int in [{lo}, {hi}], got {v!r}")
        for name, hi in (("rope_theta", 1e12), ("norm_eps", 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < hi:  # NaN fails too
                raise ValueError(f"ModelConfig.{name} must be a number in (0, {hi:g}), got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.n_heads} heads of even width")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (each key/value "
                             "head serves n_heads / n_kv_heads query heads)")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_parameters() > MAX_PARAMETERS:
            raise ValueError(f"this ModelConfig has {self.num_parameters():.3g} parameters, more than the "
                             f"{MAX_PARAMETERS:.3g} flexkern allows (a forged or mistyped config?)")

    def num_parameters(self) -> int:
        """Parameter count, computed from the sizes alone (nothing is allocated)."""
        D, F, L, E = self.d_model, self.d_ff, self.n_layers, max(1, self.num_experts)
        kv = self.kv_dim
        ffn = E * 3 * D * F + (E * D + E if self.num_experts else 0)
        attn = 2 * D * D + 2 * D * kv + 3 * D + kv  # q, o; k, v; q_norm + attn_norm + ffn_norm; k_norm
        return 2 * self.vocab_size * D + L * (attn + ffn) + D

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: n_kv_heads * head width (d_model without GQA)."""
        return self.n_kv_heads * (self.d_model // self.n_heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, require: tuple[str, ...] = ()) -> "ModelConfig":
        """Build from a dict (e.g. a file's JSON); ``require`` lists fields that must be present
        (files name every size field, so a missing one is an error, not the default)."""
        if not isinstance(d, dict):
            raise ValueError(f"a ModelConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(map(str, unknown))}")
        missing = [k for k in require if k not in d]
        if missing:
            raise ValueError(f"missing ModelConfig fields: {missing}")
        return cls(**d)

    def dense(self) -> "ModelConfig":
        """The same architecture with a dense FFN (what the anchor and the packages record)."""
        return dataclasses.replace(self, num_experts=0, top_k=1)

    def with_experts(self, num_experts: int, top_k: int) -> "ModelConfig":
        return dataclasses.replace(self, num_experts=num_experts, top_k=top_k)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: a model that trains in seconds
    "micro": ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32),
    # CPU demo (2 cores): d_model 384 so 384-dim sentence embeddings drop in as router rows
    "tiny": ModelConfig(vocab_size=8192, d_model=384, n_layers=4, n_heads=6, d_ff=1024, seq_len=256),
    # one GPU
    "small": ModelConfig(vocab_size=16384, d_model=384, n_layers=8, n_heads=6, d_ff=1536, seq_len=512),
}


# the fields a config file must name (the rest have defaults that every file so far agrees on)
SIZE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "num_experts", "top_k")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim) for the rotate-half RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSd * cos_Sd + rotated * sin_Sd).to(x_BHSd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, KV = cfg.d_model, cfg.kv_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        # registered q, k, v, o: the order _init_weights draws them in (seeded models stay the same)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, n, bias=False) for n in (D, KV, KV, D))
        self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(KV, cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H, G = self.n_heads, self.n_kv_heads

        def heads(t, n):  # (B, S, n * D/H) -> (B, n, S, D/H)
            return t.view(B, S, n, D // H).transpose(1, 2)

        q = apply_rope(heads(self.q_norm(self.q_proj(x_BSD)), H), cos[:S], sin[:S])
        k = apply_rope(heads(self.k_norm(self.k_proj(x_BSD)), G), cos[:S], sin[:S])
        v = heads(self.v_proj(x_BSD), G)
        if G == H:  # the plain call (and its numerics) whenever there is no grouping
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query head h reads key/value head h // (H / G), as transformers' repeat_kv
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.num_experts:
            self.ffn = FlexMoE(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, router_bias=True)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BSD, cos, sin):
        h = x_BSD + self.attn_norm(self.attn(x_BSD, cos, sin))
        return h + self.ffn_norm(self.ffn(h))


class FlexOlmoLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"FlexOlmoLM expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.seq_len, config.d_model // config.n_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue  # RMSNorm weights stay at one
            if name.endswith("router.bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.normal_(0.0, std / (2 * self.config.n_layers) ** 0.5)  # residual outputs
            else:
                p.normal_(0.0, std)

    def hidden_states(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states h_BSD (the model's dtype) for token ids (B, S) int64.

        S may exceed config.seq_len (RoPE then extrapolates past the trained length)."""
        if ids_BS.dim() != 2:
            raise ValueError(f"expected token ids of shape (B, S), got {tuple(ids_BS.shape)}")
        cos, sin = self.rope_cos, self.rope_sin
        if ids_BS.shape[1] > cos.shape[0]:  # longer than trained: RoPE extrapolates
            c = self.config
            cos, sin = (t.to(cos.device) for t in rope_tables(ids_BS.shape[1], c.d_model // c.n_heads, c.rope_theta))
        x = self.embed(ids_BS)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.final_norm(x)

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, S, V)."""
        return self.lm_head(self.hidden_states(ids_BS))

    # ---- MoE controls ---------------------------------------------------------------------------
    def moe_layers(self) -> list[FlexMoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, FlexMoE)]

    def router_z_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the last forward's router z-loss (0 for a dense model)."""
        losses = [m.z_loss for m in self.moe_layers() if m.z_loss is not None]
        return torch.stack(losses).sum() if losses else self.lm_head.weight.new_zeros(())

    def _require_moe(self) -> list[FlexMoE]:
        layers = self.moe_layers()
        if not layers:
            raise ValueError("this model has a dense FFN (num_experts=0); it has no experts")
        return layers

    @torch.no_grad()
    def set_expert_mask(self, mask_E) -> None:
        """Activate (True) / mask (False) experts in every MoE layer; masked = opted out."""
        layers = self._require_moe()
        mask_E = torch.as_tensor(mask_E, dtype=torch.bool)
        E = layers[0].num_experts
        if mask_E.shape != (E,):
            raise ValueError(f"expert mask must have shape ({E},), got {tuple(mask_E.shape)}")
        active = int(mask_E.sum())
        if active < layers[0].top_k:
            raise ValueError(f"mask leaves {active} active experts, fewer than top_k={layers[0].top_k}")
        for m in layers:
            m.expert_mask.copy_(mask_E.to(m.expert_mask.device))

    def set_top_k(self, k: int) -> None:
        layers = self._require_moe()
        E = layers[0].num_experts
        if not isinstance(k, int) or not 1 <= k <= E:
            raise ValueError(f"top_k must be an int in [1, {E}], got {k!r}")
        for m in layers:
            m.top_k = k
        self.config = dataclasses.replace(self.config, top_k=k)


def lm_loss(model: nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 scalar): predicts ids[:, 1:] from ids[:, :-1]."""
    if ids_BS.dim() != 2 or ids_BS.shape[1] < 2:
        raise ValueError(f"expected token ids of shape (B, S>=2), got {tuple(ids_BS.shape)}")
    logits = model(ids_BS[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids_BS[:, 1:].flatten())


# ---- the anchor-shared weights ---------------------------------------------------------------------
def is_ffn_name(name: str) -> bool:
    """True for FFN / router tensors (blocks.{i}.ffn.*); everything else is shared with the anchor."""
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blocks" and parts[2] == "ffn"


def shared_state_dict(model_or_state) -> dict[str, torch.Tensor]:
    """Every non-FFN, non-router tensor: embeddings, attention, norms, LM head."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v for k, v in state.items() if not is_ffn_name(k)}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (contiguous, on the CPU); dtype and shape are not included."""
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def anchor_fingerprint(model_or_state) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the shared tensors (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(shared_state_dict(model_or_state).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()
