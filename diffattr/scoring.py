"""From loss matrices to one influence score per training image. Pure tensor functions.

Shapes: ``baseline`` B and ``after`` A are ``(N, K)`` losses of N training images at K timesteps,
before and after the perturbation; ``delta`` is ``A − B``. Scores are ``(N,)`` and always read
*higher = more influential*: with descent a helpful image's loss drops, with ascent it rises.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def direction_sign(direction: str) -> float:
    """+1 when a rising loss means influence (ascent), −1 when a falling one does (descent)."""
    return 1.0 if direction == "ascent" else -1.0


def mean_delta(delta: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of the raw loss change. ``(N, K) → (N,)``."""
    return direction_sign(direction) * delta.mean(1)


def relative_delta(delta: torch.Tensor, baseline: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of ``Δ / B``: each timestep counts in proportion to its own scale,
    so the tiny losses of small t are not drowned by the large ones. ``(N, K) → (N,)``."""
    return direction_sign(direction) * (delta / baseline.clamp_min(_EPS)).mean(1)


def zscore_delta(delta: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of Δ z-scored within each timestep (column). ``(N, K) → (N,)``."""
    centred = delta - delta.mean(0, keepdim=True)
    scale = delta.std(0, keepdim=True) if delta.shape[0] > 1 else torch.ones_like(centred[:1])
    return direction_sign(direction) * (centred / scale.clamp_min(_EPS)).mean(1)


def calibrated_delta(delta: torch.Tensor, reference: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean Δ of each image divided by how much its mean loss typically moves when the model
    is perturbed on *some other* image (``reference``, from ``calibration.py``). ``(N, K), (N,) → (N,)``.

    Memorized images (tiny losses) and fragile ones move under any perturbation; dividing by their
    usual response keeps them from topping every query, and lets a small but unusual change count.
    """
    return direction_sign(direction) * delta.mean(1) / reference.clamp_min(_EPS)


def prediction_change(change: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Mean over timesteps of ``‖ε_θ′ − ε_θ‖² / B`` (unsigned: any change is influence). ``(N, K) → (N,)``."""
    return (change / baseline.clamp_min(_EPS)).mean(1)


def aggregate(
    aggregation: str,
    *,
    baseline: torch.Tensor,
    after: torch.Tensor,
    direction: str,
    change: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatches to one of the aggregations above by name. ``(N, K) → (N,)``."""
    delta = after - baseline
    if aggregation == "relative":
        return relative_delta(delta, baseline, direction=direction)
    if aggregation == "loss":
        return mean_delta(delta, direction=direction)
    if aggregation == "zscore":
        return zscore_delta(delta, direction=direction)
    if aggregation == "calibrated":
        if reference is None:
            raise ValueError("the `calibrated` aggregation needs the calibration reference")
        return calibrated_delta(delta, reference, direction=direction)
    if aggregation == "prediction":
        if change is None:
            raise ValueError("the `prediction` aggregation needs the prediction change matrix")
        return prediction_change(change, baseline)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores and their indices, ties broken by the lower index (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return scores[order], order
