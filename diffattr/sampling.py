"""Drawing images from a model, one seed per image, so each image is reproducible on its own."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .denoisers import DiffusionModel


@torch.inference_mode()
def generate(
    model: DiffusionModel,
    *,
    seeds: list[int],
    labels: list[int | None] | None = None,
    prompts: list[str | None] | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Samples one image per seed with the model's own scheduler.

    Args:
        model: the diffusion model.
        seeds: one seed per image; image i depends only on ``seeds[i]`` (and its condition).
        labels: class labels, one per image, for class-conditional models.
        prompts: prompts, one per image, for text-to-image models.
        guidance_scale: classifier-free guidance of text-to-image models (1: the conditional
            branch alone; > 1 pushes away from the empty prompt).
        num_inference_steps: denoising steps (default: all training timesteps).

    Returns:
        ``(len(seeds), C, H, W)`` samples in the model's space, on the CPU: images in ``[-1, 1]``
        for pixel models, latents for latent models (``model.decode`` turns them into images).
    """
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    # All training timesteps by default; a scheduler with steps_offset (SD's) would step past the last one.
    scheduler.set_timesteps(num_inference_steps or model.num_train_timesteps - scheduler.config.get("steps_offset", 0))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    sample = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators]).to(model.device)
    names = [f"seed {s}" for s in seeds]
    conditions = model.conditions(names, labels=labels, prompts=prompts)
    guided = model.is_text_conditioned and guidance_scale != 1.0
    if guided:
        conditions = torch.cat([model.conditions(names, prompts=[""] * len(seeds)), conditions])
    if conditions is not None:
        conditions = conditions.to(model.device)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling"):
        timesteps = t.expand(len(seeds)).to(model.device)  # the network's own values (σ·T for flow matching)
        if guided:
            doubled = sample.repeat(2, 1, 1, 1)
            empty, conditional = model.call_network(doubled, timesteps.repeat(2), conditions).chunk(2)
            output = empty + guidance_scale * (conditional - empty)
        else:
            output = model.call_network(sample, timesteps, conditions)
        sample = scheduler.step(output, t, sample, generator=generators).prev_sample
    return (sample if model.is_latent else sample.clamp(-1, 1)).cpu()
