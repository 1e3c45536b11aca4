"""Denoising training of a UNet on a small in-memory image set.

Used by the toy model, by the evaluation protocols (LDS subset models, customization fine-tunes)
and by nothing in the attribution path itself: attribution never trains the user's model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .denoisers import Denoiser
from .losses import denoising_loss


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
        seed: seeds batches, timesteps and noise, so a run is reproducible.

    Returns:
        The training loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    network = model.network if network is None else network
    parameters = list(network.parameters()) if parameters is None else parameters
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=warmup)
    device = next(network.parameters()).device
    network.train()
    history = []
    for _ in tqdm(range(steps), disable=not progress, desc=description):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        t = torch.randint(0, model.num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *images.shape[1:]), generator=generator)
        conditions = None if labels is None else labels[index].to(device)
        clean = images[index].to(device)
        loss = denoising_loss(model, clean, noise.to(device), t.to(device), conditions, network=network).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    network.eval()
    return history
