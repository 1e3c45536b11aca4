"""The public API: ``Attributor(model, train, run_dir).cache()`` and ``.attribute(queries)``.

``cache()`` encodes the training set and computes the baseline loss matrix B once per (model,
data, grid, seed); ``attribute()`` calls it when needed, then, per query, perturbs a copy of the
UNet on the query and scores every training image again with the same noise (Forward-INF).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from tqdm.auto import tqdm

from . import __version__
from .audit import AuditConfig, AuditReport, run_audit
from .baselines import BaselineScorer
from .calibration import calibration_indices, calibration_reference
from .config import METHODS, AttributionConfig, GradientConfig, ScoringConfig
from .data import ImageFolder, file_digest, load_image, save_image
from .errors import DiffattrError
from .losses import LossMatrix, loss_matrix
from .models import DiffusionModel
from .noise import noise_key, timestep_grid
from .perturb import perturbed_copy, select_parameters
from .scoring import aggregate, top_k
from .store import (
    BASELINE_FILE,
    CALIBRATION_FILE,
    ENCODINGS_FILE,
    IDS_FILE,
    RunDirectory,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)


@dataclass
class AttributionResult:
    """The attribution of one query over the training set.

    Attributes:
        query: path of the query image.
        query_id: name of its folder under ``<run-dir>/queries/``.
        ids: training ids, ``(N,)``, the row order of ``scores`` and ``deltas``.
        scores: ``(N,)`` influence scores, higher = more influential.
        deltas: ``(N, K)`` per-timestep loss changes ``A − B`` (Forward-INF only, else ``None``).
        top: the top-k as ``{"rank", "id", "score", "text", "label"}`` dicts.
        timings: seconds spent perturbing and scoring.
        method: ``forward-inf`` or the baseline that produced the scores.
    """

    query: str
    query_id: str
    ids: list[str]
    scores: torch.Tensor
    deltas: torch.Tensor | None
    top: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "forward-inf"

    @property
    def top_ids(self) -> list[str]:
        return [entry["id"] for entry in self.top]

    def table(self) -> str:
        """The top-k as a short text table."""
        lines = [f"\nquery {self.query}  →  {self.query_id} ({self.method})", f"{'rank':>4}  {'score':>11}  id"]
        lines += [f"{e['rank']:>4}  {e['score']:>11.4g}  {e['id']}" for e in self.top]
        return "\n".join(lines)


def query_id_for(path: Path, label: int | None, method: dict | None = None) -> str:
    """``<file stem>[-<method>]-<8 hex>``: readable, and distinct for distinct queries.

    The hash covers the file's content and label, and a baseline's settings (``method``), so
    every method's result of the same query gets its own folder.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:48] or "query"
    key = f"{file_digest(path)}:{label}" + ("" if method is None else ":" + json.dumps(method, sort_keys=True))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{stem}-{digest}" if method is None else f"{stem}-{method['method']}-{digest}"


class Attributor:
    """Forward-INF attribution of generated images to the training images of a diffusers model.

    Args:
        model: a loaded :class:`DiffusionModel` or the path of a local model folder.
        train: an :class:`ImageFolder` or the path of the training image folder.
        run_dir: where baseline, encodings and results are stored (see ``store.py``).
        scoring: timestep grid, noise draws, seed, batch size.
        attribution: perturbation and aggregation of each query.
        gradient: settings of the TracIn / D-TRAK baselines.
        clip: a :class:`~diffattr.clip.ClipEmbedder`, for the CLIP baseline.
        scheduler: scheduler folder, for a bare UNet folder ``model``.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).
        progress: show progress bars.
    """

    def __init__(
        self,
        model: DiffusionModel | str | Path,
        train: ImageFolder | str | Path,
        run_dir: str | Path,
        *,
        scoring: ScoringConfig | None = None,
        attribution: AttributionConfig | None = None,
        gradient: GradientConfig | None = None,
        clip=None,
        scheduler: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
    ):
        if not isinstance(model, DiffusionModel):
            model = DiffusionModel.from_pretrained(model, scheduler=scheduler, device=device)
        self.model = model
        self.data = train if isinstance(train, ImageFolder) else ImageFolder(train)
        self.run = RunDirectory(run_dir)
        self.scoring = scoring or ScoringConfig()
        self.attribution = attribution or AttributionConfig()
        self.gradient = gradient or GradientConfig()
        self.clip = clip
        self.progress = progress
        self.timesteps = timestep_grid(model.num_train_timesteps, self.scoring.num_timesteps)
        self._baseline: torch.Tensor | None = None
        self._config: dict | None = None
        self._encodings: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._scorers: dict[str, BaselineScorer] = {}

    @property
    def ids(self) -> list[str]:
        return self.data.ids

    def run_config(self, *, with_attribution: bool) -> dict:
        """What goes into ``config.json``: checked sections first, then versions for the record."""
        if self._config is None:
            self._config = self._base_config()
        config = dict(self._config)
        if with_attribution:
            config["attribution"] = self.attribution.to_dict()
        return config

    def _base_config(self) -> dict:
        return {
            "model": {
                "source": self.model.source,
                "fingerprint": self.model.fingerprint,
                "prediction_type": self.model.prediction_type,
                "sample_shape": list(self.model.sample_shape),
            },
            "data": {"root": str(self.data.root), "fingerprint": self.data.fingerprint(), "num_images": len(self.data)},
            "scoring": {**self.scoring.fingerprint(), "timesteps": self.timesteps.tolist()},
            "versions": {"diffattr": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        }

    # -- cache: encodings and baseline, once per run directory -----------------------------------

    def encodings(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encodings ``(N, C, H, W)`` and conditions ``(N, ...)`` of the training set, cached."""
        if self._encodings is None:
            self.run.check_or_write_config(self.run_config(with_attribution=False))
            if self.run.exists(ENCODINGS_FILE):
                tensors = read_tensors(self.run.file(ENCODINGS_FILE))
            else:
                tensors = self._encode_training_set()
                write_tensors(self.run.file(ENCODINGS_FILE), tensors)
            self._encodings = (tensors["encodings"], tensors.get("conditions"))
        return self._encodings

    def _encode_training_set(self, batch_size: int = 64) -> dict[str, torch.Tensor]:
        records = self.data.records
        conditions = self.model.conditions([r.label for r in records], [r.id for r in records])
        chunks = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(records), batch_size), disable=not self.progress, desc="encoding"):
                pixels = torch.stack([self._load(r.path) for r in records[start : start + batch_size]])
                chunks.append(self.model.encode(pixels.to(self.model.device)).cpu())
        tensors = {"encodings": torch.cat(chunks)}
        if conditions is not None:
            tensors["conditions"] = conditions
        return tensors

    def _load(self, path: Path) -> torch.Tensor:
        return load_image(path, resolution=self.model.resolution, channels=self.model.channels)

    def cache(self) -> torch.Tensor:
        """Computes (or loads) the baseline loss matrix B.

        Returns:
            ``(N, K)`` baseline losses, rows in the order of ``ids``.

        Raises:
            DiffattrError: the run directory holds results of another model, data set or grid.
        """
        if self._baseline is not None:
            return self._baseline
        self._check_ids()
        if self.run.exists(BASELINE_FILE):
            self._baseline = read_tensors(self.run.file(BASELINE_FILE))["baseline"]
            return self._baseline
        matrix = self.score_training_set(description="baseline")
        write_tensors(self.run.file(BASELINE_FILE), {"baseline": matrix.losses, "timesteps": self.timesteps})
        self._baseline = matrix.losses
        return self._baseline

    def calibration(self) -> torch.Tensor:
        """``(N,)`` reference response of each training image (``calibration.py``), cached.

        Valid for the run directory's attribution settings, which ``attribute`` checks first.
        """
        if self.run.exists(CALIBRATION_FILE):
            return read_tensors(self.run.file(CALIBRATION_FILE))["reference"]
        encodings, conditions = self.encodings()
        reference = calibration_reference(
            self.model,
            encodings,
            conditions,
            self.ids,
            self.attribution,
            baseline=self.cache(),
            timesteps=self.timesteps,
            num_draws=self.scoring.num_draws,
            seed=self.scoring.seed,
            batch_size=self.scoring.batch_size,
            progress=self.progress,
        )
        indices = torch.tensor(calibration_indices(len(self.ids), self.attribution.calibration_images))
        write_tensors(self.run.file(CALIBRATION_FILE), {"reference": reference, "indices": indices})
        return reference

    def _check_ids(self) -> None:
        self.run.check_or_write_config(self.run_config(with_attribution=False))
        if self.run.exists(IDS_FILE) and read_json(self.run.file(IDS_FILE)) != self.ids:
            raise DiffattrError(f"{self.run.file(IDS_FILE)} lists other images; use a new --run-dir")
        write_json(self.run.file(IDS_FILE), self.ids)

    def score_training_set(self, *, description: str, **unets) -> LossMatrix:
        """One forward pass over the training set on the run's grid and noise (see ``loss_matrix``).

        Args:
            description: progress-bar label.
            **unets: ``unet`` (network to score) and ``reference_unet``, as in ``loss_matrix``.
        """
        encodings, conditions = self.encodings()
        return loss_matrix(
            self.model,
            encodings,
            conditions,
            self.ids,
            timesteps=self.timesteps,
            num_draws=self.scoring.num_draws,
            seed=self.scoring.seed,
            batch_size=self.scoring.batch_size,
            progress=self.progress,
            description=description,
            **unets,
        )

    # -- attribute: one perturbation and one scoring pass per query ------------------------------

    def attribute(
        self,
        queries: list[str | Path] | str | Path,
        *,
        labels: list[int | None] | int | None = None,
        top_k: int = 10,
        method: str = "forward-inf",
    ) -> list[AttributionResult]:
        """Ranks the training images by their influence on each query image.

        Args:
            queries: image file(s) generated by the model (or any image to attribute).
            labels: class label of each query (one for all, or one per query) for
                class-conditional models.
            top_k: how many training images ``result.json`` lists.
            method: ``forward-inf`` (diffattr's method), or a baseline: ``pixel``, ``clip``,
                ``tracin``, ``dtrak`` (see ``baselines.py``).

        Returns:
            One :class:`AttributionResult` per query, also written under ``<run-dir>/queries/``.
        """
        queries = [Path(q) for q in ([queries] if isinstance(queries, (str, Path)) else queries)]
        if not isinstance(labels, list):
            labels = [labels] * len(queries)
        if len(labels) != len(queries):
            raise DiffattrError(
                f"--label given {len(labels)} times for {len(queries)} queries: give one, or one per query"
            )
        if self.model.num_classes is None and any(label is not None for label in labels):
            raise DiffattrError("--label given, but this model is unconditional: drop --label")
        if top_k < 1:
            raise DiffattrError(f"--top-k {top_k}: must be at least 1")
        if method not in METHODS:
            raise DiffattrError(f"--method {method!r}: must be one of {METHODS}")
        # Fail on a bad query, label or option before any long pass.
        pixels = [self._load(path) for path in queries]
        self.model.conditions(labels, [str(path) for path in queries])
        if method != "forward-inf":
            return self._attribute_baseline(method, queries, pixels, labels, top_k)
        select_parameters(self.model.unet, self.attribution.params)
        self.run.check_or_write_config(self.run_config(with_attribution=True))
        baseline = self.cache()
        return [
            self._attribute_one(path, image, label, baseline, top_k)
            for path, image, label in zip(queries, pixels, labels)
        ]

    def _attribute_one(
        self, path: Path, pixels: torch.Tensor, label: int | None, baseline: torch.Tensor, k: int
    ) -> AttributionResult:
        query_id = query_id_for(path, label)
        query = self.model.encode(pixels[None].to(self.model.device))[0]
        condition = self.model.conditions([label], [str(path)])
        start = time.perf_counter()
        perturbed, query_losses = perturbed_copy(
            self.model,
            query,
            condition,
            self.attribution,
            seed=noise_key(self.scoring.seed, "perturb:" + query_id),
            progress=self.progress,
        )
        perturb_seconds = time.perf_counter() - start
        matrix = self.score_training_set(
            unet=perturbed,
            reference_unet=self.model.unet if self.attribution.aggregation == "prediction" else None,
            description=f"scoring {path.name}",
        )
        score_seconds = time.perf_counter() - start - perturb_seconds
        scores = aggregate(
            self.attribution.aggregation,
            baseline=baseline,
            after=matrix.losses,
            direction=self.attribution.direction,
            change=matrix.prediction_change,
            reference=self.calibration() if self.attribution.aggregation == "calibrated" else None,
        )
        result = AttributionResult(
            query=str(path),
            query_id=query_id,
            ids=self.ids,
            scores=scores,
            deltas=matrix.losses - baseline,
            top=self._top(scores, k),
            timings={"perturb_seconds": perturb_seconds, "score_seconds": score_seconds},
        )
        tensors = {"after": matrix.losses}
        if matrix.prediction_change is not None:
            tensors["prediction_change"] = matrix.prediction_change
        config = self.run_config(with_attribution=True)
        self._save(
            result,
            pixels,
            label,
            tensors=tensors,
            record={
                "config": {key: config[key] for key in ("scoring", "attribution")},
                "query_loss_per_step": query_losses,
            },
        )
        return result

    def _attribute_baseline(self, method, queries, pixels, labels, k) -> list[AttributionResult]:
        if method not in self._scorers:  # kept: features, projection and kernel serve later calls
            self._scorers[method] = BaselineScorer(self, method, gradient=self.gradient, clip=self.clip)
        scorer = self._scorers[method]
        self._check_ids()
        start = time.perf_counter()
        scorer.train_features()
        setup_seconds = time.perf_counter() - start
        settings = scorer.settings()
        start = time.perf_counter()
        query_ids = [query_id_for(path, label, settings) for path, label in zip(queries, labels)]
        encoded = self.model.encode(torch.stack(pixels).to(self.model.device))
        scores = scorer.scores(
            encoded, self.model.conditions(labels, [str(p) for p in queries]), ["query:" + q for q in query_ids]
        )
        score_seconds = (time.perf_counter() - start) / len(queries)
        config = {"scoring": self.run_config(with_attribution=False)["scoring"], **settings}
        results = []
        for path, image, label, query_id, row in zip(queries, pixels, labels, query_ids, scores):
            result = AttributionResult(
                query=str(path),
                query_id=query_id,
                ids=self.ids,
                scores=row,
                deltas=None,
                top=self._top(row, k),
                timings={"setup_seconds": setup_seconds, "score_seconds": score_seconds},
                method=method,
            )
            self._save(result, image, label, tensors={}, record={"config": config})
            results.append(result)
        return results

    def _top(self, scores: torch.Tensor, k: int) -> list[dict]:
        top_scores, top_indices = top_k(scores, min(k, len(scores)))
        records = self.data.records
        return [
            {"rank": rank, "id": records[i].id, "score": score, "text": records[i].text, "label": records[i].label}
            for rank, (i, score) in enumerate(zip(top_indices.tolist(), top_scores.tolist()), start=1)
        ]

    def _save(self, result: AttributionResult, pixels: torch.Tensor, label, *, tensors: dict, record: dict) -> None:
        folder = self.run.query_dir(result.query_id)
        tensors = {"scores": result.scores, **tensors}
        if result.deltas is not None:
            tensors["deltas"] = result.deltas
        write_tensors(folder / "scores.safetensors", tensors)
        save_image(pixels, folder / "query.png")
        write_json(
            folder / "result.json",
            {
                "query": result.query,
                "query_id": result.query_id,
                "method": result.method,
                "label": label,
                "top": result.top,
                "timings": result.timings,
                **record,
            },
        )

    # -- audit: which training images the model has memorized ----------------------------------------

    def audit(
        self,
        config: AuditConfig | None = None,
        *,
        leakage: str | Path | ImageFolder | None = None,
        mislabeled: bool = False,
    ) -> AuditReport:
        """Ranks the training images by how memorized they look, with the evidence (see ``audit.py``).

        Args:
            config: samples, replica criterion and score settings (default: ``AuditConfig()``).
            leakage: a test image folder: which test images are copies of training images.
            mislabeled: also rank training images by their mislabel score (class-conditional models).

        Returns:
            An :class:`~diffattr.audit.AuditReport`, also written under ``<run-dir>/audit/``.
        """
        return run_audit(self, config or AuditConfig(), leakage=leakage, mislabeled=mislabeled)
