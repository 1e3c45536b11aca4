"""Counterfactual check (AbU's): retrain without each query's top-K and see how much its loss rises.

On an LDS world (``eval_lds.py --world``: 100 images at 8x8 and that world's UNet), each method
ranks the training images for each query with the full model; then, per query and method, a model
is retrained from scratch on the training set minus that method's top-K, and one minus K random
images. Every retrain of one query uses the same seed, so the only difference between its models
is which images were left out. A method whose top-K really made the query raises its loss more
than random removal: reported is the mean over queries of (loss without the top-K) / (loss without
K random images), and how often the top-K removal beat random (query loss: the LDS grid, 20
timesteps × 8 fixed draws). Models are saved one file each, so a rerun resumes.

    python benchmarks/eval_counterfactual.py               # digits: 16 queries × 6 retrains
    python benchmarks/eval_counterfactual.py --world faces
"""

import argparse
import time
from pathlib import Path

import eval_lds
import torch
from protocol import Setting, all_method_scores, markdown_table, write_results

from diffattr.engine import Queries, TrainingSet

METHODS = ("forward-inf[default|calibrated]", "forward-inf[default|loss]", "pixel", "tracin", "dtrak[λ=0.01]")
RANDOM = "random"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="digits", choices=list(eval_lds.WORLDS))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/lds"), help="models (shared with eval_lds)")
    parser.add_argument("--queries", type=int, default=8, help="generated and held-out queries, each")
    parser.add_argument("--top-k", type=int, default=10, help="K: training images removed per retrain")
    parser.add_argument("--train-steps", type=int, default=eval_lds.TRAIN_STEPS)
    parser.add_argument("--workers", type=int, default=2, help="processes retraining models (1 thread each)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def removed_sets(scores: dict[str, torch.Tensor], num_images: int, k: int) -> dict[str, torch.Tensor]:
    """``{method: (Q, K) indices}``: each query's top-K, and K random images per query (seeded)."""
    sets = {name: scores[name].topk(k, dim=1).indices for name in METHODS}
    generator = torch.Generator().manual_seed(2024)
    queries = next(iter(sets.values())).shape[0]
    sets[RANDOM] = torch.stack([torch.randperm(num_images, generator=generator)[:k] for _ in range(queries)])
    return sets


def main(args):
    world, work = eval_lds.WORLDS[args.world], args.work / args.world
    data = eval_lds.load_world(world, args.queries)
    ids, images, labels = data.ids, data.images, data.labels if world.conditional else None
    progress = not args.quiet
    full = eval_lds.full_model(args.world, args.work, data, steps=args.train_steps)
    queries = eval_lds.world_queries(world, data, full, args.queries, progress=progress)
    scores, seconds = all_method_scores(
        full,
        TrainingSet(images, labels, ids),
        queries,
        settings=[Setting()],
        gradient_timesteps=(10,),
        progress=progress,
    )
    sets = removed_sets(scores, len(ids), args.top_k)
    start = time.perf_counter()
    paths, jobs = {}, []  # (query, method) -> its retrained model; the retrains run side by side
    for q in range(len(queries.names)):
        for name, removed in sets.items():
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[removed[q]] = False
            key = "-".join(map(str, sorted(removed[q].tolist())))
            path = paths[q, name] = work / "counterfactual" / f"{args.top_k}-{args.train_steps}-{q}-{key}.safetensors"
            kept_labels = None if labels is None else labels[keep]
            jobs.append((world, path, images[keep], kept_labels, args.train_steps, 30_000 + q))
    eval_lds.train_all(jobs, workers=args.workers, progress=progress)
    losses = {name: [] for name in sets}
    for q, query_name in enumerate(queries.names):
        conditions = None if labels is None else queries.conditions[q : q + 1]
        one = Queries(queries.encodings[q : q + 1], conditions, [query_name])
        for name in sets:
            losses[name].append(eval_lds.query_losses(eval_lds.load_model(world, paths[q, name]), one).item())
    kinds = {"generated": slice(0, args.queries), "held-out": slice(args.queries, 2 * args.queries)}
    random_losses = torch.tensor(losses[RANDOM])
    methods, rows = {}, []
    for name in sets:
        ratio = torch.tensor(losses[name]) / random_losses
        entry = {
            kind: {
                "loss_ratio": ratio[rows_of].mean().item(),
                "beats_random": (ratio[rows_of] > 1).float().mean().item(),
            }
            for kind, rows_of in kinds.items()
        }
        entry["losses"] = losses[name]
        methods[name] = entry
        rows.append([name, *[f"{entry[k]['loss_ratio']:.3f} ({entry[k]['beats_random']:.2f})" for k in kinds]])
    header = [
        f"method (top-{args.top_k} removed)",
        "generated: loss ratio (beats random)",
        "held-out: loss ratio (beats random)",
    ]
    markdown = markdown_table(header, rows)
    markdown += (
        f"\n\nLoss ratio: the query's loss after retraining without the method's top-{args.top_k}, over its loss "
        f"after retraining without {args.top_k} random images (same seed), mean over {args.queries} queries each; "
        f"beats random: the fraction of queries where it is above 1. Retraining: {time.perf_counter() - start:.0f} s."
    )
    name = "counterfactual" if args.world == "digits" else f"counterfactual_{args.world}"
    write_results(name, {"world": args.world, "top_k": args.top_k, "seconds": seconds, "methods": methods}, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
