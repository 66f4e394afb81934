"""Small synthetic corpora for the pipeline tests: documents of random words from a word list."""
from __future__ import annotations

import random


def synthetic_docs(words: str, n: int, seed: int) -> list[str]:
    """``n`` documents of 30-60 words drawn from ``words`` (space-separated), reproducible by seed."""
    rng = random.Random(seed)
    vocab = words.split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(30, 60))) + "." for _ in range(n)]
