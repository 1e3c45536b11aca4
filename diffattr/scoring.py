"""From loss matrices to one influence score per training image: the aggregation registry.

Shapes: ``baseline`` B and ``after`` A are ``(N, K)`` losses of N training images at K timesteps,
before and after the perturbation; ``delta`` is ``A − B``. Scores are ``(N,)`` and always read
*higher = more influential*: with descent a helpful image's loss drops, with ascent it rises.

Each aggregation is one function registered with :func:`register_aggregation`, which also says
what the engine must compute for it (the calibration reference, the prediction change); the
``--aggregation`` choices and help come from this registry. Adding one is one function here.

Pure tensor functions that use tensor methods only: importing this module (as ``--help`` does)
does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_EPS = 1e-12


@dataclass(frozen=True)
class Aggregation:
    """One registered aggregation.

    Attributes:
        name: its ``--aggregation`` value.
        function: ``(inputs: AggregationInputs) → (N,)`` scores.
        help: one line for ``--help``.
        needs_calibration: needs the per-image calibration reference (R extra passes once per run).
        needs_prediction_change: needs ``‖ε_θ′ − ε_θ‖²`` (a second forward pass per row).
        per_image: an image's score depends on its own rows only (not on which other images are
            scored): what ``--candidates`` needs.
    """

    name: str
    function: Callable[[AggregationInputs], torch.Tensor]
    help: str
    needs_calibration: bool = False
    needs_prediction_change: bool = False
    per_image: bool = True


@dataclass(frozen=True)
class AggregationInputs:
    """What an aggregation may read: B, A, the direction and the optional extras."""

    baseline: torch.Tensor
    after: torch.Tensor
    direction: str
    change: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.after - self.baseline


AGGREGATIONS: dict[str, Aggregation] = {}


def register_aggregation(
    name: str,
    *,
    help: str,
    needs_calibration: bool = False,
    needs_prediction_change: bool = False,
    per_image: bool = True,
):
    """Registers ``function(inputs) → (N,)`` as the aggregation ``name`` (a decorator)."""

    def register(function):
        if name in AGGREGATIONS:
            raise ValueError(f"aggregation {name!r} is registered twice")
        AGGREGATIONS[name] = Aggregation(name, function, help, needs_calibration, needs_prediction_change, per_image)
        return function

    return register


def direction_sign(direction: str) -> float:
    """+1 when a rising loss means influence (ascent), −1 when a falling one does (descent)."""
    return 1.0 if direction == "ascent" else -1.0


def mean_delta(delta: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of the raw loss change. ``(N, K) → (N,)``."""
    return direction_sign(direction) * delta.mean(1)


def relative_delta(delta: torch.Tensor, baseline: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of ``Δ / B``: each timestep counts in proportion to its own scale,
    so the tiny losses of small t are not drowned by the large ones. ``(N, K) → (N,)``."""
    return direction_sign(direction) * (delta / baseline.clamp_min(_EPS)).mean(1)


def zscore_delta(delta: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean over timesteps of Δ z-scored within each timestep (column). ``(N, K) → (N,)``."""
    centred = delta - delta.mean(0, keepdim=True)
    scale = delta.std(0, keepdim=True) if delta.shape[0] > 1 else centred[:1].new_ones(centred[:1].shape)
    return direction_sign(direction) * (centred / scale.clamp_min(_EPS)).mean(1)


def calibrated_delta(delta: torch.Tensor, reference: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Signed mean Δ of each image divided by how much its mean loss typically moves when the model
    is perturbed on *some other* image (``reference``, from the engine's calibration). ``(N, K), (N,) → (N,)``.

    Memorized images (tiny losses) and fragile ones move under any perturbation; dividing by their
    usual response keeps them from topping every query, and lets a small but unusual change count.
    """
    return direction_sign(direction) * delta.mean(1) / reference.clamp_min(_EPS)


def ratio_delta(baseline: torch.Tensor, after: torch.Tensor, *, direction: str, eps: float = 1e-3) -> torch.Tensor:
    """Signed mean over timesteps of ``(A − B) / (A + B + eps)``: the score of MUCS (Sony, 2026),
    bounded in (−1, 1) per timestep, so no single timestep or image dominates. ``(N, K) → (N,)``."""
    return direction_sign(direction) * ((after - baseline) / (after + baseline + eps)).mean(1)


def prediction_change(change: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Mean over timesteps of ``‖ε_θ′ − ε_θ‖² / B`` (unsigned: any change is influence). ``(N, K) → (N,)``."""
    return (change / baseline.clamp_min(_EPS)).mean(1)


@register_aggregation(
    "calibrated",
    help="mean Δ over its usual size under other images' perturbations (R extra passes once per run)",
    needs_calibration=True,
)
def _calibrated(inputs: AggregationInputs) -> torch.Tensor:
    return calibrated_delta(inputs.delta, inputs.reference, direction=inputs.direction)


@register_aggregation("loss", help="mean Δ")
def _loss(inputs: AggregationInputs) -> torch.Tensor:
    return mean_delta(inputs.delta, direction=inputs.direction)


@register_aggregation("relative", help="mean over t of Δ/B")
def _relative(inputs: AggregationInputs) -> torch.Tensor:
    return relative_delta(inputs.delta, inputs.baseline, direction=inputs.direction)


@register_aggregation("ratio", help="mean over t of (A − B)/(A + B + 0.001), the score of MUCS")
def _ratio(inputs: AggregationInputs) -> torch.Tensor:
    return ratio_delta(inputs.baseline, inputs.after, direction=inputs.direction)


@register_aggregation("zscore", help="mean of per-timestep z-scored Δ", per_image=False)
def _zscore(inputs: AggregationInputs) -> torch.Tensor:
    return zscore_delta(inputs.delta, direction=inputs.direction)


@register_aggregation(
    "prediction",
    help="mean change of the model's prediction (two forward passes per row)",
    needs_prediction_change=True,
)
def _prediction(inputs: AggregationInputs) -> torch.Tensor:
    return prediction_change(inputs.change, inputs.baseline)


def aggregate(
    aggregation: str,
    *,
    baseline: torch.Tensor,
    after: torch.Tensor,
    direction: str,
    change: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The registered aggregation ``aggregation`` of one query's matrices. ``(N, K) → (N,)``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; registered: {sorted(AGGREGATIONS)}")
    entry = AGGREGATIONS[aggregation]
    if entry.needs_calibration and reference is None:
        raise ValueError(f"the `{aggregation}` aggregation needs the calibration reference")
    if entry.needs_prediction_change and change is None:
        raise ValueError(f"the `{aggregation}` aggregation needs the prediction change matrix")
    return entry.function(AggregationInputs(baseline, after, direction, change, reference))


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, N)`` largest scores and their indices, ties broken by the lower index (stable).

    A k above N lists every image: ``--top-k`` is how many to *show*, at most all of them.
    """
    order = scores.sort(descending=True, stable=True).indices[:k]
    return scores[order], order
