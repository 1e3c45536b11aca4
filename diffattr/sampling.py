"""Drawing images from a model, one seed per image, so each image is reproducible on its own."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models import DiffusionModel


@torch.inference_mode()
def generate(
    model: DiffusionModel,
    *,
    seeds: list[int],
    labels: list[int | None] | None = None,
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Samples one image per seed with the model's own scheduler.

    Args:
        model: the diffusion model.
        seeds: one seed per image; image i depends only on ``seeds[i]`` (and its label).
        labels: class labels, one per image, for class-conditional models.
        num_inference_steps: denoising steps (default: all training timesteps).

    Returns:
        ``(len(seeds), C, H, W)`` images in ``[-1, 1]``, on the CPU.
    """
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(num_inference_steps or model.num_train_timesteps)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    sample = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators]).to(model.device)
    conditions = model.conditions(labels or [None] * len(seeds), [f"seed {s}" for s in seeds])
    if conditions is not None:
        conditions = conditions.to(model.device)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling"):
        output = model.predict(sample, t.expand(len(seeds)).to(model.device), conditions)
        sample = scheduler.step(output, t, sample, generator=generators).prev_sample
    return sample.clamp(-1, 1).cpu()
