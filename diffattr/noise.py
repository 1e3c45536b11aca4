"""Common random numbers: the timestep grid and noise that is a pure function of its coordinates.

The noise added to training image ``image_id`` at grid timestep ``k``, draw ``s``, depends on
``(seed, image_id, k, s)`` and nothing else — not on batch size, file order, subset or process
count — so the baseline and the perturbed model see exactly the same noisy inputs, and a cached
baseline stays valid for any later query.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ScoringConfig
from .errors import DiffattrError


def timestep_grid(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """The centres of ``num_timesteps`` equal bins of ``[0, num_train_timesteps)``.

    Returns:
        Long tensor of shape ``(K,)``, strictly increasing.
    """
    if not 1 <= num_timesteps <= num_train_timesteps:
        raise DiffattrError(
            f"--timesteps {num_timesteps}: must be between 1 and the scheduler's "
            f"{num_train_timesteps} training timesteps"
        )
    centres = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) * num_train_timesteps / num_timesteps
    return centres.floor().long()


def noise_key(seed: int, name: str, *coordinates: int) -> int:
    """A 63-bit generator seed derived from a run seed, a name (image id) and integer coordinates."""
    payload = "\x1f".join([str(seed), name, *map(str, coordinates)]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def draw_noise(keys: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise, one sample per key, each from its own seeded CPU generator.

    The CPU generator makes the numbers identical on every device; move the result where needed.

    Returns:
        Float32 tensor of shape ``(len(keys), *shape)``.
    """
    generator = torch.Generator()
    out = torch.empty(len(keys), *shape)
    for row, key in enumerate(keys):
        generator.manual_seed(key)
        torch.randn(shape, generator=generator, out=out[row])
    return out


@dataclass(frozen=True)
class ScoringGrid:
    """The common random numbers of a run: the timestep grid, the draws, the seed (and the batch
    size, which changes nothing but speed). Every forward pass over the training set uses one.

    Attributes:
        timesteps: ``(K,)`` grid timesteps.
        num_draws: S noise draws per (image, timestep).
        seed: run seed.
        batch_size: rows (image × timestep × draw) per forward pass.
        queries_per_pass: perturbed copies scored together in one pass over the training set.
        dtype: ``fp32``, or ``bf16`` / ``fp16``: the forward passes run under autocast.
    """

    timesteps: torch.Tensor
    num_draws: int
    seed: int
    batch_size: int = 256
    queries_per_pass: int = 1
    dtype: str = "fp32"

    @classmethod
    def of(cls, num_train_timesteps: int, scoring: ScoringConfig) -> ScoringGrid:
        """The grid of a :class:`ScoringConfig` for a model with ``num_train_timesteps``."""
        return cls(
            timestep_grid(num_train_timesteps, scoring.num_timesteps),
            scoring.num_draws,
            scoring.seed,
            scoring.batch_size,
            scoring.queries_per_pass,
            scoring.dtype,
        )
