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
from .shards import ShardedTensor, shards_complete, write_shards
from .store import (
    BASELINE_FILE,
    CALIBRATION_FILE,
    ENCODINGS_DIR,
    IDS_FILE,
    RunDirectory,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

ENCODING_SHARD_ROWS = 1024  # images per encodings shard: the most the scoring pass holds at once


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


@dataclass
class _Query:
    """One query image as loaded, with its condition."""

    path: Path
    pixels: torch.Tensor
    label: int | None
    prompt: str | None

    @property
    def condition(self) -> int | str | None:
        return self.prompt if self.prompt is not None else self.label


def _one_per_query(values, paths: list[Path], flag: str) -> list:
    values = values if isinstance(values, list) else [values] * len(paths)
    if len(values) != len(paths):
        raise DiffattrError(f"{flag} given {len(values)} times for {len(paths)} queries: give one, or one per query")
    return values


def _sidecar_prompt(path: Path) -> str:
    """The prompt of a query image from ``<image>.txt`` beside it (the usual sidecar convention)."""
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        raise DiffattrError(
            f"{path}: this text-to-image model needs the query's prompt: pass --prompt, or write it to {sidecar}"
        )
    return sidecar.read_text(encoding="utf-8").strip()


def query_id_for(path: Path, condition: int | str | None, method: dict | None = None) -> str:
    """``<file stem>[-<method>]-<8 hex>``: readable, and distinct for distinct queries.

    The hash covers the file's content and condition (label or prompt), and a baseline's settings
    (``method``), so every method's result of the same query gets its own folder.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:48] or "query"
    condition = condition if isinstance(condition, (int, type(None))) else "prompt:" + condition
    key = f"{file_digest(path)}:{condition}" + ("" if method is None else ":" + json.dumps(method, sort_keys=True))
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
        lora: a LoRA adapter folder fused into a text-to-image ``model`` given as a path.
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
        lora: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
    ):
        if not isinstance(model, DiffusionModel):
            model = DiffusionModel.from_pretrained(model, scheduler=scheduler, lora=lora, device=device)
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
        self._encodings: tuple[ShardedTensor, ShardedTensor | None] | None = None
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

    def training_encodings(self) -> tuple[ShardedTensor, ShardedTensor | None]:
        """Encodings ``(N, C, H, W)`` and conditions ``(N, ...)`` of the training set, streamed.

        Computed once per run directory in shards of :data:`ENCODING_SHARD_ROWS` images (VAE
        latents and caption embeddings of latent text-to-image models), then read one shard at
        a time: memory does not grow with the training set.
        """
        if self._encodings is None:
            self.run.check_or_write_config(self.run_config(with_attribution=False))
            folder = self.run.file(ENCODINGS_DIR)
            if not shards_complete(folder):
                write_shards(folder, len(self.ids), self._encode_rows, shard_rows=ENCODING_SHARD_ROWS)
            tensors = ShardedTensor.open(folder)
            self._encodings = (tensors["encodings"], tensors.get("conditions"))
        return self._encodings

    def encodings(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training set's encodings and conditions as whole tensors (for audits and baselines)."""
        encodings, conditions = self.training_encodings()
        return encodings.load(), None if conditions is None else conditions.load()

    def _encode_rows(self, start: int, stop: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
        records = self.data.records[start:stop]
        chunks, conditions = [], []
        bar = tqdm(total=len(self.data), initial=start, disable=not self.progress, desc="encoding", unit="image")
        with bar, torch.inference_mode():
            for first in range(0, len(records), batch_size):
                batch = records[first : first + batch_size]
                pixels = torch.stack([self._load(r.path) for r in batch])
                chunks.append(self.model.encode(pixels.to(self.model.device)).cpu())
                condition = self.model.conditions(
                    [r.id for r in batch], labels=[r.label for r in batch], prompts=[r.text for r in batch]
                )
                if condition is not None:
                    conditions.append(condition.cpu())
                bar.update(len(batch))
        tensors = {"encodings": torch.cat(chunks)}
        if conditions:
            tensors["conditions"] = torch.cat(conditions)
        return tensors

    def training_images(self) -> torch.Tensor:
        """``(N, C, H, W)`` training images in ``[-1, 1]``, as the model sees them (pixel baselines)."""
        records = self.data.records
        return torch.stack([self._load(r.path) for r in tqdm(records, disable=not self.progress, desc="images")])

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
        encodings, conditions = self.training_encodings()
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
        encodings, conditions = self.training_encodings()
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
        prompts: list[str | None] | str | None = None,
        top_k: int = 10,
        method: str = "forward-inf",
    ) -> list[AttributionResult]:
        """Ranks the training images by their influence on each query image.

        Args:
            queries: image file(s) generated by the model (or any image to attribute).
            labels: class label of each query (one for all, or one per query) for
                class-conditional models.
            prompts: prompt of each query (one for all, or one per query) for text-to-image
                models; a query without one reads it from ``<query>.txt`` beside the image.
            top_k: how many training images ``result.json`` lists.
            method: ``forward-inf`` (diffattr's method), or a baseline: ``pixel``, ``clip``,
                ``tracin``, ``dtrak`` (see ``baselines.py``).

        Returns:
            One :class:`AttributionResult` per query, also written under ``<run-dir>/queries/``.
        """
        paths = [Path(q) for q in ([queries] if isinstance(queries, (str, Path)) else queries)]
        if top_k < 1:
            raise DiffattrError(f"--top-k {top_k}: must be at least 1")
        if method not in METHODS:
            raise DiffattrError(f"--method {method!r}: must be one of {METHODS}")
        # Fail on a bad query, label, prompt or option before any long pass.
        batch = self._queries(paths, labels, prompts)
        if method != "forward-inf":
            return self._attribute_baseline(method, batch, top_k)
        select_parameters(self.model.unet, self.attribution.params)
        self.run.check_or_write_config(self.run_config(with_attribution=True))
        baseline = self.cache()
        return [self._attribute_one(query, baseline, top_k) for query in batch]

    def _queries(self, paths: list[Path], labels, prompts) -> list[_Query]:
        labels = _one_per_query(labels, paths, "--label")
        prompts = _one_per_query(prompts, paths, "--prompt")
        if self.model.num_classes is None and any(label is not None for label in labels):
            raise DiffattrError("--label given, but this model is not class-conditional: drop --label")
        if not self.model.is_text_conditioned and any(prompt is not None for prompt in prompts):
            raise DiffattrError("--prompt given, but this model is not a text-to-image model: drop --prompt")
        if self.model.is_text_conditioned:
            prompts = [_sidecar_prompt(path) if prompt is None else prompt for path, prompt in zip(paths, prompts)]
        self.model.conditions([str(path) for path in paths], labels=labels, prompts=[p or "" for p in prompts])
        return [_Query(path, self._load(path), label, prompt) for path, label, prompt in zip(paths, labels, prompts)]

    def _attribute_one(self, query: _Query, baseline: torch.Tensor, k: int) -> AttributionResult:
        query_id = query_id_for(query.path, query.condition)
        encoding = self.model.encode(query.pixels[None].to(self.model.device))[0]
        start = time.perf_counter()
        perturbed, query_losses = perturbed_copy(
            self.model,
            encoding,
            self._query_conditions([query]),
            self.attribution,
            seed=noise_key(self.scoring.seed, "perturb:" + query_id),
            progress=self.progress,
        )
        perturb_seconds = time.perf_counter() - start
        matrix = self.score_training_set(
            unet=perturbed,
            reference_unet=self.model.unet if self.attribution.aggregation == "prediction" else None,
            description=f"scoring {query.path.name}",
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
            query=str(query.path),
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
            query,
            tensors=tensors,
            record={
                "config": {key: config[key] for key in ("scoring", "attribution")},
                "query_loss_per_step": query_losses,
            },
        )
        return result

    def _query_conditions(self, queries: list[_Query]) -> torch.Tensor | None:
        return self.model.conditions(
            [str(q.path) for q in queries], labels=[q.label for q in queries], prompts=[q.prompt for q in queries]
        )

    def _attribute_baseline(self, method: str, queries: list[_Query], k: int) -> list[AttributionResult]:
        if method not in self._scorers:  # kept: features, projection and kernel serve later calls
            self._scorers[method] = BaselineScorer(self, method, gradient=self.gradient, clip=self.clip)
        scorer = self._scorers[method]
        self._check_ids()
        start = time.perf_counter()
        scorer.train_features()
        setup_seconds = time.perf_counter() - start
        settings = scorer.settings()
        start = time.perf_counter()
        query_ids = [query_id_for(q.path, q.condition, settings) for q in queries]
        pixels = torch.stack([q.pixels for q in queries])
        scores = scorer.scores(
            pixels if scorer.in_pixel_space else self.model.encode(pixels.to(self.model.device)),
            self._query_conditions(queries),
            ["query:" + q for q in query_ids],
        )
        score_seconds = (time.perf_counter() - start) / len(queries)
        config = {"scoring": self.run_config(with_attribution=False)["scoring"], **settings}
        results = []
        for query, query_id, row in zip(queries, query_ids, scores):
            result = AttributionResult(
                query=str(query.path),
                query_id=query_id,
                ids=self.ids,
                scores=row,
                deltas=None,
                top=self._top(row, k),
                timings={"setup_seconds": setup_seconds, "score_seconds": score_seconds},
                method=method,
            )
            self._save(result, query, tensors={}, record={"config": config})
            results.append(result)
        return results

    def _top(self, scores: torch.Tensor, k: int) -> list[dict]:
        top_scores, top_indices = top_k(scores, min(k, len(scores)))
        records = self.data.records
        return [
            {"rank": rank, "id": records[i].id, "score": score, "text": records[i].text, "label": records[i].label}
            for rank, (i, score) in enumerate(zip(top_indices.tolist(), top_scores.tolist()), start=1)
        ]

    def _save(self, result: AttributionResult, query: _Query, *, tensors: dict, record: dict) -> None:
        folder = self.run.query_dir(result.query_id)
        tensors = {"scores": result.scores, **tensors}
        if result.deltas is not None:
            tensors["deltas"] = result.deltas
        write_tensors(folder / "scores.safetensors", tensors)
        save_image(query.pixels, folder / "query.png")
        write_json(
            folder / "result.json",
            {
                "query": result.query,
                "query_id": result.query_id,
                "method": result.method,
                "label": query.label,
                "prompt": query.prompt,
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
