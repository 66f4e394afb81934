"""domain_probe: per-token vs context-mean domain probes on the FFN input h (tiny random model, CPU)."""
import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch

from flexkern.flexolmo.model import PRESETS, FlexOlmoLM
from flexkern.flexolmo.probe import domain_probe, probe_table, probe_windows
from flexkern.flexolmo.tokenizer import EOS_TOKEN

CFG = dataclasses.replace(PRESETS["micro"], vocab_size=64, d_model=64, seq_len=32).with_experts(2, 1)
DOMAINS = ("code", "legal", "scripture", "math")


class WordTokenizer:
    """Stub tokenizer: one id per space-separated word (EOS is 0)."""

    def __init__(self, words):
        self.ids = {EOS_TOKEN: 0, **{w: i + 1 for i, w in enumerate(words)}}

    def token_to_id(self, t):
        return self.ids.get(t)

    def encode_batch(self, docs, add_special_tokens=False):
        return [SimpleNamespace(ids=[self.ids[w] for w in d.split()]) for d in docs]


def _docs(pick, n=24, seed=0):
    rng = random.Random(seed)
    return [" ".join(pick(rng) for _ in range(rng.randint(30, 60))) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return FlexOlmoLM(CFG)


def test_disjoint_vocabulary_is_decodable_per_token():
    words = {d: [f"{d}{i}" for i in range(8)] for d in DOMAINS}
    tok = WordTokenizer([w for ws in words.values() for w in ws])
    docs = {d: _docs(lambda r, ws=ws: r.choice(ws), seed=i) for i, (d, ws) in enumerate(words.items())}
    res = domain_probe(_model(), tok, docs, seq_len=32, tokens_per_domain=1024, steps=100)
    json.dumps(res)
    assert res["domains"] == list(DOMAINS) and len(res["layers"]) == CFG.n_layers
    assert 0.25 <= res["chance"] < 0.3 and res["tokens"]["test"] == sum(res["tokens"]["test_per_domain"].values())
    for row in res["layers"]:
        assert row["token_acc"] > 0.97 and row["token_macro"] > 0.97
    lines = probe_table(res)
    assert len(lines) == 4 + CFG.n_layers and lines[-1].startswith("| 1 |")


def test_same_distribution_stays_near_chance():
    words = [f"w{i}" for i in range(32)]
    tok = WordTokenizer(words)
    docs = {d: _docs(lambda r: r.choice(words), seed=i) for i, d in enumerate(DOMAINS)}
    res = domain_probe(_model(), tok, docs, seq_len=32, tokens_per_domain=1024, steps=100)
    for row in res["layers"]:
        assert abs(row["token_acc"] - res["chance"]) < 0.08
        assert abs(row["context_acc"] - res["chance"]) < 0.15


def test_split_is_by_document_and_window():
    tok = WordTokenizer([f"w{i}" for i in range(32)])
    docs = {d: _docs(lambda r: f"w{r.randrange(32)}", seed=i) for i, d in enumerate(DOMAINS)}
    pw = probe_windows(tok, docs, seq_len=16, tokens_per_domain=512, seed=3)
    assert pw.windows_NS.shape == (4 * 2 * 16, 16)
    for c in range(4):
        own = pw.domain_N == c
        tr, te = pw.doc_NS[own & ~pw.test_N], pw.doc_NS[own & pw.test_N]
        assert tr.numel() and te.numel() and not set(tr.flatten().tolist()) & set(te.flatten().tolist())
    rows_tr = {tuple(r) for r in pw.windows_NS[~pw.test_N].tolist()}
    assert not rows_tr & {tuple(r) for r in pw.windows_NS[pw.test_N].tolist()}
    other = probe_windows(tok, docs, seq_len=16, tokens_per_domain=512, seed=4)
    assert not torch.equal(other.doc_NS, pw.doc_NS)


def test_deterministic():
    tok = WordTokenizer([f"w{i}" for i in range(32)])
    docs = {d: _docs(lambda r, c=c: f"w{r.randrange(8 * c, 8 * c + 16) % 32}", seed=c) for c, d in enumerate(DOMAINS[:2])}
    a = domain_probe(_model(), tok, docs, seq_len=16, tokens_per_domain=256, steps=30)
    b = domain_probe(_model(), tok, docs, seq_len=16, tokens_per_domain=256, steps=30)
    assert a == b


def test_bad_input():
    tok = WordTokenizer([f"w{i}" for i in range(32)])
    docs = _docs(lambda r: f"w{r.randrange(32)}")
    model = _model()
    with pytest.raises(ValueError, match="at least two domains"):
        domain_probe(model, tok, {"code": docs}, seq_len=16)
    with pytest.raises(ValueError, match="'legal'.*two documents"):
        domain_probe(model, tok, {"code": docs, "legal": []}, seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        domain_probe(model, tok, {"code": docs, "legal": docs}, seq_len=CFG.seq_len + 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        domain_probe(model, tok, {"code": docs, "legal": ["w1 w2", "w3"]}, seq_len=16, tokens_per_domain=64)
