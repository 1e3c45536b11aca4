"""Options of a run, as validated dataclasses that round-trip through JSON.

Groups, because they have different lifetimes:

- :class:`ScoringConfig` shapes the baseline loss matrix (timestep grid, noise draws, seed). It is
  fixed for a run directory: the baseline is computed once and every query reuses it.
- :class:`AttributionConfig` shapes one query's perturbation and the aggregation of its deltas.
- :class:`GradientConfig` shapes the TracIn / D-TRAK baselines; :class:`AuditConfig` the audit.

Every field carries a help string; the CLI builds its flags from them (``cli.py`` is the only
place that knows flag syntax beyond :func:`flag_name`). ``to_dict`` / ``from_dict`` round-trip
every config through JSON. No torch here: ``diffattr --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import DiffattrError
from .scoring import AGGREGATIONS

DIRECTIONS = ("descent", "ascent")
# Pixels an image may have (width × height) before it is refused undecoded (--max-image-pixels).
MAX_IMAGE_PIXELS = 100_000_000
DTYPES = ("fp32", "bf16", "fp16")  # --dtype of the scoring passes
# --optimizer name -> torch.optim class name (perturb.py builds it; no torch import here)
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


# Flags that read better than the field names; every other field maps to --field-name.
_FLAG_NAMES = {"num_timesteps": "--timesteps", "num_draws": "--draws", "learning_rate": "--lr"}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (``learning_rate`` → ``--lr``)."""
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _field(default, help: str, *, value_type: type | None = None):
    """A config field; ``value_type`` is its type where the default does not tell it (``None``)."""
    if default is None and value_type is None:
        raise TypeError("a field whose default is None needs its value_type (the CLI parses with it)")
    return field(default=default, metadata={"help": help, "type": value_type or type(default)})


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise DiffattrError(f"{flag_name(name)} {value!r}: must be {allowed}")


def _check_types(config) -> None:
    """Each field of the type its flag parses (a config built in Python, or read from JSON): a
    step count of 2.5 would never be reached, a grid of 3.5 timesteps index past the schedule."""
    for spec in dataclasses.fields(config):
        value, kind = getattr(config, spec.name), spec.metadata["type"]
        if value is None and spec.default is None:
            continue
        if kind is float:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        _check(fits, spec.name, value, {int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__))
        if kind is float and isinstance(value, int):  # lr=1 and lr=1.0 are one setting, with one stamp
            object.__setattr__(config, spec.name, float(value))


def _check_finite(config, *names: str) -> None:
    """NaN or an infinity in these float fields would make every score NaN: refused up front."""
    for name in names:
        value = getattr(config, name)
        _check(value is None or math.isfinite(value), name, value, "a finite number")


class _JSONConfig:
    def to_dict(self) -> dict:
        """The fields as strict JSON values: an infinite float (``--damping inf``) as the string ``"inf"``."""
        return {
            name: str(value) if isinstance(value, float) and math.isinf(value) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict):
        """The config of a ``to_dict`` (e.g. a saved ``config.json`` section), validated again.

        Raises:
            DiffattrError: not a dict, or it names fields this config does not have.
        """
        if not isinstance(values, dict):
            raise DiffattrError(f"{cls.__name__}: expected a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiffattrError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        floats = {f.name for f in dataclasses.fields(cls) if f.metadata["type"] is float}
        return cls(**{k: float(v) if k in floats and v in ("inf", "-inf") else v for k, v in values.items()})


@dataclass(frozen=True)
class ScoringConfig(_JSONConfig):
    """How training images are scored: the grid of timesteps, the noise, the batch size."""

    num_timesteps: int = _field(10, "K: timesteps in the scoring grid (centres of K equal bins)")
    num_draws: int = _field(1, "S: noise draws per (image, timestep), averaged")
    seed: int = _field(0, "run seed: the noise of (image, timestep, draw) is a pure function of it")
    batch_size: int = _field(
        256,
        "rows (image × timestep × draw) per forward pass; the noise is the same, the scores equal to float "
        "rounding (~1e-7: the kernels sum in another order)",
    )
    dtype: str = _field(
        "fp32",
        "precision of the scoring passes' forward: fp32, or bf16 / fp16 under autocast (GPUs; losses still "
        "accumulated in fp32); the baseline and every query share it",
    )
    queries_per_pass: int = _field(
        1,
        "queries (and calibration images) whose perturbed copies share one pass over the training set, each "
        "loaded batch noised once and scored by all of them (memory: one network each; no gain measured on a CPU, "
        "where the forward passes dominate); no effect on results",
    )

    def __post_init__(self):
        _check_types(self)
        _check(1 <= self.num_timesteps <= 1000, "num_timesteps", self.num_timesteps, "between 1 and 1000")
        _check(1 <= self.num_draws <= 1000, "num_draws", self.num_draws, "between 1 and 1000")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "a non-negative integer below 2**63")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _check(self.queries_per_pass >= 1, "queries_per_pass", self.queries_per_pass, "at least 1")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")

    def fingerprint(self) -> dict:
        """The fields that change the numbers (the batch size and queries per pass do not)."""
        fields = ("num_timesteps", "num_draws", "seed", "dtype")
        return {name: getattr(self, name) for name in fields}


@dataclass(frozen=True)
class AttributionConfig(_JSONConfig):
    """How a query perturbs the model, and how loss deltas become one score per training image."""

    direction: str = _field("ascent", "descent: train the copy on the query; ascent: unlearn it")
    steps: int = _field(
        10,
        "optimizer steps on the query (the bound with --target-change); after 0 steps every score ties, which is "
        "refused",
    )
    learning_rate: float = _field(1e-4, "optimizer step size")
    target_change: float | None = _field(
        None,
        "perturb by effect: step until the query's loss on one fixed bank of draws has risen (ascent) or fallen "
        "(descent) by this fraction, e.g. 0.5; unset: exactly --steps steps",
        value_type=float,
    )
    optimizer: str = _field("adam", "adam, adamw (decoupled weight decay 0.01, MUCS's choice) or sgd")
    params: str = _field(
        "all",
        "which UNet parameters move: all, attention, cross-attention-kv (key/value of cross-attention), "
        "mucs (all but attention, biases, embeddings and the outer layers), "
        "lora (a fresh low-rank adapter on the attention projections), or a regular expression on their names",
    )
    lora_rank: int = _field(4, "rank of the fresh adapter of --params lora")
    draws_per_step: int = _field(64, "(timestep, noise) draws of the query per optimizer step")
    retain_batch: int = _field(
        0, "random training images per step that the copy descends on while it moves on the query (MUCS's retain term)"
    )
    query_weight: float = _field(1.0, "λ: weight of the query's loss against the retain term (MUCS: 0.2)")
    null_stop: float | None = _field(
        None,
        "MUCS's stop: clamp each query draw's loss at an untrained model's loss L_null and stop once their mean "
        "reaches this fraction of it (MUCS: 0.95; one extra pass once per run)",
        value_type=float,
    )
    ewc_weight: float = _field(
        0.0,
        "AbU's penalty weight λ: λ/2 Σ F_i (θ_i − θ*_i)² keeps the copy where the training set needs it, F the "
        "diagonal Fisher of the training loss normalised to mean 1 (0: off; F computed once per run)",
    )
    fisher_images: int = _field(
        256, "training images (one random timestep and noise each) estimating F of --ewc-weight"
    )
    aggregation: str = _field("calibrated", "; ".join(f"{a.name}: {a.help}" for a in AGGREGATIONS.values()))
    calibration_images: int = _field(
        16, "R: training images whose perturbations calibrate the `calibrated` aggregation (once per run)"
    )

    @property
    def stops_early(self) -> bool:
        """Whether a stopping rule (``target_change``, ``null_stop``) may end the steps before ``steps``."""
        return self.target_change is not None or self.null_stop is not None

    def __post_init__(self):
        _check_types(self)
        _check_finite(self, "learning_rate", "query_weight", "null_stop", "ewc_weight")
        _check(self.direction in DIRECTIONS, "direction", self.direction, f"one of {DIRECTIONS}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {tuple(OPTIMIZERS)}")
        _check(self.aggregation in AGGREGATIONS, "aggregation", self.aggregation, f"one of {tuple(AGGREGATIONS)}")
        _check(0 <= self.steps <= 10_000, "steps", self.steps, "between 0 and 10000")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        if self.target_change is not None:
            upper = 1 if self.direction == "descent" else float("inf")
            _check(
                0 < self.target_change < upper,
                "target_change",
                self.target_change,
                "in (0, 1) with descent (a loss cannot fall by more than all of it)" if upper == 1 else "positive",
            )
        _check(self.draws_per_step >= 1, "draws_per_step", self.draws_per_step, "at least 1")
        _check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "at least 1")
        _check(self.retain_batch >= 0, "retain_batch", self.retain_batch, "0 (none) or a positive integer")
        _check(self.query_weight > 0, "query_weight", self.query_weight, "positive")
        if self.null_stop is not None:
            _check(self.direction == "ascent", "null_stop", self.null_stop, "used with --direction ascent only")
            _check(0 < self.null_stop <= 1, "null_stop", self.null_stop, "in (0, 1]")
        _check(self.ewc_weight >= 0, "ewc_weight", self.ewc_weight, "0 (off) or positive")
        _check(self.fisher_images >= 1, "fisher_images", self.fisher_images, "at least 1")
        if self.ewc_weight:
            _check(
                self.params != "lora", "params", self.params, "not lora with --ewc-weight (a fresh adapter has no θ*)"
            )
        _check(self.calibration_images >= 2, "calibration_images", self.calibration_images, "at least 2")
        _check(bool(self.params), "params", self.params, "all, attention, cross-attention-kv, mucs, lora or a regex")
        _check_regex("params", self.params)


def _check_regex(name: str, value: str) -> None:
    """A parameter selector that names no preset is a regex: refused here, before anything is written."""
    try:
        re.compile(value)
    except re.error as error:
        flag = "--" + name.replace("_", "-")
        raise DiffattrError(f"{flag} {value!r}: not a valid regular expression ({error})") from None


# ``--retriever`` of ``--candidates`` (``candidates.py``), with what each records in result.json.
RETRIEVERS = {
    "l2": "RMS distance of the encodings",
    "loss": "RMS distance of the encodings, and the perturbed copy's score at one timestep",
}


@dataclass(frozen=True)
class GradientConfig(_JSONConfig):
    """Settings of the gradient baselines (--method tracin / dtrak)."""

    projection_dim: int = _field(1024, "d: random-projection dimension of the per-example gradients")
    damping: float = _field(
        1e-2, "D-TRAK's λ as a multiple of the mean eigenvalue of ΦᵀΦ (inf: plain projected dot product)"
    )
    gradient_params: str = _field("all", "UNet parameters whose gradients are used: all, attention, or a regex")
    projection: str = _field(
        "gaussian",
        "gaussian: dense N(0, 1/d) projection (TRAK's); sparse: a CountSketch, O(p) instead of O(p·d) per gradient "
        "(for large UNets); both generated block by block from the seed",
    )

    def __post_init__(self):
        _check_types(self)
        _check(not math.isnan(self.damping), "damping", self.damping, "a number (inf for no kernel)")
        _check(self.projection_dim >= 1, "projection_dim", self.projection_dim, "at least 1")
        _check(self.damping > 0, "damping", self.damping, "positive (inf for no kernel)")
        _check(self.projection in ("gaussian", "sparse"), "projection", self.projection, "gaussian or sparse")
        _check_regex("gradient_params", self.gradient_params)


@dataclass(frozen=True)
class AuditConfig(_JSONConfig):
    """How the audit looks for memorized training images: samples, replica criterion, combined score."""

    samples: int = _field(0, "G: samples to generate and test for replicas (0: no replication signal)")
    sample_seed: int = _field(0, "seed of the first sample; sample i uses seed sample_seed + i")
    sampling_steps: int = _field(0, "denoising steps per sample (0: all of the scheduler's training timesteps)")
    alpha: float = _field(
        0.5, "Carlini's α: a sample is a replica of its nearest training image x when closer than α × x's reference"
    )
    neighbours: int = _field(50, "n: x's reference is its mean ℓ2 to its n nearest distinct training images")
    leakage_neighbours: int = _field(
        5,
        "n of the --leakage verdict (capped at --neighbours): n = 50 called 20 of 100 genuine 16x16 test digits "
        "copies, n = 5 none (benchmarks/RESULTS.md)",
    )
    copy_tolerance: float = _field(
        0.02, "RMS pixel difference (pixels in [-1, 1]) up to which two training images are copies of each other"
    )
    gap_timesteps: float = _field(
        0.5,
        "the loss gap averages grid timesteps below this fraction of T (1: all; 0.5 kept AUC ≥ 0.97 for images "
        "duplicated ≥ 8x on every zoo model, all t fell to 0.95 on faces: benchmarks/RESULTS.md)",
    )
    replica_weight: float = _field(2.0, "score added to an image per doubling of the replicas attributed to it")

    def __post_init__(self):
        _check_types(self)
        _check_finite(self, "alpha", "copy_tolerance", "gap_timesteps", "replica_weight")
        _check(0 <= self.samples <= 1_000_000, "samples", self.samples, "between 0 and 1000000")
        _check(0 <= self.sample_seed < 2**63, "sample_seed", self.sample_seed, "a non-negative integer")
        _check(self.sampling_steps >= 0, "sampling_steps", self.sampling_steps, "0 (all) or a positive integer")
        _check(self.alpha > 0, "alpha", self.alpha, "positive")
        _check(self.neighbours >= 1, "neighbours", self.neighbours, "at least 1")
        _check(self.leakage_neighbours >= 1, "leakage_neighbours", self.leakage_neighbours, "at least 1")
        _check(self.copy_tolerance >= 0, "copy_tolerance", self.copy_tolerance, "non-negative")
        _check(0 < self.gap_timesteps <= 1, "gap_timesteps", self.gap_timesteps, "in (0, 1]")
        _check(self.replica_weight >= 0, "replica_weight", self.replica_weight, "non-negative")


def with_defaults(config_class, saved: dict) -> dict:
    """A saved config section with the fields it predates filled in at their defaults: a run made
    before a field existed was made with its default, and stays valid."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    return {**defaults, **saved}


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
