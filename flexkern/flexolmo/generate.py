"""Text generation from a FlexOlmo model (anchor or merged, with experts opted out or not).

Greedy decoding, or nucleus (top-p) sampling with a temperature and a seeded generator. There is no
KV cache: every step runs the model on the last ``config.seq_len`` tokens, which is fine for the
small presets this pipeline trains. Greedy decoding is deterministic; top-p sampling is
deterministic for a given ``seed`` (on one machine and thread count).
"""
from __future__ import annotations

import torch

from .model import FlexOlmoLM
from .tokenizer import EOS_TOKEN


def _next_token(logits_V: torch.Tensor, method: str, top_p: float, temperature: float,
                gen: torch.Generator | None) -> int:
    if method == "greedy":
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    keep[0] = True
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


@torch.no_grad()
def generate_ids(model: FlexOlmoLM, prompt_ids: list[int], max_new_tokens: int = 50, method: str = "greedy",
                 top_p: float = 0.9, temperature: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Prompt ids + up to ``max_new_tokens`` generated ids (stops after ``eos_id``)."""
    if method not in ("greedy", "top-p"):
        raise ValueError(f"method must be 'greedy' or 'top-p', got {method!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if method == "top-p" else None
    was = model.training
    model.eval()
    ids = list(prompt_ids)
    try:
        for _ in range(max_new_tokens):
            ctx = torch.tensor(ids[-model.config.seq_len:], dtype=torch.long, device=device)[None]
            nxt = _next_token(model(ctx)[0, -1].cpu(), method, top_p, temperature, gen)
            ids.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
    finally:
        model.train(was)
    return ids


def generate(model: FlexOlmoLM, tokenizer, prompt: str, max_new_tokens: int = 50, method: str = "greedy",
             top_p: float = 0.9, temperature: float = 1.0, seed: int = 0) -> str:
    """The generated continuation of ``prompt`` (text after the prompt)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = generate_ids(model, prompt_ids, max_new_tokens, method, top_p, temperature, seed,
                       eos_id=tokenizer.token_to_id(EOS_TOKEN))
    return tokenizer.decode(ids[len(prompt_ids):])


def generate_dir(model_dir, prompt: str, *, opt_out=(), top_k: int | None = None, device: str = "cpu",
                 **kwargs) -> str:
    """``generate`` on a model directory, with the named experts masked (opted out) at inference."""
    from pathlib import Path

    from .checkpoint import TOKENIZER_FILE
    from .merge import load_model, mask_experts
    from .tokenizer import load_tokenizer

    model, names = load_model(model_dir, device)
    if opt_out:
        mask_experts(model, list(opt_out), names)
    if top_k is not None:
        model.set_top_k(top_k)
    return generate(model, load_tokenizer(Path(model_dir) / TOKENIZER_FILE), prompt, **kwargs)
