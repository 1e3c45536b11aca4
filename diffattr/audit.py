"""The memorization audit: which training images has the model memorized, and the evidence for each.

``Attributor(...).audit()`` (``diffattr audit``) runs these stages over :class:`AuditInputs` (the
model, the training set's encodings and baseline, the run directory, and a callable that
attributes one replica), each saved under ``<run-dir>/audit/`` and reused by a rerun with the same
settings:

1. **loss gap** (from the run's cached baseline B): how far below the training set's typical loss
   an image's denoising loss lies, per timestep (robust z-score of log B) and averaged;
2. **neighbours** (``neighbours.safetensors``): each training image's copies (near-identical
   training images) and its n nearest *distinct* training neighbours, streamed;
3. **replication** (``samples.safetensors``, ``replicas/``, ``replicas.json``): G seeded samples;
   a sample is a replica when Carlini et al.'s criterion holds for its nearest training image x:
   ``ℓ2(sample, x) < α · mean ℓ2 of x to its n nearest distinct neighbours``; every replica is
   attributed with Forward-INF, and each training image counts the replicas whose top-1 is it or
   a copy of it;
4. **report** (``report.json``, ``scores.safetensors``): one combined score, every signal kept.

Optional: ``leakage`` (a test folder: each test image's nearest training image and a copy
verdict by the same criterion with its own n, ``--leakage-neighbours``; ``leakage.json``) and
``mislabeled`` (class-conditional models: loss under the image's own label minus the best other
label, same noise, ``mislabeled.json``).

Why the neighbours leave copies out: with n = 50 and an image duplicated 100 times, all 50 nearest
neighbours are copies at distance 0, the reference distance is 0 and Carlini's criterion can never
hold — the most memorized images would be the ones never flagged.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .config import AuditConfig, config_differences
from .data import TrainingImages, save_image
from .denoisers import Denoiser
from .errors import DiffattrError
from .losses import loss_matrix
from .memorization import (
    carlini_ratio,
    combined_score,
    is_replica,
    loss_gap,
    mislabel_scores,
    nearest_neighbours,
    ranking_order,
    reference_distance,
    timestep_weights,
    within_distance,
)
from .noise import ScoringGrid
from .sampling import generate
from .shards import ShardedTensor
from .store import (
    AUDIT_CONFIG_FILE,
    AUDIT_LEAKAGE_FILE,
    AUDIT_MISLABELED_FILE,
    AUDIT_MISLABELED_LOSSES_FILE,
    AUDIT_NEIGHBOURS_FILE,
    AUDIT_REPLICAS_DIR,
    AUDIT_REPLICAS_FILE,
    AUDIT_REPORT_FILE,
    AUDIT_SAMPLES_FILE,
    AUDIT_SCORES_FILE,
    Expected,
    RunDirectory,
    present,
)

SAMPLE_BATCH = 64  # samples denoised together; each sample depends on its seed only
MAX_LISTED = 10  # copies listed per image in the evidence
NEAREST_LISTED = 3  # nearest distinct neighbours listed per image
SAMPLE_NEIGHBOURS = 5  # nearest training images recorded per sample
TOP_K = 5  # training images kept per replica attribution


@dataclass
class AuditReport:
    """The audit of one model's training set.

    Attributes:
        ids: training ids, ``(N,)``, the row order of ``scores`` and ``signals``.
        scores: ``(N,)`` combined memorization scores, higher = more memorized-looking.
        signals: ``(N,)`` tensors ``loss_gap``, ``replicas`` (replicas attributed top-1 to the image or
            a copy of it) and ``copies`` (near-identical training images).
        ranking: every training image as ``{"id", "score", "loss_gap", "replicas", "copies",
            "evidence"}``, most memorized first (as in ``report.json``).
        samples: one entry per generated sample (seed, nearest training image, distance, replica?).
        leakage: per test image, its nearest training image and verdict (``--leakage``), else ``None``.
        mislabeled: training images by mislabel score (``--mislabeled``), else ``None``.
        folder: the ``audit/`` folder.
    """

    ids: list[str]
    scores: torch.Tensor
    signals: dict[str, torch.Tensor]
    ranking: list[dict]
    samples: list[dict]
    leakage: list[dict] | None
    mislabeled: list[dict] | None
    folder: Path

    @property
    def replicas(self) -> list[dict]:
        return [sample for sample in self.samples if sample["replica"]]

    def table(self, k: int = 10) -> str:
        """The top-k of the ranking, then the replica, leakage and mislabel summaries, as text."""
        lines = [f"\n{'rank':>4}  {'score':>8}  {'loss gap':>8}  {'replicas':>8}  {'copies':>6}  id"]
        for rank, entry in enumerate(self.ranking[:k], start=1):
            lines.append(
                f"{rank:>4}  {entry['score']:>8.3g}  {entry['loss_gap']:>8.3g}  {entry['replicas']:>8}  "
                f"{entry['copies']:>6}  {entry['id']}"
            )
        if self.samples:
            lines.append(f"\n{len(self.replicas)} of {len(self.samples)} samples are replicas of training images")
            for sample in self.replicas[:k]:
                lines.append(
                    f"  {sample['file']}: nearest {sample['nearest'][0]['id']} (ratio {sample['ratio']:.3f}), "
                    f"attributed to {sample['top1']}"
                )
        if self.leakage is not None:
            copies = [entry for entry in self.leakage if entry["copy"]]
            lines.append(f"\n{len(copies)} of {len(self.leakage)} test images are copies of training images")
            lines += [f"  {e['id']} ≈ {e['top1']} (ratio {e['ratio']:.3f})" for e in copies[:k]]
        if self.mislabeled is not None:
            lines.append("\nmost likely mislabeled (own-label loss − best other label's loss):")
            lines += [
                f"  {e['score']:>8.3g}  {e['id']}  label {e['label']} → {e['best_other_label']}"
                for e in self.mislabeled[:k]
            ]
        lines.append(f"\naudit in {self.folder}")
        return "\n".join(lines)


@dataclass
class AuditInputs:
    """Everything the audit reads, and the one thing it calls back: attributing a replica.

    Attributes:
        model: the model (samples, encodings of test images, the mislabel passes).
        grid: the run's timesteps, draws and seed.
        ids: training ids, the row order of every tensor.
        captions: each training image's caption (text-to-image models are prompted with them).
        encodings: ``(N, C, H, W)`` training encodings; ``conditions`` ``(N, ...)`` or ``None``: tensors
            or the run directory's sharded ones, read a chunk of rows at a time (memory flat in N).
        baseline: ``(N, K)`` baseline losses B.
        store: the run directory (the audit writes its ``audit/`` folder).
        load_image: an image file as the model sees it, ``(C, H, W)`` in ``[-1, 1]``.
        attribute: ``(image file, label, prompt, top_k) → result`` with ``.top`` and ``.query_id``.
        progress: show progress bars.
    """

    model: Denoiser
    grid: ScoringGrid
    ids: list[str]
    captions: list[str | None]
    encodings: torch.Tensor | ShardedTensor
    conditions: torch.Tensor | ShardedTensor | None
    baseline: torch.Tensor
    store: RunDirectory
    load_image: Callable[[Path], torch.Tensor]
    attribute: Callable
    progress: bool = False


def _is_attributed(entry, ids: set[str]) -> bool:
    """A replicas.json entry as :meth:`_Audit.attribute` writes it, naming training ``ids``."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("seed"), int)
        and isinstance(entry.get("top"), list)
        and bool(entry["top"])
        and all(
            isinstance(e, dict) and e.get("id") in ids and isinstance(e.get("score"), (int, float))
            for e in entry["top"]
        )
        and entry.get("top1") == entry["top"][0]["id"]
        and isinstance(entry.get("query_id"), str)
        and re.fullmatch(r"[A-Za-z0-9_.-]+", entry["query_id"]) is not None
    )


def _number(value: torch.Tensor) -> float | None:
    """A scalar for the report: ``None`` (JSON null) where it is infinite (e.g. a ratio to a zero reference)."""
    number = value.item()
    return number if math.isfinite(number) else None


class _Audit:
    """One audit run over :class:`AuditInputs`."""

    def __init__(self, inputs: AuditInputs, config: AuditConfig):
        self.inputs = inputs
        self.model = inputs.model
        self.config = config
        self.folder = inputs.store.audit_dir
        self.progress = inputs.progress
        self.ids = inputs.ids

    def file(self, name: str) -> Path:
        return self.inputs.store.audit_file(name)

    @property
    def store(self) -> RunDirectory:
        return self.inputs.store

    def check_or_write_settings(self) -> None:
        """Saves the audit settings (with the run's stamp), or refuses to mix a saved audit with
        other settings, or with files of an audit whose settings are gone."""
        settings = {"audit": self.config.to_dict()}
        if self.config.samples:  # replicas are attributed: under the run's attribution settings
            settings["attribution"] = (self.store.load_config() or {}).get("attribution")
        path = self.file(AUDIT_CONFIG_FILE)
        if not present(path):
            if self.folder.is_dir() and any(self.folder.iterdir()):
                raise DiffattrError(
                    f"{self.folder} holds an audit's files but not its {AUDIT_CONFIG_FILE}: delete {self.folder} to "
                    "redo the audit (the baseline is kept)"
                )
            self.store.save_json(path, settings)
            return
        differences = config_differences(self.store.load_json(path), settings)
        if differences:
            raise DiffattrError(
                f"{self.folder} holds an audit made with other settings ({'; '.join(differences)}): "
                f"rerun with the saved settings, delete {self.folder} to redo the audit (the baseline is kept), "
                "or use a new --run-dir"
            )

    # -- stage 2: neighbours ------------------------------------------------------------------------

    def copy_distance(self, encodings) -> float:
        """The ℓ2 distance that ``copy_tolerance`` (an RMS per value) amounts to."""
        return self.config.copy_tolerance * encodings[0].numel() ** 0.5

    def neighbours(self, encodings) -> dict[str, torch.Tensor]:
        path = self.file(AUDIT_NEIGHBOURS_FILE)
        num_images = len(self.ids)
        if present(path):
            return self.store.load_tensors(
                path,
                {
                    "distances": Expected((num_images, None), finite=False),  # inf: fewer neighbours than asked
                    "indices": Expected((num_images, None), floating=False),
                    "num_copies": Expected((num_images,), floating=False),
                    "copies": Expected((num_images, None), floating=False),
                    "reference": Expected((num_images,), finite=False),
                },
            )
        found = nearest_neighbours(
            encodings,
            encodings,
            k=min(self.config.neighbours, len(encodings) - 1),
            copy_distance=self.copy_distance(encodings),
            max_copies=MAX_LISTED,
            skip_self=True,
            progress=self.progress,
            description="neighbours",
        )
        tensors = {
            "distances": found.distances,
            "indices": found.indices,
            "num_copies": found.num_copies,
            "copies": found.copies,
            "reference": reference_distance(found.distances),
        }
        self.store.save_tensors(path, tensors)
        return tensors

    # -- stage 3: samples and replicas --------------------------------------------------------------

    def sample_labels(self, seeds: list[int]) -> list[int | None]:
        """Class-conditional models sample label ``seed mod num_classes``: every class, reproducibly."""
        classes = self.model.num_classes
        return [None if classes is None else seed % classes for seed in seeds]

    def sample_prompts(self, seeds: list[int]) -> list[str | None]:
        """Text-to-image models are prompted with training captions (as extraction attacks are):
        the distinct captions, sorted, caption ``seed mod count`` for each seed."""
        if not self.model.is_text_conditioned:
            return [None] * len(seeds)
        captions = sorted({caption or "" for caption in self.inputs.captions})
        return [captions[seed % len(captions)] for seed in seeds]

    def samples(self) -> tuple[torch.Tensor, list[int], list[int | None], list[str | None]]:
        """The G samples (in the model's space), generated in batches; a finished batch is saved."""
        seeds = [self.config.sample_seed + i for i in range(self.config.samples)]
        labels, prompts = self.sample_labels(seeds), self.sample_prompts(seeds)
        path = self.file(AUDIT_SAMPLES_FILE)
        if present(path):
            expected = {
                "samples": Expected((None, *self.model.sample_shape)),
                "seeds": Expected((None,), False),
                "sampling_steps": Expected((1,), False),
            }
            saved = self.store.load_tensors(path, expected)
            done = saved["samples"]
            # samples of other seeds or step counts would be judged (and reported) as these settings'
            if saved["seeds"].tolist() != seeds[: len(done)] or len(saved["seeds"]) != len(done):
                raise DiffattrError(
                    f"{path} holds the samples of seeds {saved['seeds'].tolist()[:4]}…, not of --sample-seed "
                    f"{self.config.sample_seed} with --samples {self.config.samples}; delete it to recompute"
                )
            if saved["sampling_steps"].item() != self.config.sampling_steps:
                raise DiffattrError(
                    f"{path} holds samples of --sampling-steps {saved['sampling_steps'].item()}, not "
                    f"{self.config.sampling_steps}; delete it to recompute"
                )
        else:
            done = torch.zeros(0, *self.model.sample_shape)
        chunks = [done]
        for start in range(len(done), len(seeds), SAMPLE_BATCH):
            batch = slice(start, min(start + SAMPLE_BATCH, len(seeds)))
            # Sharded: each process samples its block of the batch's seeds, and all get the whole batch.
            mine = distributed.block(batch.stop - batch.start)
            own = slice(start + mine.start, start + mine.stop)
            local = torch.empty(0, *self.model.sample_shape)
            if len(mine):
                local = generate(
                    self.model,
                    seeds=seeds[own],
                    labels=labels[own] if self.model.num_classes is not None else None,
                    prompts=prompts[own] if self.model.is_text_conditioned else None,
                    num_inference_steps=self.config.sampling_steps or None,
                    progress=self.progress,
                )
            samples = distributed.gather_blocks(local, batch.stop - batch.start)
            chunks.append(samples)
            saved = {
                "samples": torch.cat(chunks),
                "seeds": torch.tensor(seeds[: batch.stop]),
                "sampling_steps": torch.tensor([self.config.sampling_steps]),
            }
            self.store.save_tensors(path, saved)
        return torch.cat(chunks), seeds, labels, prompts

    def replicas(self, encodings, neighbours: dict[str, torch.Tensor]) -> list[dict]:
        """Every sample with its nearest training images; replicas saved as images and attributed."""
        if self.config.samples == 0:
            return []
        samples, seeds, labels, prompts = self.samples()
        nearest = nearest_neighbours(samples, encodings, k=min(SAMPLE_NEIGHBOURS, len(encodings)))
        first = nearest.indices[:, 0]
        reference = neighbours["reference"][first]
        flags = is_replica(nearest.distances[:, 0], reference, alpha=self.config.alpha)
        ratios = carlini_ratio(nearest.distances[:, 0], reference)
        path = self.file(AUDIT_REPLICAS_FILE)
        stamp = self.store.stamp_of(with_attribution=True)  # attributions depend on the perturbation too
        saved = self.store.load_json(path, stamp=stamp).get("replicas") if present(path) else []
        known = set(self.ids)
        if not (isinstance(saved, list) and all(_is_attributed(entry, known) for entry in saved)):
            raise DiffattrError(f"{path}: expected a list of attributed samples; delete it to recompute")
        attributed = {entry["seed"]: entry for entry in saved}
        entries = []
        for g, (seed, label, prompt) in enumerate(zip(seeds, labels, prompts)):
            entry = {
                "seed": seed,
                "label": label,
                "prompt": prompt,
                "nearest": [
                    {"id": self.ids[i], "distance": d}
                    for i, d in zip(nearest.indices[g].tolist(), nearest.distances[g].tolist())
                    if i >= 0
                ],
                "reference": _number(reference[g]),
                "ratio": _number(ratios[g]),
                "replica": bool(flags[g]),
            }
            if entry["replica"]:
                entry["file"] = f"{AUDIT_REPLICAS_DIR}/{seed:04d}.png"
                if seed not in attributed or not present(self.file(entry["file"])):
                    # Always from the (stamped) samples: never a file left by another run.
                    save_image(self.model.decode(samples[g : g + 1])[0].cpu(), self.file(entry["file"]))
                if seed not in attributed:
                    attributed[seed] = self.attribute(entry)
                    self.store.save_json(path, {"replicas": list(attributed.values())}, stamp=stamp)
                entry.update({key: attributed[seed][key] for key in ("top1", "top", "query_id")})
            entries.append(entry)
        return entries

    def attribute(self, entry: dict) -> dict:
        result = self.inputs.attribute(self.file(entry["file"]), entry["label"], entry["prompt"], TOP_K)
        top = [{"id": e["id"], "score": e["score"]} for e in result.top]
        return {"seed": entry["seed"], "top1": top[0]["id"], "top": top, "query_id": result.query_id}

    def replica_counts(self, encodings, samples: list[dict]) -> tuple[torch.Tensor, dict[int, list]]:
        """Per training image, the replicas attributed top-1 to it or to a copy of it."""
        counts = torch.zeros(len(self.ids), dtype=torch.long)
        evidence: dict[int, list] = {}
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        distance = self.copy_distance(encodings)
        groups: dict[int, torch.Tensor] = {}
        for sample in samples:
            if not sample["replica"]:
                continue
            top1 = index[sample["top1"]]
            if top1 not in groups:
                copies = within_distance(encodings[top1], encodings, distance)
                groups[top1] = torch.unique(torch.cat([copies, torch.tensor([top1])]))
            counts[groups[top1]] += 1
            summary = {key: sample[key] for key in ("file", "seed", "label", "prompt", "ratio", "top1")}
            summary["distance"] = sample["nearest"][0]["distance"]
            for i in groups[top1].tolist():
                evidence.setdefault(i, []).append(summary)
        return counts, evidence

    # -- stage 4: the report ------------------------------------------------------------------------

    def report(self, baseline: torch.Tensor, neighbours: dict[str, torch.Tensor], samples: list[dict]) -> dict:
        encodings = self.inputs.encodings
        weights = timestep_weights(
            self.inputs.grid.timesteps,
            num_train_timesteps=self.model.num_train_timesteps,
            max_fraction=self.config.gap_timesteps,
        )
        gap, gap_per_timestep = loss_gap(baseline, weights=weights)
        replicas, replica_evidence = self.replica_counts(encodings, samples)
        copies = neighbours["num_copies"]
        scores = combined_score(gap, replicas, replica_weight=self.config.replica_weight)
        self.store.save_tensors(
            self.file(AUDIT_SCORES_FILE),
            {
                "score": scores,
                "loss_gap": gap,
                "loss_gap_per_timestep": gap_per_timestep,
                "replicas": replicas,
                "copies": copies,
                "reference_distance": neighbours["reference"],
            },
        )
        mean_loss = baseline.mean(1)
        indices = neighbours["indices"]
        ranking = []
        for i in ranking_order(scores).tolist():
            row = [j for j in indices[i].tolist() if j >= 0]
            evidence = {
                "loss": mean_loss[i].item(),
                "neighbour_loss": mean_loss[row].median().item() if row else None,
                "loss_per_timestep": baseline[i].tolist(),
                "loss_gap_per_timestep": gap_per_timestep[i].tolist(),
                "nearest": [
                    {"id": self.ids[j], "distance": d}
                    for j, d in zip(row[:NEAREST_LISTED], neighbours["distances"][i].tolist())
                ],
                "reference_distance": _number(neighbours["reference"][i]),
                "copies": [self.ids[j] for j in neighbours["copies"][i].tolist() if j >= 0],
                "replicas": replica_evidence.get(i, []),
            }
            ranking.append(
                {
                    "id": self.ids[i],
                    "score": scores[i].item(),
                    "loss_gap": gap[i].item(),
                    "replicas": int(replicas[i]),
                    "copies": int(copies[i]),
                    "evidence": evidence,
                }
            )
        report = {
            "settings": self.config.to_dict(),
            "timesteps": self.inputs.grid.timesteps.tolist(),
            "loss_gap_weights": weights.tolist(),
            "signals": {
                "score": "loss_gap + replica_weight · log2(1 + replicas)",
                "loss_gap": "mean over the weighted timesteps of the robust z-score of −log(baseline loss) "
                "against the training set (≈ 0 for an ordinary image, spread ≈ 1)",
                "replicas": "generated replicas (Carlini et al.'s criterion) whose Forward-INF top-1 is this "
                "image or a copy of it",
                "copies": "training images within copy_tolerance (RMS) of this one: duplicates in the data",
            },
            "samples": {
                "count": len(samples),
                "replicas": sum(sample["replica"] for sample in samples),
                "criterion": "ℓ2(sample, x) < alpha × reference_distance(x), x: the sample's nearest training "
                "image; reference_distance: mean ℓ2 of x to its n nearest training images that are not copies",
                "entries": samples,
            },
            "ranking": ranking,
        }
        self.store.save_json(self.file(AUDIT_REPORT_FILE), report)
        return report

    # -- optional: leakage and mislabels ------------------------------------------------------------

    def leakage(self, test: TrainingImages, encodings, neighbours: dict[str, torch.Tensor]) -> list[dict]:
        """Each test image's nearest training image, and whether it is a copy (Carlini's criterion)."""
        records = test.records
        entries = []
        for start in tqdm(range(0, len(records), 256), disable=not self.progress, desc="leakage"):
            chunk = records[start : start + 256]
            pixels = torch.stack([self.inputs.load_image(test.source(r), name=test.name(r)) for r in chunk])
            queries = self.model.encode(pixels.to(self.model.device)).cpu()
            found = nearest_neighbours(queries, encodings, k=1)
            distance, top1 = found.distances[:, 0], found.indices[:, 0]
            # The stored neighbours are sorted: the leakage reference is the mean over the first n.
            reference = reference_distance(neighbours["distances"][top1][:, : self.config.leakage_neighbours])
            copies = is_replica(distance, reference, alpha=self.config.alpha)
            ratios = carlini_ratio(distance, reference)
            for r, record in enumerate(chunk):
                entries.append(
                    {
                        "id": record.id,
                        "top1": self.ids[top1[r]],
                        "distance": distance[r].item(),
                        "reference": _number(reference[r]),
                        "ratio": _number(ratios[r]),
                        "copy": bool(copies[r]),
                    }
                )
        entries.sort(key=lambda entry: math.inf if entry["ratio"] is None else entry["ratio"])
        self.store.save_json(
            self.file(AUDIT_LEAKAGE_FILE),
            {
                "test": str(test.root),
                "criterion": f"copy when ℓ2(test image, x) < alpha ({self.config.alpha}) × reference(x), x: its "
                f"nearest training image; reference: mean ℓ2 of x to its n ({self.config.leakage_neighbours}) "
                "nearest distinct training images",
                "copies": sum(entry["copy"] for entry in entries),
                "results": entries,
            },
        )
        return entries

    def mislabeled(self, baseline: torch.Tensor) -> list[dict]:
        """Loss under every label (same noise as the baseline), one label per saved pass."""
        conditions = self.inputs.conditions
        labels = (conditions if isinstance(conditions, torch.Tensor) else conditions.load()).long()  # (N,) labels
        num_classes = self.model.num_classes
        path = self.file(AUDIT_MISLABELED_LOSSES_FILE)
        if present(path):
            expected = {
                "class_losses": Expected((len(self.ids), num_classes, baseline.shape[1]), nan=True),  # NaN: to do
                "done": Expected((num_classes,), floating=False),
            }
            saved = self.store.load_tensors(path, expected)
            losses, done = saved["class_losses"], saved["done"].bool()
        else:
            losses = torch.full((len(self.ids), num_classes, baseline.shape[1]), float("nan"))
            done = torch.zeros(num_classes, dtype=torch.bool)
        losses[torch.arange(len(self.ids)), labels] = baseline  # own label: the baseline, same noise
        for label in range(num_classes):
            if done[label]:
                continue
            others = torch.nonzero(labels != label).flatten()
            if len(others):
                matrix = loss_matrix(
                    self.model,
                    self.inputs.encodings,
                    torch.full((len(self.ids),), label, dtype=torch.long),
                    self.ids,
                    self.inputs.grid,
                    images=others,
                    progress=self.progress,
                    description=f"under label {label}",
                )
                losses[others, label] = matrix.losses
            done[label] = True
            self.store.save_tensors(path, {"class_losses": losses, "done": done})
        mean_losses = losses.mean(2)
        scores, best = mislabel_scores(mean_losses, labels)
        entries = [
            {
                "id": self.ids[i],
                "score": scores[i].item(),
                "label": int(labels[i]),
                "best_other_label": int(best[i]),
                "own_loss": mean_losses[i, labels[i]].item(),
                "best_other_loss": mean_losses[i, best[i]].item(),
            }
            for i in ranking_order(scores).tolist()
        ]
        self.store.save_json(
            self.file(AUDIT_MISLABELED_FILE),
            {
                "score": "mean loss over the grid under the image's own label minus the lowest such loss under "
                "any other label (same noise); positive: another label explains the image better",
                "ranking": entries,
            },
        )
        return entries


def run_audit(
    inputs: AuditInputs,
    config: AuditConfig,
    *,
    leakage: TrainingImages | None = None,
    mislabeled: bool = False,
) -> AuditReport:
    """Runs (or resumes) the audit and writes ``<run-dir>/audit/``; see the module docstring.

    Args:
        inputs: the model, training set, baseline and run directory to audit.
        config: audit settings.
        leakage: a test image folder to check for copies of training images.
        mislabeled: rank training images by their mislabel score (class-conditional models).

    Returns:
        An :class:`AuditReport`.

    Raises:
        DiffattrError: a saved audit has other settings.
    """
    audit = _Audit(inputs, config)
    audit.check_or_write_settings()
    start = time.perf_counter()
    neighbours = audit.neighbours(inputs.encodings)
    samples = audit.replicas(inputs.encodings, neighbours)
    report = audit.report(inputs.baseline, neighbours, samples)
    leaks = audit.leakage(leakage, inputs.encodings, neighbours) if leakage is not None else None
    mislabels = audit.mislabeled(inputs.baseline) if mislabeled else None
    if inputs.progress:
        tqdm.write(f"audit: {time.perf_counter() - start:.1f}s after the baseline")
    signals = inputs.store.load_tensors(audit.file(AUDIT_SCORES_FILE))
    return AuditReport(
        ids=inputs.ids,
        scores=signals["score"],
        signals={name: signals[name] for name in ("loss_gap", "replicas", "copies")},
        ranking=report["ranking"],
        samples=samples,
        leakage=leaks,
        mislabeled=mislabels,
        folder=audit.folder,
    )
