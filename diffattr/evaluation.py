"""Score matrices of every method for many queries at once, in memory: the evaluation protocols'
common engine (``scripts/eval_*.py``). Same math as ``Attributor``, without a run directory.

All functions return ``(Q, N)`` scores, higher = more influential, rows in query order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .calibration import calibration_reference
from .config import AGGREGATIONS, AttributionConfig, GradientConfig
from .gradients import kernel_scores, projected_gradients
from .losses import loss_matrix
from .models import DiffusionModel
from .noise import noise_key, timestep_grid
from .perturb import perturbed_copy
from .scoring import aggregate
from .similarity import pixel_similarity


@dataclass
class TrainingSet:
    """Encodings ``(N, C, H, W)``, conditions ``(N, ...)`` or ``None``, and ids of a training set."""

    encodings: torch.Tensor
    conditions: torch.Tensor | None
    ids: list[str]


@dataclass
class Queries:
    """Encodings ``(Q, C, H, W)``, conditions ``(Q, 1, ...)``-compatible or ``None``, and names."""

    encodings: torch.Tensor
    conditions: torch.Tensor | None
    names: list[str]

    def condition(self, q: int) -> torch.Tensor | None:
        return None if self.conditions is None else self.conditions[q : q + 1]


def baseline_losses(
    model: DiffusionModel, train: TrainingSet, *, num_timesteps: int, num_draws: int, seed: int, progress: bool = False
) -> torch.Tensor:
    """B: ``(N, K)`` losses of the unperturbed model on the run grid (as ``Attributor.cache``)."""
    return loss_matrix(
        model,
        train.encodings,
        train.conditions,
        train.ids,
        timesteps=timestep_grid(model.num_train_timesteps, num_timesteps),
        num_draws=num_draws,
        seed=seed,
        progress=progress,
        description="baseline",
    ).losses


def forward_inf_scores(
    model: DiffusionModel,
    train: TrainingSet,
    queries: Queries,
    config: AttributionConfig,
    *,
    baseline: torch.Tensor,
    num_timesteps: int,
    num_draws: int = 1,
    seed: int = 0,
    aggregations: Iterable[str] = ("calibrated", "loss", "zscore", "relative"),
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Forward-INF scores under several aggregations from one perturbation and pass per query.

    Args:
        baseline: ``(N, K)`` from :func:`baseline_losses` with the same grid, draws and seed.
        aggregations: names from ``config.AGGREGATIONS`` except ``prediction``.

    Returns:
        ``{aggregation: (Q, N) scores}``.
    """
    aggregations = list(aggregations)
    assert "prediction" not in aggregations and set(aggregations) <= set(AGGREGATIONS)
    grid = timestep_grid(model.num_train_timesteps, num_timesteps)
    out = {name: torch.empty(len(queries.names), len(train.ids)) for name in aggregations}
    reference = None
    if "calibrated" in aggregations:
        reference = calibration_reference(
            model,
            train.encodings,
            train.conditions,
            train.ids,
            config,
            baseline=baseline,
            timesteps=grid,
            num_draws=num_draws,
            seed=seed,
            progress=progress,
        )
    for q in tqdm(range(len(queries.names)), disable=not progress, desc="forward-inf queries"):
        unet, _ = perturbed_copy(
            model,
            queries.encodings[q],
            queries.condition(q),
            config,
            seed=noise_key(seed, "perturb:" + queries.names[q]),
        )
        after = loss_matrix(
            model,
            train.encodings,
            train.conditions,
            train.ids,
            timesteps=grid,
            num_draws=num_draws,
            seed=seed,
            unet=unet,
            progress=False,
        ).losses
        for name in aggregations:
            out[name][q] = aggregate(
                name, baseline=baseline, after=after, direction=config.direction, reference=reference
            )
    return out


def pixel_scores(train: TrainingSet, queries: Queries) -> torch.Tensor:
    return pixel_similarity(queries.encodings, train.encodings)


def gradient_features(
    model: DiffusionModel,
    images: torch.Tensor,
    conditions: torch.Tensor | None,
    names: list[str],
    *,
    method: str,
    num_timesteps: int,
    seed: int,
    projection_dim: int,
    progress: bool = True,
) -> torch.Tensor:
    """``(N, d)`` projected gradient features of TracIn (``loss``) or D-TRAK (``square``)."""
    return projected_gradients(
        model,
        images,
        conditions,
        names,
        method=method,
        timesteps=timestep_grid(model.num_train_timesteps, num_timesteps),
        seed=seed,
        config=GradientConfig(projection_dim=projection_dim),
        progress=progress,
        description=method,
    )


def dtrak_sweep(
    query_features: torch.Tensor, train_features: torch.Tensor, dampings: Iterable[float]
) -> dict[float, torch.Tensor]:
    """D-TRAK scores for every damping (λ / mean eigenvalue), ``inf`` included."""
    return {d: kernel_scores(query_features, train_features, damping=d) for d in dampings}
