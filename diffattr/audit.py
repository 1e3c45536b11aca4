"""The memorization audit: which training images has the model memorized, and the evidence for each.

``Attributor(...).audit()`` (``diffattr audit``) runs these stages, each saved under
``<run-dir>/audit/`` and reused by a rerun with the same settings:

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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .config import _check, _field, _JSONConfig, config_differences
from .data import ImageFolder, save_image
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
from .perturb import select_parameters
from .sampling import generate
from .store import (
    AUDIT_CONFIG_FILE,
    AUDIT_DIR,
    AUDIT_LEAKAGE_FILE,
    AUDIT_MISLABELED_FILE,
    AUDIT_MISLABELED_LOSSES_FILE,
    AUDIT_NEIGHBOURS_FILE,
    AUDIT_REPLICAS_DIR,
    AUDIT_REPLICAS_FILE,
    AUDIT_REPORT_FILE,
    AUDIT_SAMPLES_FILE,
    AUDIT_SCORES_FILE,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

if TYPE_CHECKING:
    from .attributor import Attributor

SAMPLE_BATCH = 64  # samples denoised together; each sample depends on its seed only
MAX_LISTED = 10  # copies listed per image in the evidence
NEAREST_LISTED = 3  # nearest distinct neighbours listed per image
SAMPLE_NEIGHBOURS = 5  # nearest training images recorded per sample
TOP_K = 5  # training images kept per replica attribution


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
    gap_timesteps: float = _field(1.0, "the loss gap averages grid timesteps below this fraction of T (1: all)")
    replica_weight: float = _field(2.0, "score added to an image per doubling of the replicas attributed to it")

    def __post_init__(self):
        _check(0 <= self.samples <= 1_000_000, "samples", self.samples, "between 0 and 1000000")
        _check(0 <= self.sample_seed < 2**63, "sample_seed", self.sample_seed, "a non-negative integer")
        _check(self.sampling_steps >= 0, "sampling_steps", self.sampling_steps, "0 (all) or a positive integer")
        _check(self.alpha > 0, "alpha", self.alpha, "positive")
        _check(self.neighbours >= 1, "neighbours", self.neighbours, "at least 1")
        _check(self.leakage_neighbours >= 1, "leakage_neighbours", self.leakage_neighbours, "at least 1")
        _check(self.copy_tolerance >= 0, "copy_tolerance", self.copy_tolerance, "non-negative")
        _check(0 < self.gap_timesteps <= 1, "gap_timesteps", self.gap_timesteps, "in (0, 1]")
        _check(self.replica_weight >= 0, "replica_weight", self.replica_weight, "non-negative")


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


def _flat(encodings: torch.Tensor) -> torch.Tensor:
    return encodings.flatten(1).float()


class _Audit:
    """One audit run over an :class:`Attributor`'s model, training set and run directory."""

    def __init__(self, attributor: Attributor, config: AuditConfig):
        self.attributor = attributor
        self.model = attributor.model
        self.config = config
        self.folder = attributor.run.file(AUDIT_DIR)
        self.progress = attributor.progress
        self.ids = attributor.ids

    def file(self, name: str) -> Path:
        return self.folder / name

    def check_or_write_settings(self) -> None:
        """Saves the audit settings, or refuses to mix a saved audit with other settings."""
        settings = {"audit": self.config.to_dict()}
        path = self.file(AUDIT_CONFIG_FILE)
        if not path.is_file():
            write_json(path, settings)
            return
        differences = config_differences(read_json(path), settings)
        if differences:
            raise DiffattrError(
                f"{self.folder} holds an audit made with other settings ({'; '.join(differences)}): "
                f"rerun with the saved settings, delete {self.folder} to redo the audit (the baseline is kept), "
                "or use a new --run-dir"
            )

    # -- stage 2: neighbours ------------------------------------------------------------------------

    def copy_distance(self, encodings: torch.Tensor) -> float:
        """The ℓ2 distance that ``copy_tolerance`` (an RMS per value) amounts to."""
        return self.config.copy_tolerance * encodings[0].numel() ** 0.5

    def neighbours(self, encodings: torch.Tensor) -> dict[str, torch.Tensor]:
        path = self.file(AUDIT_NEIGHBOURS_FILE)
        if path.is_file():
            return read_tensors(path)
        found = nearest_neighbours(
            _flat(encodings),
            _flat(encodings),
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
        write_tensors(path, tensors)
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
        captions = sorted({record.text or "" for record in self.attributor.data.records})
        return [captions[seed % len(captions)] for seed in seeds]

    def samples(self) -> tuple[torch.Tensor, list[int], list[int | None], list[str | None]]:
        """The G samples (in the model's space), generated in batches; a finished batch is saved."""
        seeds = [self.config.sample_seed + i for i in range(self.config.samples)]
        labels, prompts = self.sample_labels(seeds), self.sample_prompts(seeds)
        path = self.file(AUDIT_SAMPLES_FILE)
        done = read_tensors(path)["samples"] if path.is_file() else torch.zeros(0, *self.model.sample_shape)
        chunks = [done]
        for start in range(len(done), len(seeds), SAMPLE_BATCH):
            batch = slice(start, start + SAMPLE_BATCH)
            chunks.append(
                generate(
                    self.model,
                    seeds=seeds[batch],
                    labels=labels[batch] if self.model.num_classes is not None else None,
                    prompts=prompts[batch] if self.model.is_text_conditioned else None,
                    num_inference_steps=self.config.sampling_steps or None,
                    progress=self.progress,
                )
            )
            write_tensors(path, {"samples": torch.cat(chunks), "seeds": torch.tensor(seeds[: batch.stop])})
        return torch.cat(chunks), seeds, labels, prompts

    def replicas(self, encodings: torch.Tensor, neighbours: dict[str, torch.Tensor]) -> list[dict]:
        """Every sample with its nearest training images; replicas saved as images and attributed."""
        if self.config.samples == 0:
            return []
        samples, seeds, labels, prompts = self.samples()
        nearest = nearest_neighbours(samples, _flat(encodings), k=min(SAMPLE_NEIGHBOURS, len(encodings)))
        first = nearest.indices[:, 0]
        reference = neighbours["reference"][first]
        flags = is_replica(nearest.distances[:, 0], reference, alpha=self.config.alpha)
        ratios = carlini_ratio(nearest.distances[:, 0], reference)
        path = self.file(AUDIT_REPLICAS_FILE)
        attributed = {entry["seed"]: entry for entry in read_json(path)} if path.is_file() else {}
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
                "reference": reference[g].item(),
                "ratio": ratios[g].item(),
                "replica": bool(flags[g]),
            }
            if entry["replica"]:
                entry["file"] = f"{AUDIT_REPLICAS_DIR}/{seed:04d}.png"
                if not self.file(entry["file"]).is_file():
                    save_image(self.model.decode(samples[g : g + 1])[0].cpu(), self.file(entry["file"]))
                if seed not in attributed:
                    attributed[seed] = self.attribute(entry)
                    write_json(path, list(attributed.values()))
                entry.update({key: attributed[seed][key] for key in ("top1", "top", "query_id")})
            entries.append(entry)
        return entries

    def attribute(self, entry: dict) -> dict:
        (result,) = self.attributor.attribute(
            self.file(entry["file"]), labels=entry["label"], prompts=entry["prompt"], top_k=TOP_K
        )
        top = [{"id": e["id"], "score": e["score"]} for e in result.top]
        return {"seed": entry["seed"], "top1": top[0]["id"], "top": top, "query_id": result.query_id}

    def replica_counts(self, encodings: torch.Tensor, samples: list[dict]) -> tuple[torch.Tensor, dict[int, list]]:
        """Per training image, the replicas attributed top-1 to it or to a copy of it."""
        counts = torch.zeros(len(self.ids), dtype=torch.long)
        evidence: dict[int, list] = {}
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        flat, distance = _flat(encodings), self.copy_distance(encodings)
        groups: dict[int, torch.Tensor] = {}
        for sample in samples:
            if not sample["replica"]:
                continue
            top1 = index[sample["top1"]]
            if top1 not in groups:
                copies = within_distance(flat[top1], flat, distance)
                groups[top1] = torch.unique(torch.cat([copies, torch.tensor([top1])]))
            counts[groups[top1]] += 1
            summary = {key: sample[key] for key in ("file", "seed", "label", "prompt", "ratio", "top1")}
            summary["distance"] = sample["nearest"][0]["distance"]
            for i in groups[top1].tolist():
                evidence.setdefault(i, []).append(summary)
        return counts, evidence

    # -- stage 4: the report ------------------------------------------------------------------------

    def report(self, baseline: torch.Tensor, neighbours: dict[str, torch.Tensor], samples: list[dict]) -> dict:
        attributor = self.attributor
        encodings, _ = attributor.encodings()
        weights = timestep_weights(
            attributor.timesteps,
            num_train_timesteps=self.model.num_train_timesteps,
            max_fraction=self.config.gap_timesteps,
        )
        gap, gap_per_timestep = loss_gap(baseline, weights=weights)
        replicas, replica_evidence = self.replica_counts(encodings, samples)
        copies = neighbours["num_copies"]
        scores = combined_score(gap, replicas, replica_weight=self.config.replica_weight)
        write_tensors(
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
                "reference_distance": neighbours["reference"][i].item(),
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
            "timesteps": attributor.timesteps.tolist(),
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
        write_json(self.file(AUDIT_REPORT_FILE), report)
        return report

    # -- optional: leakage and mislabels ------------------------------------------------------------

    def leakage(self, test: ImageFolder, encodings: torch.Tensor, neighbours: dict[str, torch.Tensor]) -> list[dict]:
        """Each test image's nearest training image, and whether it is a copy (Carlini's criterion)."""
        flat = _flat(encodings)
        records = test.records
        entries = []
        for start in tqdm(range(0, len(records), 256), disable=not self.progress, desc="leakage"):
            chunk = records[start : start + 256]
            pixels = torch.stack([self.attributor._load(r.path) for r in chunk])
            queries = self.model.encode(pixels.to(self.model.device)).cpu()
            found = nearest_neighbours(queries, flat, k=1)
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
                        "reference": reference[r].item(),
                        "ratio": ratios[r].item(),
                        "copy": bool(copies[r]),
                    }
                )
        entries.sort(key=lambda entry: entry["ratio"])
        write_json(
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
        attributor = self.attributor
        encodings, conditions = attributor.encodings()
        labels = conditions.long()
        num_classes = self.model.num_classes
        path = self.file(AUDIT_MISLABELED_LOSSES_FILE)
        if path.is_file():
            saved = read_tensors(path)
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
                    encodings[others],
                    torch.full((len(others),), label, dtype=torch.long),
                    [self.ids[i] for i in others.tolist()],
                    timesteps=attributor.timesteps,
                    num_draws=attributor.scoring.num_draws,
                    seed=attributor.scoring.seed,
                    batch_size=attributor.scoring.batch_size,
                    progress=self.progress,
                    description=f"under label {label}",
                )
                losses[others, label] = matrix.losses
            done[label] = True
            write_tensors(path, {"class_losses": losses, "done": done})
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
        write_json(
            self.file(AUDIT_MISLABELED_FILE),
            {
                "score": "mean loss over the grid under the image's own label minus the lowest such loss under "
                "any other label (same noise); positive: another label explains the image better",
                "ranking": entries,
            },
        )
        return entries


def run_audit(
    attributor: Attributor,
    config: AuditConfig,
    *,
    leakage: str | Path | ImageFolder | None = None,
    mislabeled: bool = False,
) -> AuditReport:
    """Runs (or resumes) the audit and writes ``<run-dir>/audit/``; see the module docstring.

    Args:
        attributor: the model, training set and run directory to audit.
        config: audit settings.
        leakage: a test image folder to check for copies of training images.
        mislabeled: rank training images by their mislabel score (class-conditional models).

    Returns:
        An :class:`AuditReport`.

    Raises:
        DiffattrError: a saved audit has other settings, ``mislabeled`` on an unconditional model,
            or a bad test folder.
    """
    if mislabeled and attributor.model.num_classes is None:
        raise DiffattrError(
            "--mislabeled needs a class-conditional model (num_class_embeds), and this one is unconditional: "
            "drop --mislabeled"
        )
    if config.sampling_steps > attributor.model.num_train_timesteps:
        raise DiffattrError(
            f"--sampling-steps {config.sampling_steps}: must be at most the scheduler's "
            f"{attributor.model.num_train_timesteps} training timesteps (0: all)"
        )
    test = None
    if leakage is not None:
        try:
            test = leakage if isinstance(leakage, ImageFolder) else ImageFolder(leakage)
        except DiffattrError as error:
            raise DiffattrError(f"--leakage: {error}") from None
    if config.samples:
        # Replicas are attributed after sampling: refuse other attribution settings before it.
        select_parameters(attributor.model.unet, attributor.attribution.params)
        attributor.run.check_or_write_config(attributor.run_config(with_attribution=True))
    audit = _Audit(attributor, config)
    baseline = attributor.cache()
    audit.check_or_write_settings()
    start = time.perf_counter()
    encodings, _ = attributor.encodings()
    neighbours = audit.neighbours(encodings)
    samples = audit.replicas(encodings, neighbours)
    report = audit.report(baseline, neighbours, samples)
    leaks = audit.leakage(test, encodings, neighbours) if test is not None else None
    mislabels = audit.mislabeled(baseline) if mislabeled else None
    if attributor.progress:
        tqdm.write(f"audit: {time.perf_counter() - start:.1f}s after the baseline")
    signals = read_tensors(audit.file(AUDIT_SCORES_FILE))
    return AuditReport(
        ids=attributor.ids,
        scores=signals["score"],
        signals={name: signals[name] for name in ("loss_gap", "replicas", "copies")},
        ranking=report["ranking"],
        samples=samples,
        leakage=leaks,
        mislabeled=mislabels,
        folder=audit.folder,
    )
