"""Byte-level BPE tokenizer (``tokenizers``), trained on the public data and saved with the anchor.

Documents are joined into one token stream separated by ``EOS_TOKEN``; every byte sequence is
encodable (byte-level alphabet), so owners' private text never hits an unknown token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import atomic_path

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (EOS_TOKEN included, id 0)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + EOS + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer(tok: Tokenizer, path) -> Path:
    """Write the tokenizer JSON atomically (temp file + os.replace)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return path


def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer {path} has no {EOS_TOKEN!r} token")
    return tok


def encode_documents(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """Encode documents into one 1-D int64 stream: doc_0 EOS doc_1 EOS ... doc_n EOS."""
    if isinstance(docs, str):
        raise TypeError("docs must be a list of strings, not a single string")
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
