"""Proxy sets for router tuning, built as the FlexOlmo paper builds them.

Per owner, a binary classifier separates the owner's documents (label 1) from public documents
(label 0) on sentence embeddings; the owner's proxy set is the public documents the classifier
scores highest, at most ``proxy_fraction`` of the owner's data (the paper: |proxy| << 1% of it).
The classifier is fitted on the owner's side (its own embeddings never leave it); only the indices
of the chosen public documents do.

Selections (``PROXY_SELECTIONS``): "ranked" (the default, the paper's "top-scoring public
documents") fills the budget in score order; "thresholded" takes only documents the classifier puts
on the owner's side (decision value > 0) -- a classifier that separates the owner from the public
mix well may put none there, and the set is then the single top document whatever the budget.

The paper fine-tunes a small embedder as the classifier; an L2-regularised logistic regression on
frozen MiniLM embeddings is the light stand-in (fitted in torch, float64, full batch L-BFGS:
deterministic for the same inputs).

Shapes: N documents, D embedding width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .defaults import DEMO, PROXY_SELECTIONS


@dataclass(frozen=True)
class LogisticModel:
    """score(x) = sigmoid(w . (x - mean) / std + b), features standardised with the training stats."""
    w_D: torch.Tensor
    b: float
    mean_D: torch.Tensor
    std_D: torch.Tensor

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Decision values (N,) float64; > 0 means "looks like the owner's data"."""
        z = (x_ND.double() - self.mean_D) / self.std_D
        return z @ self.w_D + self.b


def fit_logistic(pos_ND: torch.Tensor, neg_ND: torch.Tensor, l2: float = 1e-2, steps: int = 100) -> LogisticModel:
    """L2-regularised logistic regression, classes weighted equally (mean loss per class).

    Args:
        pos_ND, neg_ND: positive (owner) and negative (public) feature rows, same width D.
        l2: weight of 0.5 * l2 * ||w||^2 (the bias is not penalised).
    """
    if pos_ND.dim() != 2 or neg_ND.dim() != 2 or pos_ND.shape[1] != neg_ND.shape[1]:
        raise ValueError(f"pos and neg must be (N, D) with the same D, got {tuple(pos_ND.shape)}, "
                         f"{tuple(neg_ND.shape)}")
    if not len(pos_ND) or not len(neg_ND):
        raise ValueError("the classifier needs at least one positive and one negative example")
    x = torch.cat([pos_ND, neg_ND]).double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    y = torch.cat([torch.ones(len(pos_ND)), torch.zeros(len(neg_ND))]).double()
    weight = torch.where(y > 0, 0.5 / len(pos_ND), 0.5 / len(neg_ND)).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(w.detach(), float(b.detach()), mean, std)


def proxy_budget(owner_docs: list[str], proxy_fraction: float) -> int:
    """Bytes a proxy set may hold: ``proxy_fraction`` of the owner's data (UTF-8 bytes)."""
    if not 0.0 < proxy_fraction <= 1.0:
        raise ValueError(f"proxy_fraction must be in (0, 1], got {proxy_fraction!r}")
    return int(proxy_fraction * sum(len(d.encode("utf-8")) for d in owner_docs))


def selection_min_score(selection: str) -> float:
    """The decision value a candidate must exceed under ``selection`` (one of ``PROXY_SELECTIONS``)."""
    if selection not in PROXY_SELECTIONS:
        raise ValueError(f"unknown proxy selection {selection!r}; choose from {PROXY_SELECTIONS}")
    return 0.0 if selection == "thresholded" else float("-inf")


def select_by_score(scores_N: torch.Tensor, sizes_N: list[int], budget: int,
                    min_score: float = float("-inf")) -> list[int]:
    """Indices of the top-scoring documents that fit in ``budget``, among those scoring above ``min_score``.

    Candidates (decision value > ``min_score``; the default: every document) are taken in
    descending score (ties: lower index first); one that would exceed the budget is skipped and the
    next is tried. When none fits (or none is a candidate), the single top-scoring document is
    returned, whatever its size. Returned in ascending index order.
    """
    if scores_N.dim() != 1 or len(sizes_N) != scores_N.shape[0]:
        raise ValueError(f"{scores_N.shape[0] if scores_N.dim() == 1 else scores_N.shape} scores "
                         f"but {len(sizes_N)} sizes")
    if not len(sizes_N):
        raise ValueError("no documents to select from")
    order = sorted(range(len(sizes_N)), key=lambda i: (-float(scores_N[i]), i))
    picked, used = [], 0
    for i in order:
        if float(scores_N[i]) <= min_score:
            break
        if used + sizes_N[i] <= budget:
            picked.append(i)
            used += sizes_N[i]
    return sorted(picked) if picked else order[:1]


@dataclass(frozen=True)
class Ranking:
    """An owner's classifier's view of the public documents (what every budget's selection starts from)."""
    scores: torch.Tensor        # (N,) float64 decision values of every public document
    train_accuracy: float       # of the classifier on its own training examples


def rank_public(owner_emb_ND: torch.Tensor, public_emb_ND: torch.Tensor, l2: float = 1e-2) -> Ranking:
    """Fit the owner-vs-public classifier and score every public document (row i = document i)."""
    clf = fit_logistic(owner_emb_ND, public_emb_ND, l2=l2)
    scores = clf.logits(public_emb_ND)
    acc = float(torch.cat([clf.logits(owner_emb_ND) > 0, scores <= 0]).double().mean())
    return Ranking(scores, acc)


def select_from_ranking(ranking: Ranking, public_docs: list[str], owner_docs: list[str], proxy_fraction: float,
                        selection: str = "ranked") -> list[int]:
    """Indices (into ``public_docs``) of the proxy set at ``proxy_fraction`` of the owner's bytes."""
    if ranking.scores.shape[0] != len(public_docs):
        raise ValueError(f"{len(public_docs)} public documents but {ranking.scores.shape[0]} scores")
    sizes = [len(d.encode("utf-8")) for d in public_docs]
    return select_by_score(ranking.scores, sizes, proxy_budget(owner_docs, proxy_fraction),
                           selection_min_score(selection))


@dataclass(frozen=True)
class ProxySet:
    indices: list[int]          # into the public documents
    scores: torch.Tensor        # (N,) classifier decision values of every public document
    train_accuracy: float       # of the classifier on its own training examples


def select_proxy_set(owner_emb_ND: torch.Tensor, public_emb_ND: torch.Tensor, public_docs: list[str],
                     owner_docs: list[str], proxy_fraction: float = DEMO.rt_proxy_fraction, l2: float = 1e-2,
                     selection: str = DEMO.rt_proxy_selection) -> ProxySet:
    """The owner's proxy set: public documents ranked by an owner-vs-public classifier.

    ``owner_emb_ND``: embeddings of (a sample of) the owner's documents, computed on its side.
    ``public_emb_ND``: embeddings of ``public_docs`` (row i = document i).
    ``owner_docs``: the owner's documents, only to size the budget (``proxy_fraction`` of their bytes).
    ``selection``: "ranked" (top-scoring, the paper's) or "thresholded" (only those on the owner's side).
    """
    if public_emb_ND.shape[0] != len(public_docs):
        raise ValueError(f"{len(public_docs)} public documents but {public_emb_ND.shape[0]} embeddings")
    selection_min_score(selection)  # a bad name fails before the fit
    r = rank_public(owner_emb_ND, public_emb_ND, l2)
    return ProxySet(select_from_ranking(r, public_docs, owner_docs, proxy_fraction, selection), r.scores,
                    r.train_accuracy)
