"""The memorization audit on every model of the zoo: are the images duplicated ≥ 8x found?

Per model of ``benchmarks/zoo.py`` the positives are the training images with at least 8
pixel-identical copies in the training set (the canaries: 30 copies each in digits and mnist, 10 in
faces), the negatives every other training image. For each signal: AUC and TPR at 1 % FPR.

- the loss gap averaged over grid timesteps below a fraction F of T (1, 1/2, 1/4), and at each grid
  timestep alone: which timesteps the loss gap should weight (the audit's default score, G = 0, is
  the loss gap at the default F);
- the audit's score with G = 64 samples (loss gap + 2 log2(1 + replicas attributed)) at each F;
- the replicas: how many samples the audit calls replicas, how many copy a ≥ 8x image, and how
  many are attributed top-1 to a copy of their nearest training image.

The audit of each model is saved under ``benchmarks/work/zoo/<name>/audit-run`` and resumed by a
rerun.

    python benchmarks/eval_zoo_audit.py                   # ~5 min per model on 2 cores
"""

import argparse
import time

import torch
import zoo
from protocol import markdown_table, write_results

from diffattr import Attributor, AuditConfig, DiffusionModel
from diffattr.memorization import auc, combined_score, loss_gap, timestep_weights, tpr_at_fpr

DUPLICATED = 8  # copies that make an image a positive
SAMPLES = 64
FRACTIONS = (1.0, 0.5, 0.25)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.RECIPES), help="comma-separated zoo models")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def copies_in_data(encodings: torch.Tensor) -> torch.Tensor:
    """``(N,)`` how many training images are pixel-identical to each one (itself included)."""
    _, inverse, counts = torch.unique(encodings.flatten(1), dim=0, return_inverse=True, return_counts=True)
    return counts[inverse]


def separation(scores: torch.Tensor, positives: torch.Tensor) -> dict:
    return {"auc": auc(scores, positives), "tpr@1%fpr": tpr_at_fpr(scores, positives, 0.01)}


def evaluate(member: zoo.Member, args) -> dict:
    model = DiffusionModel.from_pretrained(member.model, device="cpu")
    attributor = Attributor(model, member.train, zoo.WORK / member.name / "audit-run", progress=not args.quiet)
    start = time.perf_counter()
    baseline = attributor.baseline()
    baseline_seconds = time.perf_counter() - start
    encodings, _ = attributor.encodings()
    copies = copies_in_data(encodings)
    positives = copies >= DUPLICATED
    timesteps = attributor.timesteps
    start = time.perf_counter()
    # F = 1 for the audit's own score; every F is recombined below from the same signals.
    config = AuditConfig(samples=SAMPLES, gap_timesteps=1.0)
    report = attributor.audit(config)
    audit_seconds = time.perf_counter() - start
    replicas = report.signals["replicas"]
    signals, combined = {}, {}
    for fraction in FRACTIONS:
        weights = timestep_weights(timesteps, num_train_timesteps=model.num_train_timesteps, max_fraction=fraction)
        gap = loss_gap(baseline, weights=weights)[0]
        signals[f"loss gap, t < {fraction:g} T"] = gap
        combined[f"audit score, G = {SAMPLES}, t < {fraction:g} T"] = combined_score(
            gap, replicas, replica_weight=config.replica_weight
        )
    assert torch.allclose(combined[f"audit score, G = {SAMPLES}, t < 1 T"], report.scores, atol=1e-5)
    signals.update(combined)
    signals["replicas attributed (alone)"] = replicas.float()
    _, per_timestep = loss_gap(baseline)
    row = {name: i for i, name in enumerate(report.ids)}
    replicas = report.replicas
    duplicated = [r for r in replicas if copies[row[r["nearest"][0]["id"]]] >= DUPLICATED]
    same = [torch.equal(encodings[row[r["top1"]]], encodings[row[r["nearest"][0]["id"]]]) for r in replicas]
    return {
        "images": len(report.ids),
        "positives": int(positives.sum()),
        "signals": {name: separation(values, positives) for name, values in signals.items()},
        "per timestep": {int(t): auc(per_timestep[:, k], positives) for k, t in enumerate(timesteps.tolist())},
        "samples": len(report.samples),
        "replicas": len(replicas),
        "replicas of duplicated images": len(duplicated),
        "replicas attributed to a copy of their nearest image": sum(same),
        "seconds": {"baseline": baseline_seconds, "audit": audit_seconds},
    }


def _cell(entry: dict) -> str:
    return f"{entry['auc']:.3f} / {entry['tpr@1%fpr']:.2f}"


def main(args):
    results = {name: evaluate(zoo.prepare(name, quiet=args.quiet), args) for name in args.models.split(",")}
    models = list(results)
    header = ["signal (AUC / TPR at 1 % FPR)"]
    header += [f"{m} ({results[m]['positives']} of {results[m]['images']} duplicated ≥ {DUPLICATED}x)" for m in models]
    names = list(results[models[0]]["signals"])
    markdown = markdown_table(header, [[name, *[_cell(results[m]["signals"][name]) for m in models]] for name in names])
    markdown += "\n\n(The audit's score at its defaults, G = 0, is the loss gap at the default F = 0.5.)"
    markdown += "\n\nAUC of the loss gap at one grid timestep:\n\n"
    steps = list(results[models[0]]["per timestep"])
    per_step = [[m, *[f"{results[m]['per timestep'][t]:.2f}" for t in steps]] for m in models]
    markdown += markdown_table(["model", *map(str, steps)], per_step)
    markdown += "\n\nReplicas among the audit's samples:\n\n"
    counts = ["samples", "replicas", "replicas of duplicated images"]
    counts.append("replicas attributed to a copy of their nearest image")
    markdown += markdown_table(["model", *counts], [[m, *[results[m][c] for c in counts]] for m in models])
    seconds = ", ".join(
        f"{m}: baseline {r['seconds']['baseline']:.0f} s, audit {r['seconds']['audit']:.0f} s"
        for m, r in results.items()
    )
    markdown += f"\n\nTimings (2 cores; a stage reused from an earlier run shows ~0): {seconds}"
    write_results("zoo_audit", {"models": results}, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
