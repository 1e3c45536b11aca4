"""Forward-only denoising losses of many images at a grid of timesteps, with common random numbers.

Rows are the flattened triples (image i, timestep k, draw s), draw fastest. Each row's noise comes
from :func:`diffattr.noise.noise_key` of its image id, so a row's loss is the same whatever batch it
lands in. This module runs the forward passes; what the numbers mean lives in ``scoring.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import DiffusionModel
from .noise import draw_noise, noise_key


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = √ᾱ x_0 + √(1−ᾱ) ε``; ``alpha_bar`` has shape ``(B,)``."""
    alpha_bar = alpha_bar.view(-1, *([1] * (clean.dim() - 1)))
    return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise


def denoising_target(
    clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network is trained to output: ε, ``v = √ᾱ ε − √(1−ᾱ) x_0``, or ``x_0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    if prediction_type == "v_prediction":
        alpha_bar = alpha_bar.view(-1, *([1] * (clean.dim() - 1)))
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension; shape ``(B,)``."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


@dataclass
class LossMatrix:
    """Losses of N images at K timesteps, averaged over S draws.

    Attributes:
        losses: ``(N, K)`` denoising loss of the scored model.
        prediction_change: ``(N, K)`` mean squared difference between the scored model's and the
            reference model's outputs, when a reference was given; else ``None``.
    """

    losses: torch.Tensor
    prediction_change: torch.Tensor | None = None


@torch.inference_mode()
def loss_matrix(
    model: DiffusionModel,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    *,
    timesteps: torch.Tensor,
    num_draws: int,
    seed: int,
    batch_size: int = 256,
    unet: torch.nn.Module | None = None,
    reference_unet: torch.nn.Module | None = None,
    progress: bool = True,
    description: str = "scoring",
) -> LossMatrix:
    """Denoising loss of every image at every grid timestep, forward passes only.

    Args:
        model: the diffusion model (its schedule and prediction type).
        encodings: ``(N, C, H, W)`` clean images in the model's space.
        conditions: ``(N, ...)`` conditions, or ``None``.
        ids: the N image ids; they seed the noise.
        timesteps: ``(K,)`` grid of timesteps.
        num_draws: S noise draws per (image, timestep).
        seed: run seed.
        batch_size: rows per forward pass (no effect on the values).
        unet: network to score (default: the model's own).
        reference_unet: if given, also measure the change of prediction against it.
        progress: show a progress bar.

    Returns:
        A :class:`LossMatrix`.
    """
    num_images, num_timesteps = len(ids), len(timesteps)
    if encodings.shape[0] != num_images:
        raise ValueError(f"{encodings.shape[0]} encodings for {num_images} ids")
    device, shape = model.device, tuple(encodings.shape[1:])
    alphas = model.alphas_cumprod.to(device)
    grid = timesteps.to(device)
    rows_per_image = num_timesteps * num_draws
    total = num_images * rows_per_image
    losses = torch.empty(total)
    changes = torch.empty(total) if reference_unet is not None else None
    with tqdm(total=total, disable=not progress, desc=description, unit="row") as bar:
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total))
            image, k, draw = rows // rows_per_image, (rows // num_draws) % num_timesteps, rows % num_draws
            keys = [noise_key(seed, ids[i], kk, ss) for i, kk, ss in zip(image.tolist(), k.tolist(), draw.tolist())]
            noise = draw_noise(keys, shape).to(device)
            clean = encodings[image].to(device, non_blocking=True)
            t = grid[k.to(device)]
            alpha_bar = alphas[t]
            noisy = add_noise(clean, noise, alpha_bar)
            condition = None if conditions is None else conditions[image].to(device)
            prediction = model.predict(noisy, t, condition, unet=unet)
            target = denoising_target(clean, noise, alpha_bar, model.prediction_type)
            losses[rows] = per_sample_mse(prediction, target).cpu()
            if changes is not None:
                reference = model.predict(noisy, t, condition, unet=reference_unet)
                changes[rows] = per_sample_mse(prediction, reference).cpu()
            bar.update(len(rows))

    def per_timestep(values: torch.Tensor) -> torch.Tensor:
        return values.view(num_images, num_timesteps, num_draws).mean(-1)

    return LossMatrix(per_timestep(losses), None if changes is None else per_timestep(changes))
