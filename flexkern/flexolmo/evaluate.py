"""Held-out evaluation: per-domain next-token loss and perplexity with a token budget.

A domain's held-out documents are one token stream (``encode_documents``); it is cut into
non-overlapping windows of ``seq_len + 1`` tokens (each window predicts its last ``seq_len``
tokens), the first ``max_tokens // seq_len`` windows are scored, and the loss is the mean over all
predicted tokens. Any module whose ``forward(ids_BS)`` returns next-token logits or log-probs
(B, S, V) can be scored — the FlexOlmo models and the BTM ensemble alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import domain_split
from .tokenizer import encode_documents


def stream_windows(stream: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len + 1) int64 of a 1-D stream; at most max_tokens targets.

    Windows overlap by one token so every token after the first is predicted exactly once.
    """
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise ValueError("stream must be a 1-D tensor of token ids")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    n = (stream.numel() - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for one window of {seq_len + 1}")
    idx_NS = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx_NS].long()


@torch.no_grad()
def stream_loss(model: nn.Module, stream: torch.Tensor, seq_len: int, max_tokens: int | None = None,
                batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on a token stream."""
    ids_NS = stream_windows(stream, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, ids_NS.shape[0], batch_size):
            ids_BS = ids_NS[s:s + batch_size].to(device)
            logits_BSV = model(ids_BS[:, :-1]).float()
            total += float(F.cross_entropy(logits_BSV.flatten(0, 1), ids_BS[:, 1:].flatten(), reduction="sum"))
            count += ids_BS[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def domain_losses(model: nn.Module, streams: dict[str, torch.Tensor], seq_len: int,
                  max_tokens: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """{domain: mean held-out loss} for every stream (same order as ``streams``)."""
    if not streams:
        raise ValueError("streams is empty")
    return {name: stream_loss(model, s, seq_len, max_tokens, batch_size) for name, s in streams.items()}


def perplexities(losses: dict[str, float]) -> dict[str, float]:
    return {k: math.exp(v) for k, v in losses.items()}


def average_loss(losses: dict[str, float], domains=None) -> float:
    """Unweighted mean over domains (every domain counts the same, whatever its size)."""
    keys = list(losses) if domains is None else list(domains)
    return sum(losses[k] for k in keys) / len(keys)


def heldout_streams(tokenizer, sources, max_bytes: int | None = None, heldout_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """{source: token stream of its held-out documents} with the split used for training."""
    out = {}
    for src in sources:
        _, held = domain_split(src, max_bytes, heldout_fraction, seed)
        out[str(src)] = encode_documents(tokenizer, held)
    return out
