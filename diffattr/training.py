"""Denoising training of a network on a small in-memory image set, and the toy UNets it trains.

Used by the toy models (``scripts/train_toy.py``, ``scripts/make_tiny_sd.py``), by the evaluation
protocols (LDS subset models, customization fine-tunes) and by the tests; by nothing in the
attribution path itself: attribution never trains the user's model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .denoisers import Denoiser
from .losses import denoising_loss


def toy_unet(
    *,
    sample_size: int,
    block_out_channels: tuple[int, ...],
    attention_levels: tuple[int, ...] | None = None,
    norm_num_groups: int = 8,
    num_class_embeds: int | None = None,
):
    """A small grayscale UNet2DModel: one block per level, self-attention at ``attention_levels``.

    Levels count from the highest resolution (0); the default puts attention at the lowest only.
    The bundled toy model is ``toy_unet(sample_size=16, block_out_channels=(16, 32, 64))``; the LDS
    protocol's subset models, the tests' random models and the other toy models of
    ``benchmarks/zoo.py`` are other widths and attention placements of it.
    """
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    attention = {levels - 1} if attention_levels is None else set(attention_levels)
    down = tuple("AttnDownBlock2D" if level in attention else "DownBlock2D" for level in range(levels))
    up = tuple("AttnUpBlock2D" if level in attention else "UpBlock2D" for level in reversed(range(levels)))
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_class_embeds,
    )


def _draw(generator, images, labels, size):
    index = torch.randint(len(images), (size,), generator=generator)
    return images[index], None if labels is None else labels[index]


def train_denoiser(
    model: Denoiser,
    images: torch.Tensor,
    *,
    network: torch.nn.Module | None = None,
    labels: torch.Tensor | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    warmup: float = 0.05,
    drop_conditions: float = 0.0,
    empty_condition: torch.Tensor | None = None,
    prior: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    prior_batch_size: int = 0,
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
) -> list[float]:
    """Trains a network in place on the denoising loss of ``images`` (one-cycle AdamW, clipped).

    Args:
        model: the model family (forward process, target); ``denoisers.in_memory`` wraps a bare
            network and scheduler.
        network: the network that trains (default: the model's own; e.g. a copy being fine-tuned).
        images: ``(N, C, H, W)`` training images in [-1, 1], or their latents.
        labels: ``(N,)`` class labels, ``(N, L, D)`` caption hidden states, or ``None``.
        parameters: the parameters that train (default: all; e.g. a LoRA adapter's).
        steps: optimizer steps; each draws ``batch_size`` images with replacement.
        warmup: share of the steps over which the learning rate warms up (at least two steps, at
            most half of them).
        drop_conditions: share of the conditions replaced by ``empty_condition`` (the empty
            prompt's hidden states), so that classifier-free guidance works.
        prior: ``(images, labels)`` of which ``prior_batch_size`` more join every batch (prior
            preservation, as in DreamBooth fine-tunes).
        seed: seeds batches, timesteps and noise, so a run is reproducible.

    Returns:
        The training loss of every step.
    """
    if steps < 4:
        raise ValueError(f"steps={steps}: train for at least 4 steps")
    if drop_conditions > 0 and (empty_condition is None or labels is None):
        raise ValueError("drop_conditions needs labels and the empty_condition that replaces them")
    generator = torch.Generator().manual_seed(seed)
    network = model.network if network is None else network
    parameters = list(network.parameters()) if parameters is None else parameters
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    # OneCycleLR divides by its warm-up length in steps: at least two (a smoke run's 20 steps).
    warmup = min(max(warmup, 2 / steps), 0.5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=warmup)
    device = next(network.parameters()).device
    network.train()
    history = []
    for _ in tqdm(range(steps), disable=not progress, desc=description):
        clean, conditions = _draw(generator, images, labels, batch_size)
        if prior is not None and prior_batch_size > 0:
            prior_clean, prior_conditions = _draw(generator, *prior, prior_batch_size)
            clean = torch.cat([clean, prior_clean])
            conditions = None if conditions is None else torch.cat([conditions, prior_conditions])
        if drop_conditions > 0:
            dropped = torch.rand(len(clean), *([1] * (conditions.dim() - 1)), generator=generator) < drop_conditions
            conditions = torch.where(dropped, empty_condition, conditions)
        t = torch.randint(0, model.num_train_timesteps, (len(clean),), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        conditions = None if conditions is None else conditions.to(device)
        loss = denoising_loss(model, clean.to(device), noise.to(device), t.to(device), conditions, network=network)
        loss = loss.loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    network.eval()
    return history
