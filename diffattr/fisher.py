"""AbU's elastic-weight-consolidation penalty: a diagonal Fisher of the training loss, and the
penalty that keeps a perturbed copy near the model where the training set needs it.

Attribution by Unlearning (Wang et al., NeurIPS 2024) unlearns the query while an EWC penalty
(Kirkpatrick et al., 2017) ``λ/2 · Σ_i F_i (θ_i − θ*_i)²`` protects what the rest of the training set
relies on, so that the images whose loss rises are the query's own influences rather than the
images that move under any perturbation. ``F`` is the diagonal empirical Fisher: the mean over
training images of each parameter's squared loss gradient.

Here ``F`` is normalised to mean 1 over the parameters that move, so λ weighs the penalty
against the query's loss whatever the model's loss scale or size. Each training image contributes
one (timestep, noise) draw, a pure function of the run seed and its id (not of its position).
Launched on several processes, each takes its block of the images and the sums are added up.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import distributed
from .denoisers import Denoiser
from .losses import denoising_loss, gradients_of
from .noise import noise_key


def diagonal_fisher(
    model: Denoiser,
    encodings: torch.Tensor,
    conditions: torch.Tensor | None,
    ids: list[str],
    names: list[str],
    *,
    rows: list[int],
    seed: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the training loss for the named parameters, mean 1.

    Args:
        encodings: ``(N, C, H, W)`` training encodings; ``conditions`` ``(N, ...)`` or ``None``.
        ids: training ids (they seed each image's draw).
        names: the parameters of ``model.network`` to estimate it for.
        rows: the training images (row indices) it is estimated on.
        seed: the run seed.

    Returns:
        ``{name: F}`` with each ``F`` shaped like its parameter, float32 on the CPU.
    """
    parameters = dict(model.network.named_parameters())
    chosen = [parameters[name] for name in names]
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    generator = torch.Generator()
    mine = distributed.block(len(rows))  # sharded: this process's images, the sums added up below
    with gradients_of(chosen):
        for row in tqdm(rows[mine.start : mine.stop], disable=not (progress and distributed.is_main()), desc="fisher"):
            generator.manual_seed(noise_key(seed, "fisher:" + ids[row]))
            t = torch.randint(0, model.num_train_timesteps, (1,), generator=generator)
            clean = encodings[row : row + 1].to(model.device)
            noise = torch.randn(clean.shape, generator=generator).to(model.device)
            condition = None if conditions is None else conditions[row : row + 1].to(model.device)
            loss = denoising_loss(model, clean, noise, t.to(model.device), condition).loss.mean()
            for square, gradient in zip(squares, torch.autograd.grad(loss, chosen)):
                square += gradient.float().pow(2).cpu()
    for square in squares:
        distributed.all_sum(square)
    total = sum(square.sum() for square in squares)
    count = sum(square.numel() for square in squares)
    mean = (total / count).clamp_min(torch.finfo(torch.float32).tiny)
    return {name: square / mean for name, square in zip(names, squares)}


def ewc_penalty(
    moving: list[tuple[str, torch.nn.Parameter]], anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``½ Σ_i F_i (θ_i − θ*_i)²`` over the moving parameters (``anchor``: the model's θ*; ``anchor``
    and ``fisher`` on the parameters' device and dtype, every moving parameter in both)."""
    return 0.5 * torch.stack([(fisher[name] * (p - anchor[name]).pow(2)).sum() for name, p in moving]).sum()
