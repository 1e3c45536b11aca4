"""Options of a run, as validated dataclasses that round-trip through JSON.

Two groups, because they have different lifetimes:

- :class:`ScoringConfig` shapes the baseline loss matrix (timestep grid, noise draws, seed). It is
  fixed for a run directory: the baseline is computed once and every query reuses it.
- :class:`AttributionConfig` shapes one query's perturbation and the aggregation of its deltas.

Every field carries a help string; the CLI builds its flags from them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import DiffattrError

DIRECTIONS = ("descent", "ascent")
OPTIMIZERS = ("adam", "sgd")
AGGREGATIONS = ("calibrated", "loss", "relative", "zscore", "prediction")
GRADIENT_METHODS = ("tracin", "dtrak")
METHODS = ("forward-inf", "pixel", "clip", *GRADIENT_METHODS)


# Flags that read better than the field names; every other field maps to --field-name.
_FLAG_NAMES = {"num_timesteps": "--timesteps", "num_draws": "--draws", "learning_rate": "--lr"}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (``learning_rate`` → ``--lr``)."""
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise DiffattrError(f"{flag_name(name)} {value!r}: must be {allowed}")


class _JSONConfig:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiffattrError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ScoringConfig(_JSONConfig):
    """How training images are scored: the grid of timesteps, the noise, the batch size."""

    num_timesteps: int = _field(10, "K: timesteps in the scoring grid (centres of K equal bins)")
    num_draws: int = _field(1, "S: noise draws per (image, timestep), averaged")
    seed: int = _field(0, "run seed: the noise of (image, timestep, draw) is a pure function of it")
    batch_size: int = _field(256, "rows (image × timestep × draw) per forward pass; no effect on results")

    def __post_init__(self):
        _check(1 <= self.num_timesteps <= 1000, "num_timesteps", self.num_timesteps, "between 1 and 1000")
        _check(1 <= self.num_draws <= 1000, "num_draws", self.num_draws, "between 1 and 1000")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "a non-negative integer below 2**63")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")

    def fingerprint(self) -> dict:
        """The fields that change the numbers (the batch size does not)."""
        return {"num_timesteps": self.num_timesteps, "num_draws": self.num_draws, "seed": self.seed}


@dataclass(frozen=True)
class AttributionConfig(_JSONConfig):
    """How a query perturbs the model, and how loss deltas become one score per training image."""

    direction: str = _field("ascent", "descent: train the copy on the query; ascent: unlearn it")
    steps: int = _field(10, "optimizer steps on the query (0 leaves the model unchanged)")
    learning_rate: float = _field(1e-4, "optimizer step size")
    optimizer: str = _field("adam", "adam or sgd")
    params: str = _field(
        "all",
        "which UNet parameters move: all, attention, cross-attention-kv (key/value of cross-attention), "
        "lora (a fresh low-rank adapter on the attention projections), or a regular expression on their names",
    )
    lora_rank: int = _field(4, "rank of the fresh adapter of --params lora")
    draws_per_step: int = _field(64, "(timestep, noise) draws of the query per optimizer step")
    aggregation: str = _field(
        "calibrated",
        "calibrated: mean Δ over its usual size under other images' perturbations (R extra passes once "
        "per run); loss: mean Δ; relative: mean over t of Δ/B; zscore: mean of per-timestep z-scored Δ; "
        "prediction: mean change of the model's prediction (two forward passes per row)",
    )
    calibration_images: int = _field(
        16, "R: training images whose perturbations calibrate the `calibrated` aggregation (once per run)"
    )

    def __post_init__(self):
        _check(self.direction in DIRECTIONS, "direction", self.direction, f"one of {DIRECTIONS}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(self.aggregation in AGGREGATIONS, "aggregation", self.aggregation, f"one of {AGGREGATIONS}")
        _check(0 <= self.steps <= 10_000, "steps", self.steps, "between 0 and 10000")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        _check(self.draws_per_step >= 1, "draws_per_step", self.draws_per_step, "at least 1")
        _check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "at least 1")
        _check(self.calibration_images >= 2, "calibration_images", self.calibration_images, "at least 2")
        _check(bool(self.params), "params", self.params, "all, attention, cross-attention-kv, lora or a regex")
        try:
            re.compile(self.params)
        except re.error as error:
            raise DiffattrError(f"--params {self.params!r}: not a valid regular expression ({error})") from None


@dataclass(frozen=True)
class GradientConfig(_JSONConfig):
    """Settings of the gradient baselines (--method tracin / dtrak)."""

    projection_dim: int = _field(1024, "d: random-projection dimension of the per-example gradients")
    damping: float = _field(
        1e-2, "D-TRAK's λ as a multiple of the mean eigenvalue of ΦᵀΦ (inf: plain projected dot product)"
    )
    gradient_params: str = _field("all", "UNet parameters whose gradients are used: all, attention, or a regex")

    def __post_init__(self):
        _check(self.projection_dim >= 1, "projection_dim", self.projection_dim, "at least 1")
        _check(self.damping > 0, "damping", self.damping, "positive (inf for no kernel)")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Lists ``field: saved → current`` for every leaf that differs between two config dicts."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} → {new!r}")
    return lines
