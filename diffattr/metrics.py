"""Ground-truth metrics for attribution scores. Pure tensor functions.

Shapes: ``scores`` are ``(Q, N)`` (queries × training images, higher = more influential);
``relevant`` is a ``(Q, N)`` boolean mask of the training images that should come first.
"""

from __future__ import annotations

import torch


def first_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """``(Q,)`` 1-based rank of the best-ranked relevant image (ties broken against it)."""
    best = torch.where(relevant, scores, torch.full_like(scores, -torch.inf)).max(1).values
    irrelevant = torch.where(relevant, torch.full_like(scores, -torch.inf), scores)
    return 1 + (irrelevant >= best[:, None]).sum(1)


def top1_rate(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Fraction of queries whose top-ranked image is relevant (a tie with an irrelevant one fails)."""
    return (first_relevant_rank(scores, relevant) == 1).float().mean().item()


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Mean over queries of the fraction of relevant images among the top ``k``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hits = relevant.gather(1, top).sum(1).float()
    return (hits / relevant.sum(1).clamp_min(1)).mean().item()


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """``(Q,)`` average precision: mean over relevant images of the precision at their rank."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order).float()
    precision = hits.cumsum(1) / torch.arange(1, scores.shape[1] + 1)
    return (precision * hits).sum(1) / hits.sum(1).clamp_min(1)


def mean_average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    return average_precision(scores, relevant).mean().item()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties sharing their mean rank (as scipy.stats.rankdata)."""
    values = values.double()
    order = values.argsort(dim=-1, stable=True)
    sorted_values = values.gather(-1, order)
    n = values.shape[-1]
    position = torch.arange(n).expand_as(sorted_values)
    # A run of equal values spans [first, last]; every member's rank is the run's mean position + 1.
    starts_run = torch.ones_like(sorted_values, dtype=torch.bool)
    starts_run[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    ends_run = torch.ones_like(starts_run)
    ends_run[..., :-1] = starts_run[..., 1:]
    first = torch.where(starts_run, position, 0).cummax(-1).values
    last = torch.where(ends_run, position, n).flip(-1).cummin(-1).values.flip(-1)
    return torch.empty_like(values).scatter_(-1, order, (first + last).double() / 2 + 1)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row pair: ``(R, M), (R, M) → (R,)``."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.pow(2).sum(-1) * ry.pow(2).sum(-1)).sqrt()


def linear_datamodeling_score(scores: torch.Tensor, subsets: torch.Tensor, subset_losses: torch.Tensor) -> torch.Tensor:
    """Per-query LDS (TRAK, Park et al. 2023): Spearman correlation over subset models between the
    summed scores of each subset's members and the subset model's (negated) loss on the query.

    Args:
        scores: ``(Q, N)`` attribution scores, higher = helps the query more.
        subsets: ``(M, N)`` boolean membership of each subset model's training set.
        subset_losses: ``(M, Q)`` each subset model's loss on each query.

    Returns:
        ``(Q,)`` correlations; the LDS is their mean.
    """
    predicted = scores.double() @ subsets.double().T  # (Q, M)
    return spearman(predicted, -subset_losses.double().T)


def bootstrap_lds(
    scores: torch.Tensor, subsets: torch.Tensor, subset_losses: torch.Tensor, *, samples: int = 200, seed: int = 0
) -> tuple[float, float]:
    """Mean LDS and the standard deviation of that mean over bootstrap resamples of the subset models."""
    generator = torch.Generator().manual_seed(seed)
    full = linear_datamodeling_score(scores, subsets, subset_losses).mean().item()
    values = []
    for _ in range(samples):
        pick = torch.randint(len(subsets), (len(subsets),), generator=generator)
        values.append(linear_datamodeling_score(scores, subsets[pick], subset_losses[pick]).nanmean().item())
    values = torch.tensor(values)
    return full, values[~values.isnan()].std().item()
