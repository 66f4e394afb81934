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
# verify_tokenizer encodes and decodes this; a byte-level BPE gives it back exactly
PROBE = "The quick brown fox, 1234 ÄÖÜ ß é 中文 🙂\n\tdef f(x): return x  # end"


class TokenizerError(ValueError):
    """A tokenizer file that does not load or does not behave like the pipeline's tokenizer."""


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
    """Load a tokenizer.json (FileNotFoundError when missing, TokenizerError when broken)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type for any parse error
        raise TokenizerError(f"tokenizer {path} does not load: {str(exc)[:200]}") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        raise TokenizerError(f"tokenizer {path} has no {EOS_TOKEN!r} token")
    return tok


def verify_tokenizer(path, vocab_size: int | None = None) -> Tokenizer:
    """Load ``path`` and check it: EOS token, ``vocab_size`` entries (when given), and an exact
    encode/decode round trip of a probe string. Raises TokenizerError naming the file."""
    try:
        tok = load_tokenizer(path)
    except FileNotFoundError as exc:
        raise TokenizerError(str(exc)) from None
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tok.get_vocab_size()} entries, the model's "
                             f"vocab_size is {vocab_size}")
    try:
        ids = tok.encode(PROBE, add_special_tokens=False).ids
        back = tok.decode(ids)
    except Exception as exc:
        raise TokenizerError(f"tokenizer {path} cannot encode/decode: {str(exc)[:200]}") from None
    if back != PROBE or any(not 0 <= i < tok.get_vocab_size() for i in ids):
        raise TokenizerError(f"tokenizer {path} does not round-trip text (encode then decode changes it)")
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
