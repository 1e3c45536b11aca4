"""The calibration of the ``calibrated`` aggregation: each training image's usual response.

R training images, spread evenly over the sorted ids, each play the query once: the model is
perturbed on it exactly as for a real query, and every training image's mean loss change is
recorded. An image's *reference* is the median over the R perturbations of its absolute mean change
— how much it moves when the model is pushed on something else (the median ignores the one
perturbation made on the image itself). Computed once per run directory, like the baseline.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import AttributionConfig
from .losses import loss_matrix
from .models import DiffusionModel
from .noise import noise_key
from .perturb import perturbed_copy


def calibration_indices(num_images: int, count: int) -> list[int]:
    """``min(count, N)`` indices spread evenly over ``[0, N)``."""
    count = min(count, num_images)
    return [(2 * j + 1) * num_images // (2 * count) for j in range(count)]


def calibration_reference(
    model: DiffusionModel,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    config: AttributionConfig,
    *,
    baseline: torch.Tensor,
    timesteps: torch.Tensor,
    num_draws: int,
    seed: int,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """``(N,)`` median over R calibration perturbations of each image's absolute mean loss change.

    Args:
        baseline: ``(N, K)`` losses of the unperturbed model on ``timesteps`` with the run's noise.
        config: the attribution settings real queries use (direction, steps, step size, …).
    """
    responses = []
    for index in tqdm(
        calibration_indices(len(ids), config.calibration_images), disable=not progress, desc="calibration"
    ):
        condition = None if conditions is None else conditions[index : index + 1]
        unet, _ = perturbed_copy(
            model, encodings[index], condition, config, seed=noise_key(seed, "calibration:" + ids[index])
        )
        after = loss_matrix(
            model,
            encodings,
            conditions,
            ids,
            timesteps=timesteps,
            num_draws=num_draws,
            seed=seed,
            batch_size=batch_size,
            unet=unet,
            progress=False,
        ).losses
        responses.append((after - baseline).mean(1).abs())
    return torch.stack(responses).median(0).values
