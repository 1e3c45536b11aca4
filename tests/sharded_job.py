"""Run by ``tests/test_distributed.py`` in one process and under ``torchrun`` on two: every verb of
the Python API on a tiny class-conditional model (and AbU's Fisher), the numbers saved to
``<run-dir>/numbers.safetensors``.

    python tests/sharded_job.py MODEL DATA RUN_DIR QUERY
"""

import sys

import torch
from safetensors.torch import load_file

from diffattr import AttributionConfig, Attributor
from diffattr.config import AuditConfig, GradientConfig, ScoringConfig
from diffattr.store import write_tensors


def main(model: str, data: str, run_dir: str, query: str) -> None:
    torch.set_num_threads(1)
    scoring = ScoringConfig(num_timesteps=4, num_draws=2, batch_size=5)  # batches straddle the blocks
    attributor = Attributor(
        model,
        data,
        run_dir,
        scoring=scoring,
        attribution=AttributionConfig(steps=3, draws_per_step=8, calibration_images=3),
        gradient=GradientConfig(projection_dim=16),
        device="cpu",
        progress=False,
    )
    baseline = attributor.cache()  # encodings, baseline and the calibration
    forward_inf = attributor.attribute(query, labels=1)[0]
    dtrak = attributor.attribute(query, labels=1, method="dtrak")[0]
    report = attributor.audit(AuditConfig(samples=3, sampling_steps=5, alpha=100.0), mislabeled=True)
    abu = Attributor(  # AbU: its Fisher is sharded over the processes too
        model,
        data,
        f"{run_dir}/abu",
        scoring=scoring,
        attribution=AttributionConfig(steps=3, draws_per_step=8, aggregation="loss", ewc_weight=1.0, fisher_images=5),
        device="cpu",
        progress=False,
    )
    abu_scores = abu.attribute(query, labels=1)[0].scores
    numbers = {
        "baseline": baseline,
        "calibration": attributor.calibration(),
        "forward_inf": forward_inf.scores,
        "dtrak": dtrak.scores,
        "audit": report.scores,
        "mislabel": torch.tensor([entry["score"] for entry in sorted(report.mislabeled, key=lambda e: e["id"])]),
        "replicas": torch.tensor(len(report.replicas)),
        "samples": load_file(f"{run_dir}/audit/samples.safetensors")["samples"],  # sampled in blocks too
        "fisher": torch.cat([values.flatten() for values in abu.fisher().values()]),
        "abu": abu_scores,
    }
    write_tensors(attributor.run.file("numbers.safetensors"), numbers)


if __name__ == "__main__":
    main(*sys.argv[1:])
