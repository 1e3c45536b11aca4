"""Scoring throughput of the engine against the raw forward throughput of the same UNet.

Both are measured in this one run, alternating, on the same rows (training image × timestep):
- raw: ``unet(x, t)`` on pre-made batches under ``inference_mode`` — the ceiling;
- engine: ``Engine.losses`` (``losses.loss_matrix``) — noise derived per (image, timestep, draw), the
  forward process, the target, the per-row loss and the bookkeeping.
Prints rows/s for each and their ratio (target ≥ 0.9), then the per-query split of perturbation
and scoring time of one attribution.

    python benchmarks/bench_scoring.py                 # bundled toy model and data
    python benchmarks/bench_scoring.py --model M --train DATA --device cuda
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffattr import Attributor, DiffusionModel, ScoringConfig
from diffattr.demo import toy_paths


def parse_args():
    toy = toy_paths()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=toy["model"])
    parser.add_argument("--train", type=Path, default=toy["train"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args):
    model = DiffusionModel.from_pretrained(args.model, device=args.device)
    device = model.device
    with tempfile.TemporaryDirectory() as run_dir:
        scoring = ScoringConfig(num_timesteps=args.timesteps, batch_size=args.batch_size)
        attributor = Attributor(model, args.train, run_dir, scoring=scoring, progress=False)
        conditions = attributor.encodings()[1]
        rows = len(attributor.ids) * args.timesteps
        inputs = torch.randn(args.batch_size, *model.sample_shape, device=device)
        steps = torch.randint(0, model.num_train_timesteps, (args.batch_size,), device=device)
        labels = None if conditions is None else conditions[: args.batch_size].to(device)

        def raw():
            with torch.inference_mode():
                for start in range(0, rows, args.batch_size):
                    n = min(args.batch_size, rows - start)
                    model.predict(inputs[:n], steps[:n], None if labels is None else labels[:n])

        def engine():
            attributor.engine().losses(description="engine")

        timings = {"raw": [], "engine": []}
        raw()  # warm-up
        for _ in range(args.repeats):
            for name, run in (("raw", raw), ("engine", engine)):
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                timings[name].append(time.perf_counter() - start)
        rate = {name: rows / statistics.median(values) for name, values in timings.items()}
        print(
            f"device {device}, {len(attributor.ids)} images × {args.timesteps} timesteps = {rows} rows, "
            f"batch {args.batch_size}, median of {args.repeats}"
        )
        print(f"raw forward  {rate['raw']:9.0f} rows/s")
        print(f"engine       {rate['engine']:9.0f} rows/s")
        paired = sorted(r / e for r, e in zip(timings["raw"], timings["engine"]))
        print(
            f"ratio engine/raw = {rate['engine'] / rate['raw']:.3f}  (target ≥ 0.9); "
            f"per adjacent pair: median {statistics.median(paired):.3f}, range {paired[0]:.3f}–{paired[-1]:.3f}"
        )

        query = attributor.data.records[0].path
        (result,) = attributor.attribute(query, top_k=1)
        t = result.timings
        print(
            f"one query (default settings): perturbation {t['perturb_seconds']:.2f}s, scoring {t['score_seconds']:.2f}s"
        )


if __name__ == "__main__":
    main(parse_args())
