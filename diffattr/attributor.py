"""The public API: ``Attributor(model, train, run_dir)`` with ``.cache()``, ``.attribute(queries)``
and ``.audit()``.

A thin layer: it loads the model and the data, asks the :class:`~diffattr.engine.Engine` for the
numbers and the :class:`~diffattr.store.RunDirectory` to keep them. ``cache()`` encodes the training
set and computes everything a query needs — the baseline loss matrix B and, for the ``calibrated``
aggregation, the calibration — once per run directory; ``attribute()`` calls it when needed, then,
per query, perturbs a copy of the network on the query and scores every training image again with
the same noise (Forward-INF). The baselines (``--method``) go through ``baselines.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from tqdm.auto import tqdm

from . import __version__, distributed
from .audit import AuditInputs, AuditReport, run_audit
from .baselines import SCORERS, Scorer, ScorerContext, method_names
from .candidates import DUPLICATE_RADIUS, Prefilter, candidate_rows, retrieval_column
from .config import MAX_IMAGE_PIXELS, RETRIEVERS, AttributionConfig, AuditConfig, GradientConfig, ScoringConfig
from .data import (
    Columns,
    ImageRecord,
    TrainingImages,
    file_digest,
    image_file_bytes,
    load_image,
    open_training_images,
    read_text,
)
from .denoisers import Denoiser
from .engine import Engine, Response, TrainingSet
from .errors import DiffattrError
from .losses import LossMatrix
from .noise import ScoringGrid
from .perturb import select_parameters
from .scoring import AGGREGATIONS, top_k
from .shards import ComputedRows, ShardedTensor, shards_complete, write_shards
from .store import RunDirectory, ids_digest

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
    """One query image as loaded, with its label or prompt and the model's condition tensor of it."""

    path: Path
    pixels: torch.Tensor
    label: int | None
    prompt: str | None
    conditions: torch.Tensor | None  # (1, ...): computed once, used by the perturbation or a baseline

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
    prompt = read_text(sidecar).strip()
    if not prompt:
        raise DiffattrError(
            f"{sidecar} is empty: write the query's prompt into it, or pass --prompt (--prompt '' for none)"
        )
    return prompt


def query_id_for(path: Path, condition: int | str | None, method: dict | None = None) -> str:
    """``<file stem>[-<method>]-<8 hex>``: readable, and distinct for distinct queries.

    The hash covers the file's content and condition (label or prompt), and a baseline's settings
    (``method``), so every method's result of the same query gets its own folder.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:48] or "query"
    key = query_key(path, condition) + ("" if method is None else ":" + json.dumps(method, sort_keys=True))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{stem}-{digest}" if method is None else f"{stem}-{method['method']}-{digest}"


def query_key(path: Path, condition: int | str | None) -> str:
    """What a query is: its file's content and its condition, not its name. The query's noise
    (perturbation draws, a baseline's gradient draws) is keyed by it, so the same image under
    another file name gets the same scores."""
    condition = condition if isinstance(condition, (int, type(None))) else "prompt:" + condition
    return f"{file_digest(path)}:{condition}"


def _on_all_rows(rows: torch.Tensor, num_images: int, scores, after: LossMatrix, deltas):
    """A pre-filtered query's tensors on all N rows: −inf scores and NaN losses off the candidates."""

    def spread(values: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        if values is None:
            return None
        out = torch.full((num_images, *values.shape[1:]), fill, dtype=values.dtype)
        out[rows] = values
        return out

    nan = float("nan")
    after = LossMatrix(spread(after.losses, nan), spread(after.prediction_change, nan))
    return spread(scores, float("-inf")), after, spread(deltas, nan)


def _config(value, kind: type):
    """An options group: the config object, a dict of its fields (validated alike), or the defaults."""
    if value is None:
        return kind()
    if isinstance(value, dict):
        return kind.from_dict(value)
    if not isinstance(value, kind):
        raise DiffattrError(f"expected a {kind.__name__} (or a dict of its fields), got {type(value).__name__}")
    return value


def _query_list(queries) -> list:
    """``attribute``'s queries as a list: one path, image or (C, H, W) tensor, a (B, C, H, W) batch, or a list."""
    if isinstance(queries, torch.Tensor):
        return list(queries) if queries.ndim == 4 else [queries]
    if isinstance(queries, (str, os.PathLike)) or not isinstance(queries, (list, tuple)):
        return [queries]
    return list(queries)


def _require_captions(data: TrainingImages) -> None:
    """A text-to-image model trained on captions: an image without one would be scored under the
    empty prompt, a silent change of what is measured (a wrong caption column, a metadata row lost)."""
    missing = [record.id for record in data.records if record.text is None]
    if not missing:
        return
    columns = f"its columns: {', '.join(data.columns_found)}" if data.columns_found else "it has no metadata file"
    how = "pass --caption-column with the caption column, " if data.columns_found else "add captions, "
    raise DiffattrError(
        f"{len(missing)} of {len(data)} training images have no caption in column {data.columns.caption_name!r} "
        f"(first: {missing[0]}; {columns}): {how}or --allow-empty-captions to score them under the empty prompt"
    )


class Attributor:
    """Forward-INF attribution of generated images to the training images of a diffusers model.

    Args:
        model: the path of a local model folder, a loaded diffusers pipeline, or a
            :class:`~diffattr.denoisers.Denoiser` (``DiffusionModel``).
        train: the training images: an image folder's path, a ``datasets.Dataset``, the path of
            a ``save_to_disk`` folder or a parquet file, or a :class:`~diffattr.data.TrainingImages`.
        run_dir: where baseline, encodings and results are stored (see ``store.py``).
        scoring: timestep grid, noise draws, seed, batch size.
        attribution: perturbation and aggregation of each query.
        gradient: settings of the TracIn / D-TRAK baselines.
        clip: a :class:`~diffattr.clip.ClipEmbedder`, for the CLIP baseline.
        scheduler: scheduler folder, for a bare UNet folder ``model``.
        lora: a LoRA adapter folder fused into a text-to-image ``model`` given as a path.
        variant: the weight files' variant of a ``model`` given as a path (e.g. ``fp16``).
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).
        progress: show progress bars.
        max_image_pixels: the largest width × height of an image read (training or query).
        columns: the image, caption and label columns of the training metadata or table.
        allow_empty_captions: let a text-to-image model score training images that have no
            caption (under the empty prompt); otherwise that is an error.
    """

    def __init__(
        self,
        model: Denoiser | str | Path,
        train: TrainingImages | str | Path,
        run_dir: str | Path,
        *,
        scoring: ScoringConfig | None = None,
        attribution: AttributionConfig | None = None,
        gradient: GradientConfig | None = None,
        clip=None,
        scheduler: str | Path | None = None,
        lora: str | Path | None = None,
        variant: str | None = None,
        device: str | None = None,
        progress: bool = True,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        columns: Columns | None = None,
        allow_empty_captions: bool = False,
    ):
        distributed.setup()  # launched by torchrun / accelerate: join the other processes first
        model_dir = None  # the model's folder, when it was given as one
        if isinstance(model, (str, os.PathLike)):
            model_dir = Path(model).expanduser().resolve()
            model = Denoiser.from_pretrained(model, scheduler=scheduler, lora=lora, variant=variant, device=device)
        elif not isinstance(model, Denoiser):  # a loaded diffusers pipeline
            from .models import load_pipeline

            model = load_pipeline(model, device=device)
        self.model = model
        self.data = open_training_images(train, columns)
        if model.is_text_conditioned and not allow_empty_captions:
            _require_captions(self.data)
        if not isinstance(run_dir, (str, os.PathLike)):
            raise DiffattrError(f"run_dir must be a folder path, got {type(run_dir).__name__}")
        self.run = RunDirectory(run_dir)
        root = self.data.root
        if root is not None and root.is_dir() and self.run.path.resolve().is_relative_to(root):
            # its query images would join the training set, and every later run would be refused
            raise DiffattrError(f"--run-dir {run_dir} is inside the training folder {root}: put it elsewhere")
        if model_dir is not None and self.run.path.resolve().is_relative_to(model_dir):
            # its files would join the model's, whose fingerprint would then change under the run
            raise DiffattrError(f"--run-dir {run_dir} is inside the model folder {model_dir}: put it elsewhere")
        self.scoring = _config(scoring, ScoringConfig)
        self.attribution = _config(attribution, AttributionConfig)
        self.gradient = _config(gradient, GradientConfig)
        self.clip = clip
        self.progress = progress and distributed.is_main()
        if max_image_pixels < 1:
            raise DiffattrError(f"--max-image-pixels {max_image_pixels}: must be at least 1")
        self.max_image_pixels = max_image_pixels
        self.grid = ScoringGrid.of(model.num_train_timesteps, self.scoring)
        self._fingerprint: str | None = None  # of the training data, hashed once
        # The run-config check passed so far: None (not yet), False (without the attribution section), True (with).
        self._checked_attribution: bool | None = None
        self._engine: Engine | None = None
        self._loaded: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._baseline: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        self._scorers: dict[str, Scorer] = {}
        self._train_features: dict[str, ShardedTensor | ComputedRows] = {}  # per method
        self._results_saved = 0  # query results this object wrote

    @property
    def ids(self) -> list[str]:
        return self.data.ids

    @property
    def timesteps(self) -> torch.Tensor:
        return self.grid.timesteps

    def run_config(self, *, with_attribution: bool) -> dict:
        """What goes into ``config.json``: checked sections first, then versions for the record."""
        config = {
            "model": {
                "source": self.model.source,
                "fingerprint": self.model.fingerprint,
                "prediction_type": self.model.prediction_type,
                "sample_shape": list(self.model.sample_shape),
            },
            "data": {
                "root": None if self.data.root is None else str(self.data.root),
                "fingerprint": self._data_fingerprint(),
                **self.data.settings(),
                "num_images": len(self.data),
                "ids_digest": ids_digest(self.ids),
            },
            "scoring": {**self.scoring.fingerprint(), "timesteps": self.timesteps.tolist()},
            "versions": {"diffattr": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        if with_attribution:
            config["attribution"] = self.attribution.to_dict()
        return config

    def _data_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        return self._fingerprint

    def _open_run(self, *, with_attribution: bool) -> None:
        """The one settings check of this object's run directory (and its ids), done once."""
        if self._checked_attribution is True or self._checked_attribution == with_attribution:
            return
        if with_attribution:
            select_parameters(self.model, self.attribution.params)  # a bad --params fails before any pass
        self.run.check_or_write_config(self.run_config(with_attribution=with_attribution))
        self.run.check_or_write_ids(self.ids)
        self._checked_attribution = with_attribution

    # -- cache: encodings, baseline, calibration — once per run directory -----------------------

    def training_encodings(self) -> tuple[ShardedTensor, ShardedTensor | None]:
        """Encodings ``(N, C, H, W)`` and conditions ``(N, ...)`` of the training set, streamed.

        Computed once per run directory in shards of :data:`ENCODING_SHARD_ROWS` images (VAE
        latents and caption embeddings of latent text-to-image models), then read one shard at
        a time: memory does not grow with the training set.
        """
        train = self.engine().train
        return train.encodings, train.conditions

    def engine(self) -> Engine:
        """The engine over this model, the training set's (streamed) encodings and the run's grid."""
        if self._engine is None:
            with self._settings_forgotten_on_error():
                self._open_run(with_attribution=False)
                folder = self.run.encodings_dir
                if not shards_complete(folder):
                    write_shards(
                        folder, len(self.ids), self._encode_rows, shard_rows=ENCODING_SHARD_ROWS, stamp=self.run.stamp
                    )
            row_shapes = {"encodings": tuple(self.model.sample_shape)}
            tensors = ShardedTensor.open(folder, stamp=self.run.stamp, num_rows=len(self.ids), row_shapes=row_shapes)
            train = TrainingSet(tensors["encodings"], tensors.get("conditions"), self.ids)
            self._engine = Engine(self.model, train, self.grid, progress=self.progress)
        return self._engine

    @contextmanager
    def _settings_forgotten_on_error(self, first_run: bool | None = None) -> Iterator[None]:
        """A first run that fails while reading the training set (an unreadable image) leaves no
        settings behind: the rerun after the fix must not be refused as another data set's.
        ``first_run``: whether the run directory had no settings when the verb began (default: now)."""
        if first_run is None:
            first_run = self.run.load_config() is None
        try:
            yield
        except DiffattrError:
            if first_run:
                self.run.forget_settings()
                self._checked_attribution = None
            raise

    def encodings(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training set's encodings and conditions as whole tensors, loaded once: for small sets
        (the protocols, tests); the verbs read them a shard at a time (:meth:`training_encodings`)."""
        if self._loaded is None:
            encodings, conditions = self.training_encodings()
            self._loaded = (encodings.load(), None if conditions is None else conditions.load())
        return self._loaded

    def _encode_rows(self, start: int, stop: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Encodings (and conditions) of training rows ``[start, stop)``; launched on several
        processes, each encodes its block of them and every process gets the gathered whole."""
        mine = distributed.block(stop - start)
        # A process left without rows encodes one anyway (and drops it): the gather needs its shapes.
        records = self.data.records[start + mine.start : start + max(mine.stop, mine.start + 1)]
        chunks, conditions = [], []
        bar = tqdm(total=len(self.data), initial=start, disable=not self.progress, desc="encoding", unit="image")
        with bar, torch.inference_mode():
            for first in range(0, len(records), batch_size):
                batch = records[first : first + batch_size]
                pixels = torch.stack([self.load_record(self.data, r) for r in batch])
                chunks.append(self.model.encode(pixels.to(self.model.device)).cpu())
                condition = self.model.conditions(
                    [r.id for r in batch], labels=[r.label for r in batch], prompts=[r.text for r in batch]
                )
                if condition is not None:
                    conditions.append(condition.cpu())
                bar.update(len(batch) * (stop - start) // len(records))  # the whole set's progress
        tensors = {"encodings": torch.cat(chunks)}
        if conditions:
            tensors["conditions"] = torch.cat(conditions)
        return {key: distributed.gather_blocks(value[: len(mine)], stop - start) for key, value in tensors.items()}

    def load_record(self, data: TrainingImages, record: ImageRecord) -> torch.Tensor:
        """A training (or held-out) image of ``data`` as the model sees it."""
        return self.load_image(data.source(record), name=data.name(record))

    def load_image(self, path, *, name: str | None = None) -> torch.Tensor:
        """An image (a path or a file-like object) as the model sees it: ``(C, H, W)`` in ``[-1, 1]``
        at its resolution."""
        return load_image(
            path,
            resolution=self.model.resolution,
            channels=self.model.channels,
            max_pixels=self.max_image_pixels,
            name=name,
        )

    def baseline(self) -> torch.Tensor:
        """``(N, K)`` baseline losses B, rows in the order of ``ids``: computed once, then read."""
        if self._baseline is None:
            engine = self.engine()
            self._baseline = self.run.read_baseline(self.timesteps, len(self.ids))
            if self._baseline is None:
                self._baseline = engine.baseline()
                self.run.write_baseline(self._baseline, self.timesteps)
        return self._baseline

    def calibration(self) -> torch.Tensor:
        """``(N,)`` reference response of each training image (``Engine.calibration``) under this
        object's attribution settings: computed once, saved with those settings, and reused only
        under the same ones."""
        if self._reference is None:
            self._perturbation_inputs()  # the calibration's perturbations need them too: load or save them first
            settings = self.attribution.to_dict()
            self._reference = self.run.read_calibration(settings, len(self.ids))
            if self._reference is None:
                self._reference, indices = self.engine().calibration(self.attribution, self.baseline())
                self.run.write_calibration(self._reference, indices, settings)
        return self._reference

    def null_loss(self) -> float:
        """L_null of ``--null-stop`` (``Engine.null_loss``): computed once per run directory."""
        engine = self.engine()
        if engine.null_loss_value is None:
            engine.null_loss_value = self.run.read_null_loss()
            if engine.null_loss_value is None:
                self.run.write_null_loss(engine.null_loss())
        return engine.null_loss_value

    def fisher(self) -> dict[str, torch.Tensor]:
        """AbU's Fisher of ``--ewc-weight`` (``Engine.fisher``): computed once per run directory and
        setting of the moved parameters and images."""
        engine = self.engine()
        key = engine.fisher_key(self.attribution)
        if key not in engine.fishers:
            settings = {"params": key[0], "images": key[1]}
            shapes = {name: p.shape for name, p in select_parameters(self.model, self.attribution.params)}
            saved = self.run.read_fisher(settings, shapes)
            if saved is None:
                self.run.write_fisher(settings, engine.fisher(self.attribution))
            else:
                engine.fishers[key] = saved
        return engine.fishers[key]

    def _perturbation_inputs(self) -> None:
        """Loads (or computes and saves) what this object's perturbations need besides the model."""
        if self.attribution.null_stop is not None:
            self.null_loss()
        if self.attribution.ewc_weight:
            self.fisher()

    def cache(self) -> torch.Tensor:
        """Computes (or loads) everything a query needs: encodings, the baseline loss matrix B and,
        for the ``calibrated`` aggregation, the calibration under this object's attribution
        settings, L_null for ``--null-stop`` and F for ``--ewc-weight``. The first query with those
        settings then costs what every later query costs.

        Returns:
            ``(N, K)`` baseline losses, rows in the order of ``ids``.

        Raises:
            DiffattrError: the run directory holds results of another model, data set or grid.
        """
        baseline = self.baseline()
        self._perturbation_inputs()
        if AGGREGATIONS[self.attribution.aggregation].needs_calibration:
            self.calibration()
        return baseline

    # -- attribute: one perturbation and one scoring pass per query ------------------------------

    def attribute(
        self,
        queries,
        *,
        labels: list[int | str | None] | int | str | None = None,
        prompts: list[str | None] | str | None = None,
        top_k: int = 10,
        method: str = "forward-inf",
        candidates: int | None = None,
        retriever: str = "l2",
    ) -> list[AttributionResult]:
        """Ranks the training images by their influence on each query image.

        Args:
            queries: what to attribute: image file paths, PIL images (e.g. ``pipe(prompt).images``)
                or ``(C, H, W)`` tensors in ``[-1, 1]`` (a ``(B, C, H, W)`` batch is B queries), one or
                a list. Objects are kept in the run directory as 8-bit PNGs (``inputs/``), and
                attributed as those files: a tensor is rounded to 8 bits first.
            labels: class label of each query (one for all, or one per query) for
                class-conditional models: an index, or one of the training set's class names.
            prompts: prompt of each query (one for all, or one per query) for text-to-image
                models; a query without one reads it from ``<query>.txt`` beside the image.
            top_k: how many training images ``result.json`` lists (all N when ``top_k`` ≥ N).
            method: ``forward-inf`` (diffattr's method), or a baseline registered in
                ``baselines.py``: ``pixel``, ``clip``, ``tracin``, ``dtrak``.
            candidates: score only the M training images nearest each query (and their near
                duplicates; ``candidates.py``): a query costs M·K rows instead of N·K. The others
                get score −inf; results go to ``queries/<query-id>-candidates<M>/``.
            retriever: how ``candidates`` are found: ``l2`` (the M nearest encodings) or ``loss``
                (those, and the M that the query's perturbed copy moves most at one grid timestep:
                one more pass of N rows at 1 of the K timesteps; ``-loss`` ends the folder name).

        Returns:
            One :class:`AttributionResult` per query, also written under ``<run-dir>/queries/``.
        """
        for flag, value in (("--top-k", top_k), ("--candidates", candidates)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DiffattrError(f"{flag} {value!r}: must be an integer")
        if top_k < 1:
            raise DiffattrError(f"--top-k {top_k}: must be at least 1")
        if method not in method_names():
            raise DiffattrError(f"--method {method!r}: must be one of {method_names()}")
        if candidates is not None and candidates < 1:
            raise DiffattrError(f"--candidates {candidates}: must be at least 1 (leave it out to score every image)")
        if retriever not in RETRIEVERS:
            raise DiffattrError(f"--retriever {retriever!r}: must be one of {sorted(RETRIEVERS)}")
        if retriever != "l2" and candidates is None:
            raise DiffattrError(f"--retriever {retriever} finds the --candidates: give --candidates M too")
        if candidates is not None and method != "forward-inf":
            raise DiffattrError(f"--candidates pre-filters Forward-INF's pass: drop it with --method {method}")
        if candidates is not None and not AGGREGATIONS[self.attribution.aggregation].per_image:
            raise DiffattrError(
                f"--candidates with --aggregation {self.attribution.aggregation}: it normalises over the scored "
                "images, so candidates would score otherwise than in the full pass; use another aggregation"
            )
        # Fail on a bad query, label, prompt or option before any long pass.
        paths = [self._query_path(query) for query in _query_list(queries)]
        batch = self._queries(paths, labels, prompts)
        if method != "forward-inf":
            return self._attribute_baseline(method, batch, top_k)
        first_attribution = "attribution" not in (self.run.load_config() or {})
        self._open_run(with_attribution=True)
        saved_before = self._results_saved
        try:
            baseline = self.cache()
            prefilter = None if candidates is None else Prefilter(candidates, retriever)
            size = 1 if prefilter is not None else self.engine().queries_per_pass()
            return [
                result
                for start in range(0, len(batch), size)
                for result in self._attribute_group(batch[start : start + size], baseline, top_k, prefilter)
            ]
        except DiffattrError:  # e.g. a perturbation that diverged: the rerun with a smaller --lr must not be refused
            if first_attribution and self._results_saved == saved_before:
                self.run.forget_section("attribution")
                self._checked_attribution = False
            raise

    def _query_path(self, query) -> Path:
        if isinstance(query, (str, os.PathLike)):
            return Path(query)
        return self.run.save_input(*image_file_bytes(query))

    def _queries(self, paths: list[Path], labels, prompts) -> list[_Query]:
        labels = [self.data.class_index(label) for label in _one_per_query(labels, paths, "--label")]
        prompts = _one_per_query(prompts, paths, "--prompt")
        if self.model.num_classes is None and any(label is not None for label in labels):
            raise DiffattrError("--label given, but this model is not class-conditional: drop --label")
        if not self.model.is_text_conditioned and any(prompt is not None for prompt in prompts):
            raise DiffattrError("--prompt given, but this model is not a text-to-image model: drop --prompt")
        if self.model.is_text_conditioned:
            prompts = [_sidecar_prompt(path) if prompt is None else prompt for path, prompt in zip(paths, prompts)]
        conditions = [
            self.model.conditions([str(path)], labels=[label], prompts=[prompt])
            for path, label, prompt in zip(paths, labels, prompts)
        ]
        return [
            _Query(path, self.load_image(path), label, prompt, condition)
            for path, label, prompt, condition in zip(paths, labels, prompts, conditions)
        ]

    def _attribute_group(
        self, queries: list[_Query], baseline: torch.Tensor, k: int, prefilter: Prefilter | None
    ) -> list[AttributionResult]:
        """Queries whose perturbed copies share one pass (one query with a ``prefilter``: its own rows)."""
        query_ids = [query_id_for(q.path, q.condition) for q in queries]
        keys = [query_key(q.path, q.condition) for q in queries]  # seed the perturbations
        # One at a time, as a lone query is encoded (a batched VAE could round differently); rank 0's
        # everywhere, so that every process picks the same candidates.
        encodings = torch.cat([self.model.encode(q.pixels[None].to(self.model.device)) for q in queries])
        distributed.broadcast(encodings)
        engine = self.engine()
        items = [(e, q.conditions, "perturb:" + key) for e, q, key in zip(encodings, queries, keys)]
        copies = engine.perturb(items, self.attribution, progress=self.progress)
        rows, retrieve_seconds = None, 0.0
        if prefilter is not None:
            start = time.perf_counter()
            rows = candidate_rows(encodings[0], engine.train.encodings, prefilter.count)
            if prefilter.retriever == "loss":
                moved = engine.loss_candidates(
                    copies[0],
                    self.attribution,
                    prefilter.count,
                    baseline=baseline,
                    reference=self._reference_if_needed(),
                    progress=self.progress,
                )
                rows = torch.unique(torch.cat([rows, moved]))  # sorted
            retrieve_seconds = time.perf_counter() - start
        more = f" and {len(queries) - 1} more" if len(queries) > 1 else ""
        responses = engine.score_copies(
            copies,
            self.attribution,
            progress=self.progress,
            description=f"scoring {queries[0].path.name}{more}",
            images=rows,
        )
        if rows is not None:
            responses[0].timings["retrieve_seconds"] = retrieve_seconds
        return [
            self._attribute_one(query, query_id, response, baseline, k, prefilter)
            for query, query_id, response in zip(queries, query_ids, responses)
        ]

    def _reference_if_needed(self) -> torch.Tensor | None:
        """The calibration reference when the run's aggregation needs it, else ``None``."""
        return self.calibration() if AGGREGATIONS[self.attribution.aggregation].needs_calibration else None

    def _attribute_one(
        self,
        query: _Query,
        query_id: str,
        response: Response,
        baseline: torch.Tensor,
        k: int,
        prefilter: Prefilter | None,
    ) -> AttributionResult:
        engine, rows = self.engine(), response.rows
        scores = engine.score(response, baseline, self.attribution, reference=self._reference_if_needed())
        if response.steps == 0:
            cause = "the perturbed copy took no optimizer step (--steps 0, or a stopping rule met at the start)"
        else:
            cause = f"{response.steps} optimizer steps changed no loss (raise --lr or --steps)"
        _refuse_tied(scores, query.path, cause)
        after = response.after
        deltas = after.losses - (baseline if rows is None else baseline[rows])
        if rows is not None:  # images left out by the pre-filter: score −inf, no losses
            scores, after, deltas = _on_all_rows(rows, len(self.ids), scores, after, deltas)
            k = min(k, len(rows))
        result = AttributionResult(
            query=str(query.path),
            query_id=query_id if prefilter is None else query_id + prefilter.suffix,
            ids=self.ids,
            scores=scores,
            deltas=deltas,
            top=self._top(scores, k),
            timings=response.timings,
        )
        tensors = {"after": after.losses}
        if after.prediction_change is not None:
            tensors["prediction_change"] = after.prediction_change
        if rows is not None:
            tensors["candidates"] = rows
        config = self.run_config(with_attribution=True)
        record = {
            "config": {key: config[key] for key in ("scoring", "attribution")},
            "query_loss_per_step": response.query_losses,
        }
        if self.attribution.stops_early:
            record["perturb_steps"] = response.steps
        if rows is not None:
            record["candidates"] = {
                "count": prefilter.count,
                "scored": len(rows),
                "retriever": RETRIEVERS[prefilter.retriever],
                "duplicate_radius": DUPLICATE_RADIUS,
            }
            if prefilter.retriever == "loss":
                column = retrieval_column(len(self.timesteps))
                record["candidates"]["retrieval_timestep"] = int(self.timesteps[column])
        self._save(result, query, tensors=tensors, record=record)
        return result

    def scorer(self, method: str) -> Scorer:
        """The baseline ``method`` over this run (kept: features and kernel serve later calls)."""
        if method not in self._scorers:
            context = ScorerContext(
                self.model, self.timesteps, self.scoring.seed, self.gradient, clip=self.clip, progress=self.progress
            )
            self._scorers[method] = SCORERS[method](context)
        return self._scorers[method]

    def train_features(self, scorer: Scorer) -> ShardedTensor | ComputedRows:
        """``(N, ...)`` training features of a baseline, read a shard of rows at a time (memory flat
        in N): computed once and sharded in the run directory (an interrupted featurisation
        resumes after its last shard), or, for a scorer whose features are the images, on the fly."""
        if scorer.name not in self._train_features:
            with self._settings_forgotten_on_error():
                self._train_features[scorer.name] = self._open_train_features(scorer)
        return self._train_features[scorer.name]

    def _open_train_features(self, scorer: Scorer) -> ShardedTensor | ComputedRows:
        self._open_run(with_attribution=False)
        in_pixels = scorer.space == "pixels" and self.model.is_latent
        encodings, conditions = (None, None) if in_pixels else self.training_encodings()
        num_images = len(self.ids)

        def featurise(start: int, stop: int) -> torch.Tensor:
            if in_pixels:
                images = torch.stack([self.load_record(self.data, r) for r in self.data.records[start:stop]])
            else:
                images = encodings[start:stop]
            rows = None if conditions is None else conditions[start:stop]
            part = "" if stop - start == num_images else f" {start}–{stop}"
            return scorer.featurise(images, rows, self.ids[start:stop], description=f"training set{part}")

        if not scorer.cached:
            return ComputedRows(num_images, ENCODING_SHARD_ROWS, featurise)
        folder, stamp = self.run.features_dir(scorer.name, scorer.feature_settings())
        if not shards_complete(folder):
            write_shards(
                folder,
                num_images,
                lambda start, stop: {"features": featurise(start, stop)},
                shard_rows=ENCODING_SHARD_ROWS,
                stamp=stamp,
            )
        return ShardedTensor.open(folder, stamp=stamp, num_rows=num_images)["features"]

    def _attribute_baseline(self, method: str, queries: list[_Query], k: int) -> list[AttributionResult]:
        scorer = self.scorer(method)
        first_run = self.run.load_config() is None
        start = time.perf_counter()
        train = self.train_features(scorer)
        setup_seconds = time.perf_counter() - start
        settings = scorer.settings()
        start = time.perf_counter()
        query_ids = [query_id_for(q.path, q.condition, settings) for q in queries]
        pixels = torch.stack([q.pixels for q in queries])
        images = pixels if scorer.space == "pixels" else self.model.encode(pixels.to(self.model.device))
        conditions = None if queries[0].conditions is None else torch.cat([q.conditions for q in queries])
        # The query's noise depends on the query alone, not on the method's settings (a λ sweep
        # compares one set of query features).
        names = ["query:" + query_key(q.path, q.condition) for q in queries]
        features = scorer.featurise(images, conditions, names, description="queries")
        with self._settings_forgotten_on_error(first_run):  # pixel baselines read the training images here
            scores = scorer.scores(features, train)
        if not torch.isfinite(scores).all():
            advice = "raise --damping (inf gives the plain dot product)" if method == "dtrak" else "check the model"
            raise DiffattrError(f"--method {method} gave non-finite scores: {advice}")
        score_seconds = (time.perf_counter() - start) / len(queries)
        config = {"scoring": self.run_config(with_attribution=False)["scoring"], **settings}
        results = []
        cause = f"--method {method} tells no training image apart from another"
        if method == "dtrak":
            cause += f" (--damping {self.gradient.damping:g} may be too large; inf gives the plain dot product)"
        for query, query_id, row in zip(queries, query_ids, scores):
            _refuse_tied(row, query.path, cause)
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
        top_scores, top_indices = top_k(scores, k)
        records = self.data.records
        return [
            {"rank": rank, "id": records[i].id, "score": score, "text": records[i].text, "label": records[i].label}
            for rank, (i, score) in enumerate(zip(top_indices.tolist(), top_scores.tolist()), start=1)
        ]

    def _save(self, result: AttributionResult, query: _Query, *, tensors: dict, record: dict) -> None:
        tensors = {"scores": result.scores, **tensors}
        if result.deltas is not None:
            tensors["deltas"] = result.deltas
        self._results_saved += 1
        self.run.save_result(
            result.query_id,
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
            tensors,
            query.pixels,
        )

    def gallery(self, out: str | Path | None = None, **options) -> Path:
        """Renders this run directory as HTML (:func:`~diffattr.gallery.write_gallery`), with this
        object's training set — which a ``datasets.Dataset`` object needs, having no folder the run
        directory could name. Returns the path of ``index.html``."""
        from .gallery import write_gallery

        return write_gallery(self.run.path, out, train=self.data, progress=self.progress, **options)

    # -- audit: which training images the model has memorized ----------------------------------------

    def audit(
        self,
        config: AuditConfig | None = None,
        *,
        leakage: str | Path | TrainingImages | None = None,
        mislabeled: bool = False,
    ) -> AuditReport:
        """Ranks the training images by how memorized they look, with the evidence (see ``audit.py``).

        Args:
            config: samples, replica criterion and score settings (default: ``AuditConfig()``).
            leakage: a test image folder: which test images are copies of training images.
            mislabeled: also rank training images by their mislabel score (class-conditional models).

        Returns:
            An :class:`~diffattr.audit.AuditReport`, also written under ``<run-dir>/audit/``.

        Raises:
            DiffattrError: a saved audit has other settings, ``mislabeled`` on an unconditional
                model, or a bad test folder.
        """
        config = _config(config, AuditConfig)
        if mislabeled and self.model.num_classes is None:
            raise DiffattrError(
                "--mislabeled needs a class-conditional model (num_class_embeds), and this one is unconditional: "
                "drop --mislabeled"
            )
        if config.sampling_steps > self.model.num_train_timesteps:
            raise DiffattrError(
                f"--sampling-steps {config.sampling_steps}: must be at most the scheduler's "
                f"{self.model.num_train_timesteps} training timesteps (0: all)"
            )
        test = None
        if leakage is not None:
            try:
                test = open_training_images(leakage)
            except DiffattrError as error:
                raise DiffattrError(f"--leakage: {error}") from None
        if config.samples:
            # Replicas are attributed after sampling: refuse other attribution settings before it.
            self._open_run(with_attribution=True)
        baseline = self.cache() if config.samples else self.baseline()
        encodings, conditions = self.training_encodings()  # streamed: the audit's memory stays flat in N
        inputs = AuditInputs(
            model=self.model,
            grid=self.grid,
            ids=self.ids,
            captions=[record.text for record in self.data.records],
            encodings=encodings,
            conditions=conditions,
            baseline=baseline,
            store=self.run,
            load_image=self.load_image,
            attribute=self._attribute_replica,
            progress=self.progress,
        )
        return run_audit(inputs, config, leakage=test, mislabeled=mislabeled)

    def _attribute_replica(self, path: Path, label: int | None, prompt: str | None, top_k: int) -> AttributionResult:
        (result,) = self.attribute(path, labels=label, prompts=prompt, top_k=top_k)
        return result


def _refuse_tied(scores: torch.Tensor, query: Path, cause: str) -> None:
    """Refuses a ranking in which every scored training image ties: it would list them by id."""
    scored = scores[torch.isfinite(scores)]  # −inf: left out by the pre-filter
    if scored.numel() > 1 and bool((scored == scored[0]).all()):
        raise DiffattrError(f"{query}: every training image scores {scored[0].item():g}, {cause}")
