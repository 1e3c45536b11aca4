"""Ground truth of the memorization audit: canaries at 1/5/20/100 copies, planted leakage, flipped labels.

Builds the data (``scripts/make_audit_data.py``), trains one class-conditional toy model on it
(``scripts/train_toy.py``), runs ``Attributor.audit`` with ``--leakage`` and ``--mislabeled``, and prints
one table: AUC of canaries with ≥ 20 copies against every other training image, mean score per
duplication level (0 = held-out non-members), replica top-1 accuracy, leakage recall/precision,
mislabeled precision@k. Writes ``<out>.json`` and ``<out>.md`` (with the command that made them).
Data, model and audit are reused by a rerun with the same settings (the audit resumes).

    python benchmarks/eval_audit.py                      # full: ~10 min of training + ~7 min of audit on 2 cores
    python benchmarks/eval_audit.py --quick              # smoke run: tiny data, 200 training steps, ~3 min
"""

import argparse
import itertools
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from zoo import script

from diffattr import AttributionConfig, Attributor, AuditConfig, DiffusionModel, ScoringConfig
from diffattr.data import ImageFolder, load_image
from diffattr.memorization import (
    auc,
    carlini_ratio,
    loss_gap,
    nearest_neighbours,
    precision_at_k,
    reference_distance,
    timestep_weights,
)
from diffattr.store import read_tensors

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "per_class": 60,
    "levels": [1, 5, 20, 100],
    "canaries_per_level": 3,
    "heldout_per_class": 10,
    "planted": 20,
    "flip": 0.05,
    "train_steps": 2500,
    "timesteps": 10,
    "samples": 64,
    "sampling_steps": 0,
}
QUICK = {
    **FULL,
    "per_class": 15,
    "canaries_per_level": 2,
    "heldout_per_class": 3,
    "planted": 10,
    "train_steps": 200,
    "timesteps": 4,
    "samples": 8,
    "sampling_steps": 25,
}
HEAVY = 20  # canaries with at least this many copies are the positives of the AUC


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and training (~3 min)")
    parser.add_argument(
        "--work", type=Path, help="data, model and run dirs (default: benchmarks/work/eval-audit[-quick])"
    )
    parser.add_argument(
        "--out", type=Path, help="results path without suffix (default: benchmarks/results/audit, or <work>/audit)"
    )
    parser.add_argument("--train-steps", type=int, help="override the training steps")
    parser.add_argument("--samples", type=int, help="override G, the samples checked for replicas")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def settings_of(args) -> dict:
    settings = dict(QUICK if args.quick else FULL)
    if args.train_steps is not None:
        settings["train_steps"] = args.train_steps
    if args.samples is not None:
        settings["samples"] = args.samples
    settings["seed"] = args.seed
    return settings


def prepare(work: Path, settings: dict, *, quiet: bool) -> dict:
    """Data and model, rebuilt only when the settings that shaped them changed."""
    saved = work / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        shutil.rmtree(work)  # another configuration: nothing in here is valid for it
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    if not (work / "data" / "truth.json").is_file():
        start = time.perf_counter()
        script("make_audit_data").build(
            work / "data",
            **{key: settings[key] for key in ("per_class", "levels", "canaries_per_level", "heldout_per_class")},
            planted=settings["planted"],
            flip=settings["flip"],
            seed=settings["seed"],
        )
        timings["data_seconds"] = time.perf_counter() - start
    if not (work / "model" / "model_index.json").is_file():
        start = time.perf_counter()
        train_toy = script("train_toy")
        training = train_toy.parse_args(
            ["--data", str(work / "data" / "train"), "--out", str(work / "model"), "--class-conditional"]
            + ["--steps", str(settings["train_steps"]), "--seed", str(settings["seed"])]
            + (["--quiet"] if quiet else [])
        )
        train_toy.main(training)
        timings["train_seconds"] = time.perf_counter() - start
    saved.write_text(json.dumps(settings, indent=1) + "\n")
    # Data and model of an earlier run are reused: report the time they took then.
    recorded = work / "timings.json"
    timings = {**(json.loads(recorded.read_text()) if recorded.is_file() else {}), **timings}
    recorded.write_text(json.dumps(timings) + "\n")
    return timings


def recall_at_precision(scores: torch.Tensor, positives: torch.Tensor, precision: float) -> float:
    """The highest recall of any score threshold whose precision is at least ``precision``."""
    hits = positives.bool()[torch.sort(scores, descending=True, stable=True).indices].float()
    found = hits.cumsum(0)
    ok = found / torch.arange(1, len(hits) + 1) >= precision
    return (found[ok].max() / hits.sum()).item() if ok.any() else 0.0


SWEEP_NEIGHBOURS = (1, 5, 50)


def ratios_at(encodings: torch.Tensor, queries: torch.Tensor, config: AuditConfig) -> tuple[torch.Tensor, dict]:
    """Each query's nearest training image, and its Carlini ratio at n = 1, 5, 50 (pure functions)."""
    flat = encodings.flatten(1)
    copy_distance = config.copy_tolerance * flat.shape[1] ** 0.5
    neighbours = nearest_neighbours(flat, flat, k=max(SWEEP_NEIGHBOURS), copy_distance=copy_distance, skip_self=True)
    nearest = nearest_neighbours(queries, flat, k=1)
    ratios = {
        n: carlini_ratio(
            nearest.distances[:, 0], reference_distance(neighbours.distances[:, :n])[nearest.indices[:, 0]]
        )
        for n in SWEEP_NEIGHBOURS
    }
    return nearest.indices[:, 0], ratios


def leakage_metrics(report, truth: dict, encodings: torch.Tensor, test: ImageFolder, model, config) -> dict:
    """Recall/precision of the audit's verdicts, and of the same criterion at other n."""
    entries = {entry["id"]: entry for entry in report.leakage}
    ids = [record.id for record in test.records]
    planted = torch.tensor([truth["leakage"][i]["source"] is not None for i in ids])
    verdict = torch.tensor([entries[i]["copy"] for i in ids])
    ratio = torch.tensor([entries[i]["ratio"] for i in ids])
    true_positive = (verdict & planted).sum().item()
    metrics = {
        "planted": int(planted.sum()),
        "genuine": int((~planted).sum()),
        "recall": true_positive / max(int(planted.sum()), 1),
        "precision": true_positive / max(int(verdict.sum()), 1),
        "auc": auc(-ratio, planted),
        "recall_at_precision_0.9": recall_at_precision(-ratio, planted, 0.9),
        "top1_correct": sum(
            truth["group"][entries[i]["top1"]] == truth["group"][truth["leakage"][i]["source"]]
            for i in ids
            if truth["leakage"][i]["source"] is not None
        )
        / max(int(planted.sum()), 1),
    }
    pixels = torch.stack(
        [load_image(r.path, resolution=model.resolution, channels=model.channels) for r in test.records]
    )
    _, ratios = ratios_at(encodings, model.encode(pixels), config)
    for n, values in ratios.items():
        flags = values < config.alpha
        hits = (flags & planted).sum().item()
        metrics[f"n={n}"] = {
            "recall": hits / max(int(planted.sum()), 1),
            "precision": hits / max(int(flags.sum()), 1),
            "false_copies": int((flags & ~planted).sum()),
        }
    return metrics


def replica_sweep(samples: torch.Tensor, encodings: torch.Tensor, ids: list[str], truth: dict, config) -> dict:
    """Samples flagged as replicas at n = 1, 5, 50, and how many of those copy a ≥ HEAVY-copy canary."""
    nearest, ratios = ratios_at(encodings, samples, config)
    heavy = torch.tensor([truth["copies"][ids[i]] >= HEAVY for i in nearest.tolist()])
    flags = {n: values < config.alpha for n, values in ratios.items()}
    return {f"n={n}": {"flagged": int(f.sum()), "of_heavy": int((f & heavy).sum())} for n, f in flags.items()}


def evaluate(args) -> dict:
    settings = settings_of(args)
    work = args.work or ROOT / "benchmarks" / "work" / ("eval-audit-quick" if args.quick else "eval-audit")
    timings = prepare(work, settings, quiet=args.quiet)
    truth = json.loads((work / "data" / "truth.json").read_text())
    model = DiffusionModel.from_pretrained(work / "model", device=args.device)
    scoring = ScoringConfig(num_timesteps=settings["timesteps"])
    config = AuditConfig(samples=settings["samples"], sampling_steps=settings["sampling_steps"])
    attributor = Attributor(
        model,
        work / "data" / "train",
        work / "run",
        scoring=scoring,
        attribution=AttributionConfig(),
        progress=not args.quiet,
    )
    start = time.perf_counter()
    baseline = attributor.cache()
    timings["baseline_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    report = attributor.audit(config, leakage=work / "data" / "leakage", mislabeled=True)
    timings["audit_seconds"] = time.perf_counter() - start
    ids = report.ids
    copies = torch.tensor([truth["copies"][i] for i in ids])
    heavy = copies >= HEAVY

    # Loss gap of held-out non-members, against the training population (level 0 of the table).
    heldout = Attributor(model, work / "data" / "heldout", work / "run-heldout", scoring=scoring, progress=False)
    weights = timestep_weights(
        attributor.timesteps, num_train_timesteps=model.num_train_timesteps, max_fraction=config.gap_timesteps
    )
    heldout_gap, _ = loss_gap(heldout.cache(), reference=baseline, weights=weights)

    gap = report.signals["loss_gap"]
    all_t, per_timestep = loss_gap(baseline)
    small_t, _ = loss_gap(
        baseline,
        weights=timestep_weights(attributor.timesteps, num_train_timesteps=model.num_train_timesteps, max_fraction=0.5),
    )
    auc_table = {
        "combined score": auc(report.scores, heavy),
        "loss gap (default weighting)": auc(gap, heavy),
        "loss gap, all t": auc(all_t, heavy),
        "loss gap, t < T/2": auc(small_t, heavy),
        "raw mean loss (−B)": auc(-baseline.mean(1), heavy),
        "copies in the data (no model)": auc(report.signals["copies"].float(), heavy),
        "per timestep": {int(t): auc(per_timestep[:, k], heavy) for k, t in enumerate(attributor.timesteps.tolist())},
    }
    levels = {"0 (held-out)": {"images": len(heldout_gap), "loss_gap": heldout_gap.mean().item(), "score": None}}
    for level in [1, *[v for v in truth["levels"] if v != 1]]:
        mask = copies == level
        levels[str(level)] = {
            "images": int(mask.sum()),
            "loss_gap": gap[mask].mean().item(),
            "score": report.scores[mask].mean().item(),
        }
    level_gaps = [entry["loss_gap"] for entry in levels.values()]

    group = truth["group"]
    replicas = report.replicas
    correct = [group[r["top1"]] == group[r["nearest"][0]["id"]] for r in replicas]
    of_heavy = [r for r in replicas if truth["copies"][r["nearest"][0]["id"]] >= HEAVY]
    replica_metrics = {
        "samples": len(report.samples),
        "replicas": len(replicas),
        "of_heavy_canaries": len(of_heavy),
        "top1_accuracy": sum(correct) / len(replicas) if replicas else None,
        "top1_accuracy_heavy": (
            sum(group[r["top1"]] == group[r["nearest"][0]["id"]] for r in of_heavy) / len(of_heavy)
            if of_heavy
            else None
        ),
    }

    flipped = truth["flipped"]
    mislabeled_scores = torch.tensor([entry["score"] for entry in report.mislabeled])
    is_flipped = torch.tensor([entry["id"] in flipped for entry in report.mislabeled])
    mislabel_metrics = {
        "flipped": len(flipped),
        "precision_at_k": precision_at_k(mislabeled_scores, is_flipped, max(len(flipped), 1)),
        "auc": auc(mislabeled_scores, is_flipped) if 0 < len(flipped) < len(ids) else None,
    }
    encodings = attributor.encodings()[0]
    if report.samples:
        samples = read_tensors(work / "run" / "audit" / "samples.safetensors")["samples"]
        replica_metrics["sweep"] = replica_sweep(samples, encodings, ids, truth, config)
    test = ImageFolder(work / "data" / "leakage")
    leakage = leakage_metrics(report, truth, encodings, test, model, config)
    return {
        "command": "python " + shlex.join([_relative(Path(sys.argv[0])), *sys.argv[1:]]),
        "settings": settings,
        "audit_settings": config.to_dict(),
        "num_train": len(ids),
        "auc_heavy_vs_rest": auc_table,
        "levels": levels,
        "loss_gap_rises_with_copies": all(a < b for a, b in itertools.pairwise(level_gaps)),
        "replicas": replica_metrics,
        "leakage": leakage,
        "mislabeled": mislabel_metrics,
        "timings": timings,
    }


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(results: dict) -> str:
    a, r, leak, mis = results["auc_heavy_vs_rest"], results["replicas"], results["leakage"], results["mislabeled"]
    alpha = results["audit_settings"]["alpha"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Memorization audit ground truth ({results['num_train']} training images, canaries at "
        f"{results['settings']['levels']} copies; class-conditional toy model, "
        f"{results['settings']['train_steps']} training steps)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| AUC, canaries with ≥ {HEAVY} copies vs the rest: combined score | {_fmt(a['combined score'])} | ≥ 0.95 |",
    ]
    for name in ("loss gap, all t", "loss gap, t < T/2", "raw mean loss (−B)", "copies in the data (no model)"):
        lines.append(f"| … {name} | {_fmt(a[name])} | |")
    per_t = ", ".join(f"{t}: {v:.2f}" for t, v in a["per timestep"].items())
    lines.append(f"| … loss gap at one timestep ({per_t}) | | |")
    for level, entry in results["levels"].items():
        lines.append(
            f"| mean loss gap / score, {level} copies ({entry['images']} images) | "
            f"{_fmt(entry['loss_gap'])} / {_fmt(entry['score'])} | rising |"
        )
    lines += [
        f"| loss gap rises with copies | {results['loss_gap_rises_with_copies']} | True |",
        f"| replicas among {r['samples']} samples (of ≥ {HEAVY}-copy canaries) | {r['replicas']} "
        f"({r['of_heavy_canaries']}) | |",
        f"| replica top-1 accuracy: all / of ≥ {HEAVY}-copy canaries | {_fmt(r['top1_accuracy'])} / "
        f"{_fmt(r['top1_accuracy_heavy'])} | |",
    ]
    for n, entry in r.get("sweep", {}).items():
        lines.append(
            f"| samples flagged at α = {alpha}, {n.replace('=', ' = ')} (of ≥ {HEAVY}-copy canaries) | "
            f"{entry['flagged']} ({entry['of_heavy']}) | |"
        )
    lines += [
        f"| leakage recall / precision at defaults ({leak['planted']} planted, {leak['genuine']} genuine) | "
        f"{_fmt(leak['recall'])} / {_fmt(leak['precision'])} | ≥ 0.9 / ≥ 0.9 |",
        f"| leakage: AUC of the Carlini ratio; best recall at precision ≥ 0.9 | {_fmt(leak['auc'])}; "
        f"{_fmt(leak['recall_at_precision_0.9'])} | |",
    ]
    for n in (1, 5, 50):
        entry = leak[f"n={n}"]
        lines.append(
            f"| leakage at α = {alpha}, n = {n}: recall / precision (false copies) | {_fmt(entry['recall'])} / "
            f"{_fmt(entry['precision'])} ({entry['false_copies']}) | |"
        )
    lines += [
        f"| mislabeled precision@k, k = {mis['flipped']} flipped labels (AUC) | {_fmt(mis['precision_at_k'])} "
        f"({_fmt(mis['auc'])}) | |",
        "",
        "Timings (s; a stage reused from an earlier run shows ~0, except data and train): "
        + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f}" for k, v in results["timings"].items()),
    ]
    return "\n".join(lines)


def main(args):
    torch.manual_seed(args.seed)
    results = evaluate(args)
    text = table(results)
    print("\n" + text)
    work = args.work or ROOT / "benchmarks" / "work" / ("eval-audit-quick" if args.quick else "eval-audit")
    out = args.out or (work / "audit" if args.quick else ROOT / "benchmarks" / "results" / "audit")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main(parse_args())
