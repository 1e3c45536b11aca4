"""The denoising loss, and forward-only loss matrices of many images with common random numbers.

:func:`denoising_loss` is the one place where noise, forward process, prediction and target meet:
the scoring pass, the perturbation, the gradient baselines and training all call it.

In :func:`loss_matrix`, rows are the flattened triples (image i, timestep k, draw s), draw fastest.
Each row's noise comes from :func:`diffattr.noise.noise_key` of its image id, so a row's loss is
the same whatever batch, subset or process it lands in. What the numbers mean lives in ``scoring.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import distributed
from .denoisers import Denoiser
from .noise import ScoringGrid, draw_noise, noise_key


@contextmanager
def gradients_of(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients of these parameters of a frozen model inside the block (also inside a caller's
    ``no_grad`` or inference mode); their ``requires_grad`` is restored after it."""
    flags = [p.requires_grad for p in parameters]
    with torch.inference_mode(False), torch.enable_grad():
        for p in parameters:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in zip(parameters, flags):
                p.requires_grad_(flag)


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: str):
    """The forward passes' precision (``--dtype``): autocast for bf16/fp16, nothing for fp32."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST[dtype])


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension; shape ``(B,)``."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


class DenoisingLoss(NamedTuple):
    """Per-sample losses ``(B,)``, and the squared change of prediction against a reference network
    ``(B,)`` when one was given (else ``None``)."""

    loss: torch.Tensor
    change: torch.Tensor | None = None


def denoising_loss(
    model: Denoiser,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: torch.Tensor | None,
    *,
    network: torch.nn.Module | None = None,
    reference_network: torch.nn.Module | None = None,
) -> DenoisingLoss:
    """``‖target − f(x_t, t, c)‖²`` per sample, with ``x_t`` the model's forward process of ``clean``.

    Args:
        model: the model family (forward process, target, how to call the network).
        clean: ``(B, C, H, W)`` encodings; ``noise`` the same shape; ``timesteps`` ``(B,)``.
        conditions: ``(B, ...)`` conditions or ``None``.
        network: the network to score (default: the model's own; a perturbed copy).
        reference_network: if given, also ``‖f(x_t) − f_ref(x_t)‖²`` per sample.
    """
    (result,) = denoising_losses(
        model, clean, noise, timesteps, conditions, networks=[network], reference_network=reference_network
    )
    return result


def denoising_losses(
    model: Denoiser,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: torch.Tensor | None,
    *,
    networks: list[torch.nn.Module | None],
    reference_network: torch.nn.Module | None = None,
) -> list[DenoisingLoss]:
    """:func:`denoising_loss` of several networks on one batch: the noisy input, the target and the
    reference prediction are made once and shared (``None`` in ``networks``: the model's own)."""
    noisy = model.add_noise(clean, noise, timesteps)
    target = model.target(clean, noise, timesteps)
    reference = None
    if reference_network is not None:
        reference = model.predict(noisy, timesteps, conditions, network=reference_network)
    results = []
    for network in networks:
        prediction = model.predict(noisy, timesteps, conditions, network=network)
        change = None if reference is None else per_sample_mse(prediction, reference)
        results.append(DenoisingLoss(per_sample_mse(prediction, target), change))
    return results


@dataclass
class LossMatrix:
    """Losses of N images at K timesteps, averaged over S draws.

    Attributes:
        losses: ``(N, K)`` denoising loss of the scored network.
        prediction_change: ``(N, K)`` mean squared difference between the scored network's and the
            reference network's outputs, when a reference was given; else ``None``.
    """

    losses: torch.Tensor
    prediction_change: torch.Tensor | None = None


def loss_matrix(
    model: Denoiser,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    grid: ScoringGrid,
    *,
    images: range | torch.Tensor | None = None,
    columns: list[int] | None = None,
    network: torch.nn.Module | None = None,
    reference_network: torch.nn.Module | None = None,
    progress: bool = True,
    description: str = "scoring",
) -> LossMatrix:
    """Denoising loss of every image (or of the rows ``images``) at every grid timestep, forward only.

    Args:
        model: the model.
        encodings: ``(N, C, H, W)`` clean images in the model's space (a tensor or a sharded one).
        conditions: ``(N, ...)`` conditions, or ``None``.
        ids: the N image ids; they seed the noise.
        grid: timesteps, draws, seed and batch size of the run.
        images: the image rows to score, a range or a ``(M,)`` index tensor (default: all); the
            result has ``len(images)`` rows, in that order.
        columns: the grid timesteps to score, as indices into ``grid.timesteps`` (default: all);
            each keeps its noise, so the result's columns are those columns of the full matrix.
        network: network to score (default: the model's own).
        reference_network: if given, also measure the change of prediction against it.
        progress: show a progress bar.

    Returns:
        A :class:`LossMatrix`. Launched on several processes (``distributed.py``), each scores its
        block of the rows and every process returns the gathered whole.
    """
    (matrix,) = loss_matrices(
        model,
        encodings,
        conditions,
        ids,
        grid,
        networks=[network],
        images=images,
        columns=columns,
        reference_network=reference_network,
        progress=progress,
        description=description,
    )
    return matrix


@torch.inference_mode()
def loss_matrices(
    model: Denoiser,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    grid: ScoringGrid,
    *,
    networks: list[torch.nn.Module | None],
    images: range | torch.Tensor | None = None,
    columns: list[int] | None = None,
    reference_network: torch.nn.Module | None = None,
    progress: bool = True,
    description: str = "scoring",
) -> list[LossMatrix]:
    """:func:`loss_matrix` of several networks in one pass: each batch of rows is loaded, noised and
    (for the prediction change) scored by the reference once, then by every network — many queries'
    perturbed copies share one pass over the training set. The numbers are those of one pass per
    network."""
    if encodings.shape[0] != len(ids):
        raise ValueError(f"{encodings.shape[0]} encodings for {len(ids)} ids")
    rows = torch.arange(len(ids)) if images is None else torch.as_tensor(images, dtype=torch.long)
    mine = distributed.block(len(rows))  # all of them in one process
    local = _local_loss_matrices(
        model,
        encodings,
        conditions,
        ids,
        grid,
        rows[mine.start : mine.stop],
        torch.arange(len(grid.timesteps)) if columns is None else torch.as_tensor(columns, dtype=torch.long),
        networks,
        reference_network,
        progress and distributed.is_main(),
        description,
    )

    def gathered(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else distributed.gather_blocks(values, len(rows))

    return [LossMatrix(gathered(m.losses), gathered(m.prediction_change)) for m in local]


def _local_loss_matrices(
    model: Denoiser,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    grid: ScoringGrid,
    images: torch.Tensor,
    columns: torch.Tensor,
    networks: list[torch.nn.Module | None],
    reference_network: torch.nn.Module | None,
    progress: bool,
    description: str,
) -> list[LossMatrix]:
    num_images, num_timesteps, num_draws = len(images), len(columns), grid.num_draws
    device, shape = model.device, tuple(encodings.shape[1:])
    timesteps = grid.timesteps.to(device)
    rows_per_image = num_timesteps * num_draws
    total = num_images * rows_per_image
    losses = [torch.empty(total) for _ in networks]
    changes = [torch.empty(total) for _ in networks] if reference_network is not None else None
    with tqdm(total=total, disable=not progress, desc=description, unit="row") as bar:
        for start in range(0, total, grid.batch_size):
            rows = torch.arange(start, min(start + grid.batch_size, total))
            image = images[rows // rows_per_image]
            k, draw = columns[(rows // num_draws) % num_timesteps], rows % num_draws  # k: the grid's index
            keys = [
                noise_key(grid.seed, ids[i], kk, ss) for i, kk, ss in zip(image.tolist(), k.tolist(), draw.tolist())
            ]
            noise = draw_noise(keys, shape).to(device)
            clean = encodings[image].to(device, non_blocking=True)
            condition = None if conditions is None else conditions[image].to(device)
            with _autocast(device, grid.dtype):
                results = denoising_losses(
                    model,
                    clean,
                    noise,
                    timesteps[k.to(device)],
                    condition,
                    networks=networks,
                    reference_network=reference_network,
                )
            for n, result in enumerate(results):
                losses[n][rows] = result.loss.cpu()
                if changes is not None:
                    changes[n][rows] = result.change.cpu()
            bar.update(len(rows))

    def per_timestep(values: torch.Tensor) -> torch.Tensor:
        return values.view(num_images, num_timesteps, num_draws).mean(-1)

    return [
        LossMatrix(per_timestep(losses[n]), None if changes is None else per_timestep(changes[n]))
        for n in range(len(networks))
    ]
