"""Denoising training of a UNet on a small in-memory image set.

Used by the toy model, by the evaluation protocols (LDS subset models, customization fine-tunes)
and by nothing in the attribution path itself: attribution never trains the user's model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .losses import add_noise, denoising_target
from .models import run_unet


def train_denoiser(
    unet: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    *,
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
    """Trains ``unet`` in place on the denoising loss of ``images`` (one-cycle AdamW, clipped).

    Args:
        unet: a diffusers UNet2DModel, or a UNet2DConditionModel of a latent text-to-image model.
        scheduler: its noise schedule (``alphas_cumprod``, ``config.prediction_type``).
        images: ``(N, C, H, W)`` training images in [-1, 1], or their latents.
        labels: ``(N,)`` class labels, ``(N, L, D)`` caption hidden states, or ``None``.
        parameters: the parameters that train (default: all; e.g. a LoRA adapter's).
        steps: optimizer steps; each draws ``batch_size`` images with replacement.
        seed: seeds batches, timesteps and noise, so a run is reproducible.

    Returns:
        The training loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    parameters = list(unet.parameters()) if parameters is None else parameters
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=warmup)
    alphas = scheduler.alphas_cumprod
    prediction_type = scheduler.config.prediction_type
    device = next(unet.parameters()).device
    unet.train()
    history = []
    for _ in tqdm(range(steps), disable=not progress, desc=description):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        t = torch.randint(0, len(alphas), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *images.shape[1:]), generator=generator)
        clean, alpha_bar = images[index], alphas[t]
        noisy = add_noise(clean, noise, alpha_bar)
        target = denoising_target(clean, noise, alpha_bar, prediction_type)
        conditions = None if labels is None else labels[index].to(device)
        prediction = run_unet(unet, noisy.to(device), t.to(device), conditions)
        loss = torch.nn.functional.mse_loss(prediction, target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    unet.eval()
    return history
