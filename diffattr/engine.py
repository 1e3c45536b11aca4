"""Forward-INF in memory: the baseline pass, the calibration, and the one perturb-then-score loop.

An :class:`Engine` holds one model, one training set (encodings, conditions, ids) and the run's
:class:`~diffattr.noise.ScoringGrid`. Everything that scores training images goes through it:

- :meth:`Engine.baseline`: B, ``(N, K)``, the unperturbed model's losses;
- :meth:`Engine.respond`: perturb a copy of the network on one image, then score every training
  image with the same noise — *the* loop, used by queries, by the calibration and by the
  evaluation protocols alike;
- :meth:`Engine.null_loss`, :meth:`Engine.fisher`: what MUCS's stop and AbU's penalty need, once;
- :meth:`Engine.calibration`: each training image's usual response to other images'
  perturbations (for the ``calibrated`` aggregation);
- :meth:`Engine.score`: one query's scores under an aggregation.

No files here: the Attributor stores what the engine computes (``store.py``), the benchmarks keep
it in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import distributed
from .candidates import retrieval_column
from .config import AttributionConfig
from .denoisers import Denoiser
from .errors import DiffattrError
from .fisher import diagonal_fisher
from .losses import LossMatrix, loss_matrices, loss_matrix
from .noise import ScoringGrid, noise_key
from .perturb import PerturbedCopy, perturbed_copy, select_parameters
from .scoring import AGGREGATIONS, aggregate, top_k


@dataclass
class TrainingSet:
    """Encodings ``(N, C, H, W)`` (a tensor or a sharded one), conditions ``(N, ...)`` or ``None``,
    and the ids that seed each image's noise."""

    encodings: torch.Tensor
    conditions: torch.Tensor | None
    ids: list[str]

    def condition(self, i: int) -> torch.Tensor | None:
        return None if self.conditions is None else self.conditions[i : i + 1]


@dataclass
class Queries:
    """Encodings ``(Q, C, H, W)``, conditions ``(Q, ...)`` or ``None``, and one name per query (it
    seeds the query's perturbation)."""

    encodings: torch.Tensor
    conditions: torch.Tensor | None
    names: list[str]

    def condition(self, q: int) -> torch.Tensor | None:
        return None if self.conditions is None else self.conditions[q : q + 1]


@dataclass
class Response:
    """What one perturbation did to the training set.

    Attributes:
        after: A (and the prediction change, when asked for) on the run's grid and noise.
        query_losses: the query's own loss before each optimizer step (see
            :class:`~diffattr.perturb.PerturbedCopy`).
        steps: optimizer steps taken.
        timings: ``perturb_seconds`` and ``score_seconds``.
        rows: the training rows of ``after`` when only some were scored, else ``None``.
    """

    after: LossMatrix
    query_losses: list[float]
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # the training rows scored (``--candidates``); None: all, in order


class Perturbation(NamedTuple):
    """A perturbed copy (:meth:`Engine.perturb`), the seconds it took, and the name that seeded it."""

    copy: PerturbedCopy
    seconds: float
    name: str


# The most memory the perturbed copies of one shared pass may hold together.
COPIES_BYTES = 8 << 30


# Training images a retain batch (MUCS) draws from: all of them up to this many, else this many spread
# over the set.
RETAIN_POOL = 2048


def spread_indices(num_images: int, count: int) -> list[int]:
    """``min(count, N)`` indices spread evenly over ``[0, N)`` (a count above N uses every image once):
    the calibration's images and the Fisher's."""
    count = min(count, num_images)
    return [(2 * j + 1) * num_images // (2 * count) for j in range(count)]


def _check_finite(values: torch.Tensor, what: str, advice: str) -> None:
    """NaN or inf would rank the training images by their order on disk: refused, naming the stage."""
    bad = (~torch.isfinite(values)).sum().item()
    if bad:
        raise DiffattrError(f"{what} hold {bad} NaN or infinite values of {values.numel()}; {advice}")


class Engine:
    """Forward-INF over one model and training set.

    Args:
        model: the model.
        train: the training set in the model's space.
        grid: the run's timesteps, draws, seed and batch size.
        progress: show progress bars on the passes a user waits for.
    """

    def __init__(self, model: Denoiser, train: TrainingSet, grid: ScoringGrid, *, progress: bool = False):
        self.model = model
        self.train = train
        self.grid = grid
        self.progress = progress
        self.null_loss_value: float | None = None  # L_null, once computed (or set from a cache)
        self._retain: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # AbU's F per (moved parameters, images), once computed (or set from a cache)
        self.fishers: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    @property
    def ids(self) -> list[str]:
        return self.train.ids

    def losses(
        self,
        *,
        network: torch.nn.Module | None = None,
        reference_network: torch.nn.Module | None = None,
        images: range | torch.Tensor | None = None,
        progress: bool | None = None,
        description: str = "scoring",
    ) -> LossMatrix:
        """One forward pass over the training set (or its rows ``images``) on the run's grid and noise."""
        return loss_matrix(
            self.model,
            self.train.encodings,
            self.train.conditions,
            self.ids,
            self.grid,
            images=images,
            network=network,
            reference_network=reference_network,
            progress=self.progress if progress is None else progress,
            description=description,
        )

    def baseline(self) -> torch.Tensor:
        """B: ``(N, K)`` losses of the unperturbed model."""
        baseline = self.losses(description="baseline").losses
        _check_finite(baseline, "the baseline losses", "the model's weights or the training images hold NaN or inf")
        return baseline

    def null_loss(self) -> float:
        """L_null: an untrained network's mean loss over the training set on the run's grid (MUCS's
        stopping reference; one pass, once)."""
        if self.null_loss_value is None:
            untrained = self.model.untrained_network(seed=self.grid.seed)
            self.null_loss_value = self.losses(network=untrained, description="untrained loss").losses.mean().item()
        return self.null_loss_value

    @staticmethod
    def fisher_key(config: AttributionConfig) -> tuple[str, int]:
        """What AbU's F depends on besides the model, training set and seed: the moved parameters
        and the images it is estimated on (the key of :attr:`fishers`)."""
        return config.params, config.fisher_images

    def fisher(self, config: AttributionConfig) -> dict[str, torch.Tensor]:
        """AbU's diagonal Fisher of the training loss for the parameters ``config`` moves, on
        ``config.fisher_images`` training images spread over the rows (one backward pass each, once)."""
        key = self.fisher_key(config)
        if key not in self.fishers:
            self.fishers[key] = diagonal_fisher(
                self.model,
                self.train.encodings,  # row slices: a sharded set reads only the shards it needs
                self.train.conditions,
                self.ids,
                [name for name, _ in select_parameters(self.model, config.params)],
                rows=spread_indices(len(self.ids), config.fisher_images),
                seed=self.grid.seed,
                progress=self.progress,
            )
        return self.fishers[key]

    def _retain_set(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pool a retain batch is drawn from, in memory: the whole training set up to
        :data:`RETAIN_POOL` images, else that many spread over it (random rows of sharded
        encodings would read every shard on every step; a bounded pool keeps memory flat in N)."""
        if self._retain is None:
            rows = torch.tensor(spread_indices(len(self.ids), RETAIN_POOL))
            conditions = self.train.conditions
            self._retain = (self.train.encodings[rows], None if conditions is None else conditions[rows])
        return self._retain

    def respond(
        self,
        encoding: torch.Tensor,
        condition: torch.Tensor | None,
        name: str,
        config: AttributionConfig,
        *,
        progress: bool = False,
        description: str = "scoring",
        with_prediction_change: bool | None = None,
        images: torch.Tensor | None = None,
    ) -> Response:
        """Perturbs a copy of the network on one image, then scores every training image with it.

        Args:
            encoding: ``(C, H, W)`` the image in the model's space.
            condition: ``(1, ...)`` its condition, or ``None``.
            name: seeds the perturbation's (timestep, noise) draws: the same name, the same copy.
            config: the perturbation, and the aggregation (whether the prediction change is needed).
            progress: show the perturbation's and the pass's progress bars.
            with_prediction_change: also measure ``‖ε_θ′ − ε_θ‖²`` (default: when the config's
                aggregation needs it).
            images: ``(M,)`` the training rows to score (``--candidates``; default: all).
        """
        (response,) = self.respond_many(
            [(encoding, condition, name)],
            config,
            progress=progress,
            description=description,
            with_prediction_change=with_prediction_change,
            images=images,
        )
        return response

    def respond_many(
        self,
        items: list[tuple[torch.Tensor, torch.Tensor | None, str]],
        config: AttributionConfig,
        *,
        progress: bool = False,
        description: str = "scoring",
        with_prediction_change: bool | None = None,
        images: torch.Tensor | None = None,
    ) -> list[Response]:
        """:meth:`respond` for several images at once: one perturbed copy each, then *one* pass over
        the training set in which every loaded and noised batch is scored by all the copies. The
        numbers are those of one :meth:`respond` per image; the memory is one network per image.

        Args:
            items: ``(encoding, condition, name)`` per image, as the arguments of :meth:`respond`.
        """
        copies = self.perturb(items, config, progress=progress)
        return self.score_copies(
            copies,
            config,
            progress=progress,
            description=description,
            with_prediction_change=with_prediction_change,
            images=images,
        )

    def perturb(
        self, items: list[tuple[torch.Tensor, torch.Tensor | None, str]], config: AttributionConfig, *, progress=False
    ) -> list[Perturbation]:
        """The perturbed copy of each ``(encoding, condition, name)`` and the seconds it took."""
        copies = []
        for encoding, condition, name in items:
            start = time.perf_counter()
            copy = perturbed_copy(
                self.model,
                encoding,
                condition,
                config,
                seed=noise_key(self.grid.seed, name),
                progress=progress,
                retain=self._retain_set() if config.retain_batch else None,
                null_loss=self.null_loss() if config.null_stop is not None else None,
                fisher=self.fisher(config) if config.ewc_weight else None,
            )
            distributed.broadcast_parameters(copy.network)  # sharded: every process scores rank 0's copy
            copies.append(Perturbation(copy, time.perf_counter() - start, name))
        return copies

    def score_copies(
        self,
        copies: list[Perturbation],
        config: AttributionConfig,
        *,
        progress: bool = False,
        description: str = "scoring",
        with_prediction_change: bool | None = None,
        images: torch.Tensor | None = None,
        columns: list[int] | None = None,
    ) -> list[Response]:
        """One pass over the training set (its rows ``images``, its grid ``columns``) scored by every
        copy of :meth:`perturb`: each loaded and noised batch is shared by all of them."""
        needs_change = with_prediction_change
        if needs_change is None:
            needs_change = AGGREGATIONS[config.aggregation].needs_prediction_change
        start = time.perf_counter()
        matrices = loss_matrices(
            self.model,
            self.train.encodings,
            self.train.conditions,
            self.ids,
            self.grid,
            networks=[p.copy.network for p in copies],
            images=images,
            columns=columns,
            reference_network=self.model.network if needs_change else None,
            progress=progress,
            description=description,
        )
        score_seconds = (time.perf_counter() - start) / len(copies)  # the shared pass, per copy
        for perturbation, after in zip(copies, matrices):
            _check_finite(
                after.losses,
                f"the training losses after the perturbation on {perturbation.name}",
                "lower --lr or --steps",
            )
        return [
            Response(
                after,
                p.copy.query_losses,
                p.copy.steps,
                {"perturb_seconds": p.seconds, "score_seconds": score_seconds, "queries_per_pass": len(copies)},
                images,
            )
            for after, p in zip(matrices, copies)
        ]

    def loss_candidates(
        self,
        perturbation: Perturbation,
        config: AttributionConfig,
        count: int,
        *,
        baseline: torch.Tensor,
        reference: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """The ``count`` training rows (ascending) that score highest at one grid timestep: the
        ``--retriever loss`` stage of the pre-filter, one pass of N rows at 1 of K timesteps."""
        column = [retrieval_column(len(self.grid.timesteps))]
        (response,) = self.score_copies(
            [perturbation], config, progress=progress, description="retrieving", columns=column
        )
        scores = aggregate(
            config.aggregation,
            baseline=baseline[:, column],
            after=response.after.losses,
            direction=config.direction,
            change=response.after.prediction_change,
            reference=reference,  # per image, whatever the columns
        )
        _check_finite(scores, "the retriever's scores", "lower --lr or --steps, or try --retriever l2")
        return top_k(scores, count)[1].sort().values

    def calibration(self, config: AttributionConfig, baseline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's usual response, for the ``calibrated`` aggregation.

        R training images, spread evenly over the sorted ids, each play the query once, perturbed
        exactly as a real query. An image's *reference* is the median over the R perturbations of
        its absolute mean loss change — how much it moves when the model is pushed on something
        else (the median ignores the one perturbation made on the image itself).

        Returns:
            ``(N,)`` reference and the ``(R,)`` indices of the calibration images.
        """
        indices = spread_indices(len(self.ids), config.calibration_images)
        responses = []
        for group in tqdm(self._groups(indices), disable=not self.progress, desc="calibration", unit="pass"):
            items = [(self.train.encodings[i], self.train.condition(i), "calibration:" + self.ids[i]) for i in group]
            for response in self.respond_many(items, config):
                responses.append((response.after.losses - baseline).mean(1).abs())
        return torch.stack(responses).median(0).values, torch.tensor(indices)

    def queries_per_pass(self) -> int:
        """The copies one pass scores: the run's ``queries_per_pass``, fewer when that many copies
        of the network would pass :data:`COPIES_BYTES` (an SD-size UNet: 2 at a time)."""
        network_bytes = sum(p.numel() * p.element_size() for p in self.model.network.parameters())
        return max(1, min(self.grid.queries_per_pass, COPIES_BYTES // max(network_bytes, 1)))

    def _groups(self, items: list) -> list[list]:
        """``items`` in groups of :meth:`queries_per_pass`."""
        size = self.queries_per_pass()
        return [items[start : start + size] for start in range(0, len(items), size)]

    @staticmethod
    def score(
        response: Response,
        baseline: torch.Tensor,
        config: AttributionConfig,
        *,
        aggregation: str | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(N,)`` scores of one response under ``aggregation`` (default: the config's); ``(M,)``
        for a response on some rows (their baseline and reference rows are taken here)."""
        if response.rows is not None:
            baseline = baseline[response.rows]
            reference = None if reference is None else reference[response.rows]
        aggregation = aggregation or config.aggregation
        scores = aggregate(
            aggregation,
            baseline=baseline,
            after=response.after.losses,
            direction=config.direction,
            change=response.after.prediction_change,
            reference=reference,
        )
        _check_finite(scores, f"the {aggregation} scores", "lower --lr or --steps, or try --aggregation loss")
        return scores

    def query_scores(
        self,
        queries: Queries,
        config: AttributionConfig,
        *,
        baseline: torch.Tensor,
        aggregations: Iterable[str] = ("calibrated", "loss", "zscore", "relative", "ratio"),
        reference: torch.Tensor | None = None,
        losses_out: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Scores of many queries under several aggregations, one perturbation and pass per query.

        Args:
            baseline: ``(N, K)`` from :meth:`baseline`.
            aggregations: registered names; the calibration is computed here when one needs it
                and ``reference`` is not given.
            losses_out: if given, each query's A ``(N, K)`` is appended to it, in query order.

        Returns:
            ``{aggregation: (Q, N) scores}``.
        """
        aggregations = list(aggregations)
        if reference is None and any(AGGREGATIONS[name].needs_calibration for name in aggregations):
            reference, _ = self.calibration(config, baseline)
        needs_change = any(AGGREGATIONS[name].needs_prediction_change for name in aggregations)
        out = {name: torch.empty(len(queries.names), len(self.ids)) for name in aggregations}
        groups = self._groups(list(range(len(queries.names))))
        for group in tqdm(groups, disable=not self.progress, desc="forward-inf queries", unit="pass"):
            items = [(queries.encodings[q], queries.condition(q), "perturb:" + queries.names[q]) for q in group]
            for q, response in zip(group, self.respond_many(items, config, with_prediction_change=needs_change)):
                for name in aggregations:
                    out[name][q] = self.score(response, baseline, config, aggregation=name, reference=reference)
                if losses_out is not None:
                    losses_out.append(response.after.losses)
        return out
