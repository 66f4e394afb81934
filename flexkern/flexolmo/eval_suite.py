"""The evaluation suite behind ``flexkern evaluate`` and ``flexkern demo``: three sets, every number
with a 95% bootstrap interval over documents, paired comparisons.

Sets (built from the held-out documents of each domain, the split that training never saw):
    heldout   each domain's held-out documents as one token stream (doc EOS doc EOS ...), cut into
              windows of seq_len + 1 tokens, the first ``eval_tokens`` targets (the long-context
              score; the same windows as ``evaluate.stream_loss``). Unit: the document a target
              token belongs to.
    short     the first ``short_tokens`` + 1 tokens of every held-out document (a short prompt:
              the prefix-likelihood weights of BTM have little context to go on). Unit: document.
    mixed     windows of seq_len + 1 tokens holding the beginning of one document of domain A and
              then the beginning of one of domain B (half each), for every pair of domains,
              ``mixed_per_pair`` windows per pair alternating which comes first. Unit: window.

Numbers: a model's loss on a group (a domain, or "all" for mixed) is sum(nll) / count over all its
predicted tokens (nats/token); "avg" is the unweighted mean over the set's groups. The interval is a
percentile bootstrap: units are resampled with replacement within each group, ``bootstrap``
replicates, and the same resampled units are used for every model (so differences are paired).
``paired`` gives the interval of a difference between two models; it is significant when the
interval excludes 0 by more than a negligible effect (``NEGLIGIBLE``, 5e-4 nats/token).

Deterministic: on one machine with the same thread count (``torch.get_num_threads()``) and the same
package versions, the same models and settings give bit-identical numbers, intervals included
(fixed windows, a seeded bootstrap, no sampling). Across machines or thread counts, float
reductions may differ in the last bits and training then drifts: numbers agree only within their
intervals.

Shapes: N windows, S predicted positions, U units, B bootstrap replicates, M ensemble members.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import btm_log_weights
from .data import PUBLIC_SHARE
from .tokenizer import EOS_TOKEN

SETTINGS_FILE = "eval_settings.json"
SETS = ("heldout", "short", "mixed")


@dataclass
class EvalSettings:
    """How a model is evaluated; recorded next to the models the demo writes (``eval_settings.json``)."""
    seq_len: int = 128
    eval_tokens: int = 8192         # held-out targets per domain (heldout set)
    max_bytes: int | None = 300_000  # per domain, as in training (fixes the split)
    heldout_fraction: float = 0.1
    split_seed: int = 0
    public_share: float = PUBLIC_SHARE
    short_tokens: int = 48
    mixed_per_pair: int = 4
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_settings(model_dir, settings: EvalSettings) -> Path:
    """Record ``settings`` in ``model_dir/eval_settings.json`` (atomic)."""
    from .checkpoint import write_json

    path = Path(model_dir) / SETTINGS_FILE
    write_json(path, settings.to_dict())
    return path


def load_settings(model_dir) -> EvalSettings | None:
    """The settings recorded with a model directory, or None when it has none."""
    from .checkpoint import read_json

    path = Path(model_dir) / SETTINGS_FILE
    return EvalSettings.from_dict(read_json(path)) if path.is_file() else None


# ---- the sets -------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    name: str
    windows: dict[str, torch.Tensor]  # group -> (N, S + 1) int64
    units: dict[str, torch.Tensor]    # group -> (N, S) int64: unit of each target token
    labels: dict[str, list[str]] = field(default_factory=dict)  # group -> a name per unit (optional)

    @property
    def groups(self) -> list[str]:
        return list(self.windows)

    def num_tokens(self) -> int:
        return sum(int(w[:, 1:].numel()) for w in self.windows.values())


def _doc_tokens(tokenizer, docs: list[str]) -> list[list[int]]:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    return [enc.ids + [eos] for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False)]


def heldout_set(tokens: dict[str, list[list[int]]], seq_len: int, eval_tokens: int) -> EvalSet:
    windows, units = {}, {}
    for dom, docs in tokens.items():
        stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        doc_of = torch.tensor([i for i, d in enumerate(docs) for _ in d], dtype=torch.long)
        n = min((stream.numel() - 1) // seq_len, max(1, eval_tokens // seq_len))
        if n < 1:
            raise ValueError(f"held-out data of {dom!r} is too short for one window of {seq_len + 1} tokens")
        idx_NS = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        windows[dom] = stream[idx_NS]
        units[dom] = doc_of[idx_NS[:, 1:]]
    return EvalSet("heldout", windows, units)


def short_set(tokens: dict[str, list[list[int]]], short_tokens: int) -> EvalSet:
    windows, units = {}, {}
    for dom, docs in tokens.items():
        rows = [d[:short_tokens + 1] for d in docs if len(d) >= short_tokens + 1]
        if not rows:  # a domain of short documents has no short-context score
            continue
        windows[dom] = torch.tensor(rows, dtype=torch.long)
        units[dom] = torch.arange(len(rows))[:, None].expand(len(rows), short_tokens).clone()
    return EvalSet("short", windows, units)


def mixed_set(tokens: dict[str, list[list[int]]], seq_len: int, per_pair: int) -> EvalSet:
    half = (seq_len + 1) // 2
    rows, labels = [], []
    for a, b in itertools.combinations(list(tokens), 2):
        da = [d for d in tokens[a] if len(d) >= seq_len + 1 - half]
        db = [d for d in tokens[b] if len(d) >= seq_len + 1 - half]
        if not da or not db:
            continue
        for r in range(per_pair):
            first, second, fa, fb = (da[r % len(da)], db[r % len(db)], a, b) if r % 2 == 0 else \
                (db[r % len(db)], da[r % len(da)], b, a)
            rows.append(first[:half] + second[:seq_len + 1 - half])
            labels.append(f"{fa}+{fb}")
    if not rows:
        raise ValueError("mixed windows need at least two domains with long enough documents")
    w = torch.tensor(rows, dtype=torch.long)
    return EvalSet("mixed", {"all": w}, {"all": torch.arange(len(rows))[:, None].expand(len(rows), seq_len).clone()},
                   {"all": labels})


def build_eval_sets(tokenizer, heldout_docs: dict[str, list[str]], settings: EvalSettings) -> dict[str, EvalSet]:
    """{"heldout", "short", "mixed"} sets from each domain's held-out documents."""
    if not heldout_docs:
        raise ValueError("no held-out documents")
    tokens = {d: _doc_tokens(tokenizer, docs) for d, docs in heldout_docs.items()}
    sets = {"heldout": heldout_set(tokens, settings.seq_len, settings.eval_tokens)}
    short = short_set(tokens, settings.short_tokens)
    if short.windows:
        sets["short"] = short
    if len(tokens) >= 2:
        try:
            sets["mixed"] = mixed_set(tokens, settings.seq_len, settings.mixed_per_pair)
        except ValueError:  # no two domains with long enough documents
            pass
    return sets


# ---- scoring ----------------------------------------------------------------------------------------
@torch.no_grad()
def token_nll(model: nn.Module, windows_NS1: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Next-token NLL (N, S) float64 of ``model`` on windows (N, S + 1)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, windows_NS1.shape[0], batch_size):
            ids = windows_NS1[s:s + batch_size].to(device)
            logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)
            out.append(-logp.gather(-1, ids[:, 1:, None])[..., 0].double().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def btm_mix(logp_MBSV: torch.Tensor, ids_BS: torch.Tensor, top_k: int | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """BTM mixture log-probs (B, S, V): member weights softmax(prefix log-likelihood / T); with
    ``top_k`` only the k highest-weighted members per position, renormalised (the paper's BTM top-2)."""
    logw = btm_log_weights(logp_MBSV, ids_BS, temperature)
    M = logw.shape[0]
    if top_k is not None and top_k < M:
        keep = torch.zeros_like(logw, dtype=torch.bool).scatter_(0, logw.topk(top_k, dim=0).indices, True)
        logw = logw.masked_fill(~keep, float("-inf"))
        logw = logw - torch.logsumexp(logw, dim=0, keepdim=True)
    return torch.logsumexp(logp_MBSV + logw[..., None], dim=0)


@torch.no_grad()
def ensemble_token_nll(members: list[nn.Module], windows_NS1: torch.Tensor, top_ks=(None, 2),
                       temperature: float = 1.0) -> tuple[list[torch.Tensor], dict]:
    """(each member's NLL (N, S), {top_k: BTM NLL (N, S)}) running every member once per window."""
    device = next(members[0].parameters()).device
    for m in members:
        m.eval()
    per = [[] for _ in members]
    mix = {k: [] for k in top_ks}
    for row in windows_NS1:
        ids = row[None].to(device)
        inp, tgt = ids[:, :-1], ids[:, 1:]
        logp = torch.stack([F.log_softmax(m(inp).float(), dim=-1) for m in members])
        for i in range(len(members)):
            per[i].append(-logp[i].gather(-1, tgt[..., None])[..., 0].double().cpu())
        for k in top_ks:
            mix[k].append(-btm_mix(logp, inp, k, temperature).gather(-1, tgt[..., None])[..., 0].double().cpu())
    return [torch.cat(p) for p in per], {k: torch.cat(v) for k, v in mix.items()}


Scores = dict  # {set: {group: (sums_U float64, counts_U float64)}}


def unit_sums(nll_NS: torch.Tensor, units_NS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U = int(units_NS.max()) + 1
    sums = torch.zeros(U, dtype=torch.float64).index_add_(0, units_NS.flatten(), nll_NS.flatten().double())
    counts = torch.zeros(U, dtype=torch.float64).index_add_(0, units_NS.flatten(),
                                                           torch.ones(units_NS.numel(), dtype=torch.float64))
    keep = counts > 0
    return sums[keep], counts[keep]


def scores_of(nll: dict[str, dict[str, torch.Tensor]], sets: dict[str, EvalSet]) -> Scores:
    """Per-unit (sums, counts) from per-token NLL {set: {group: (N, S)}}."""
    return {s: {g: unit_sums(nll[s][g], sets[s].units[g]) for g in sets[s].groups} for s in nll}


def score_model(model: nn.Module, sets: dict[str, EvalSet], batch_size: int = 8) -> Scores:
    nll = {s: {g: token_nll(model, w, batch_size) for g, w in es.windows.items()} for s, es in sets.items()}
    return scores_of(nll, sets)


def score_ensemble(members: dict[str, nn.Module], sets: dict[str, EvalSet], top_ks=(None, 2)) -> tuple[dict, dict]:
    """({member: Scores}, {top_k: Scores of BTM}) for the members run once."""
    names = list(members)
    per = {n: {} for n in names}
    mix = {k: {} for k in top_ks}
    for s, es in sets.items():
        for n in names:
            per[n][s] = {}
        for k in top_ks:
            mix[k][s] = {}
        for g, w in es.windows.items():
            p, m = ensemble_token_nll([members[n] for n in names], w, top_ks)
            for n, x in zip(names, p):
                per[n][s][g] = x
            for k in top_ks:
                mix[k][s][g] = m[k]
    return {n: scores_of(per[n], sets) for n in names}, {k: scores_of(mix[k], sets) for k in top_ks}


# ---- bootstrap ---------------------------------------------------------------------------------------
class Bootstrap:
    """Seeded resampling of units, fixed per (set, group) so every model sees the same replicates."""

    def __init__(self, reference: Scores, replicates: int = 1000, seed: int = 0):
        if replicates < 10:
            raise ValueError(f"bootstrap needs at least 10 replicates, got {replicates}")
        self.replicates = replicates
        self.index = {}
        for i, (s, groups) in enumerate(sorted(reference.items())):
            for j, (g, (sums, _)) in enumerate(sorted(groups.items())):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i + j)
                self.index[(s, g)] = torch.randint(0, sums.numel(), (replicates, sums.numel()), generator=gen)

    def replicates_of(self, scores: Scores, set_name: str) -> dict[str, torch.Tensor]:
        """{group: (B,) resampled losses, "avg": (B,) their unweighted mean}."""
        out = {}
        for g, (sums, counts) in scores[set_name].items():
            idx = self.index[(set_name, g)]
            out[g] = sums[idx].sum(1) / counts[idx].sum(1)
        out["avg"] = torch.stack([out[g] for g in scores[set_name]]).mean(0)
        return out

    @staticmethod
    def _interval(x_B: torch.Tensor) -> tuple[float, float]:
        q = torch.quantile(x_B, torch.tensor([0.025, 0.975], dtype=x_B.dtype))
        return float(q[0]), float(q[1])

    def summarize(self, scores: Scores) -> dict:
        """{set: {group or "avg": [point, low, high]}}."""
        out = {}
        for s, groups in scores.items():
            reps = self.replicates_of(scores, s)
            pts = {g: float(sums.sum() / counts.sum()) for g, (sums, counts) in groups.items()}
            pts["avg"] = sum(pts[g] for g in groups) / len(groups)
            out[s] = {g: [pts[g], *self._interval(reps[g])] for g in pts}
        return out

    def paired(self, a: Scores, b: Scores, set_name: str, group: str = "avg") -> dict:
        """a - b on one set/group: {"diff", "low", "high", "significant"} (interval excludes 0)."""
        ra, rb = self.replicates_of(a, set_name), self.replicates_of(b, set_name)
        pa = self.summarize({set_name: a[set_name]})[set_name][group][0]
        pb = self.summarize({set_name: b[set_name]})[set_name][group][0]
        lo, hi = self._interval(ra[group] - rb[group])
        return {"diff": pa - pb, "low": lo, "high": hi, "significant": _excludes_zero(lo, hi)}


# A difference counts only when its whole interval clears this (nats/token): models that differ by a
# router bias of -1e-3 give consistent shifts of 1e-5 whose intervals exclude 0, but an effect that
# rounds to 0.000 in the report's tables is not one.
NEGLIGIBLE = 5e-4


def _excludes_zero(lo: float, hi: float) -> bool:
    return bool(lo > NEGLIGIBLE or hi < -NEGLIGIBLE)


def seeds_paired(per_seed_a: list[Scores], per_seed_b: list[Scores], boot: Bootstrap, set_name: str,
                 replicates: int | None = None, seed: int = 0) -> dict:
    """a - b over several training seeds: each replicate draws seeds with replacement and averages
    their document-bootstrap replicate differences (a two-level bootstrap). "per_seed" lists each
    seed's point difference."""
    if len(per_seed_a) != len(per_seed_b) or not per_seed_a:
        raise ValueError("need the same, non-zero number of seeds on both sides")
    diffs = [boot.replicates_of(a, set_name)["avg"] - boot.replicates_of(b, set_name)["avg"]
             for a, b in zip(per_seed_a, per_seed_b)]
    points = [boot.paired(a, b, set_name)["diff"] for a, b in zip(per_seed_a, per_seed_b)]
    D = torch.stack(diffs)  # (n_seeds, B)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, D.shape[0], (D.shape[1], D.shape[0]), generator=gen)  # (B, n_seeds)
    rep = D.gather(0, pick.T).mean(0)
    lo, hi = Bootstrap._interval(rep)
    return {"diff": sum(points) / len(points), "low": lo, "high": hi, "significant": _excludes_zero(lo, hi),
            "per_seed": points}


def fmt(cell, digits: int = 3) -> str:
    """'point [low, high]'."""
    p, lo, hi = cell
    return f"{p:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def is_finite_summary(summary: dict) -> bool:
    return all(math.isfinite(x) for s in summary.values() for cell in s.values() for x in cell)


# ---- a model directory --------------------------------------------------------------------------------
def evaluate_dir(model_dir, *, data=None, opt_out=(), top_k: int | None = None, device: str = "cpu",
                 settings: EvalSettings | None = None, **overrides) -> dict:
    """The suite on a model directory, with the settings recorded next to it (``eval_settings.json``,
    written by the demo) unless given (no record: the defaults with the model's own seq_len);
    ``overrides`` (seq_len, eval_tokens, max_bytes, ... not None) replace single fields. Opt-out rows
    mask the named experts at inference, top-k lowered to the active experts when fewer remain (as
    in the checkpoint ``merge.opt_out`` writes).

    Returns {"names", "domains", "settings", "rows": {label: {domain: held-out loss}},
    "summary": {label: {set: {group: [point, low, high]}}}, "paired": {label: {set: diff vs model}}}.
    """
    from .checkpoint import TOKENIZER_FILE
    from .data import DOMAINS, domain_split
    from .merge import load_model, mask_experts
    from .tokenizer import load_tokenizer

    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"unknown evaluation settings {sorted(bad)}")
    model, names = load_model(model_dir, device)
    # without recorded settings: the defaults, windows of the model's own length
    settings = settings or load_settings(model_dir) or EvalSettings(seq_len=model.config.seq_len)
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [n for n in opt_out if n not in names[1:]]
    if unknown:
        raise ValueError(f"no owner expert named {unknown} in {model_dir}; owner experts: {names[1:]}")
    if top_k is not None:
        model.set_top_k(top_k)
    if settings.seq_len > model.config.seq_len:
        raise ValueError(f"seq_len={settings.seq_len} exceeds the model's {model.config.seq_len}")
    tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
    held = {str(s): domain_split(s, settings.max_bytes, settings.heldout_fraction, settings.split_seed)[1]
            for s in (data or DOMAINS)}
    sets = build_eval_sets(tok, held, settings)
    scores = {"model": score_model(model, sets, settings.batch_size)}
    k = model.config.top_k if model.moe_layers() else None
    for name in opt_out:
        model.set_top_k(min(k, len(names) - 1))  # what opt_out's checkpoint without the expert keeps
        mask_experts(model, [name], names)
        scores[f"without {name}"] = score_model(model, sets, settings.batch_size)
        model.set_expert_mask([True] * len(names))
        model.set_top_k(k)
    boot = Bootstrap(scores["model"], settings.bootstrap, settings.bootstrap_seed)
    summary = {k: boot.summarize(v) for k, v in scores.items()}
    paired = {k: {s: boot.paired(v, scores["model"], s) for s in sets} for k, v in scores.items() if k != "model"}
    return {"names": names, "domains": list(held), "settings": settings.to_dict(),
            "rows": {k: {d: v["heldout"][d][0] for d in held} for k, v in summary.items()},
            "summary": summary, "paired": paired}
