"""Scoring precision: Forward-INF's scores with the forward passes in bf16 (``--dtype bf16``, autocast)
against fp32, on the same queries, model and noise, in this one run.

Prints, per aggregation, the Spearman correlation of the scores with fp32's (target ≥ 0.99), the
overlap of the top-10 and whether the top-1 is the same, and the scoring rows/s of each precision.
On a CPU bf16 is emulated and slow; the agreement, not the speed, is what this measures there
(``bench_gpu.py`` measures the speed on a GPU).

    python benchmarks/bench_dtype.py              # bundled toy model, 720 training images, 6 queries
    python benchmarks/bench_dtype.py --dtype fp16 --device cuda
"""

import argparse
import dataclasses
import time

import torch
from protocol import markdown_table, toy_world, write_results

from diffattr import AttributionConfig
from diffattr.config import ScoringConfig
from diffattr.data import load_image
from diffattr.engine import Engine, Queries
from diffattr.metrics import spearman
from diffattr.noise import ScoringGrid


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=6)
    return parser.parse_args()


def main(args):
    model, train, heldout = toy_world(args.device)
    records = heldout[: args.queries]
    images = torch.stack([load_image(r.path, resolution=model.resolution, channels=model.channels) for r in records])
    queries = Queries(images, None, [r.id for r in records])
    config = AttributionConfig()
    fp32 = ScoringGrid.of(model.num_train_timesteps, ScoringConfig())
    results, seconds = {}, {}
    for name, grid in (("fp32", fp32), (args.dtype, dataclasses.replace(fp32, dtype=args.dtype))):
        engine = Engine(model, train, grid)
        start = time.perf_counter()
        baseline = engine.baseline()
        seconds[name] = time.perf_counter() - start
        results[name] = engine.query_scores(queries, config, baseline=baseline, aggregations=["calibrated", "loss"])
    rows_per_pass = len(train.ids) * len(fp32.timesteps)
    table, payload = [], {"queries": queries.names, "rows_per_second": {}, "aggregations": {}}
    for aggregation in ("calibrated", "loss"):
        full, low = results["fp32"][aggregation], results[args.dtype][aggregation]
        rho = spearman(full, low).tolist()
        overlap = [
            len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) / 10 for a, b in zip(full, low)
        ]
        same_top1 = sum(int(a.argmax() == b.argmax()) for a, b in zip(full, low))
        entry = {
            "spearman_min": min(rho),
            "spearman_mean": sum(rho) / len(rho),
            "top10_overlap": sum(overlap) / len(rho),
        }
        payload["aggregations"][aggregation] = {**entry, "same_top1": same_top1}
        cells = [f"{entry[k]:.4f}" for k in ("spearman_mean", "spearman_min")] + [f"{entry['top10_overlap']:.2f}"]
        table.append([aggregation, *cells, f"{same_top1}/{len(rho)}"])
    for name, value in seconds.items():
        payload["rows_per_second"][name] = rows_per_pass / value
    header = ["aggregation", "Spearman vs fp32 (mean)", "(min)", "top-10 overlap", "same top-1"]
    speed = ", ".join(f"{n}: {v:,.0f} rows/s" for n, v in payload["rows_per_second"].items())
    write_results(f"dtype_{args.dtype}", payload, markdown_table(header, table) + f"\n\nBaseline pass: {speed}.")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
