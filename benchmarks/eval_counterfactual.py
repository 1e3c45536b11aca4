"""Counterfactual check (AbU's): retrain without each query's top-K and see how much its loss rises.

On the LDS toy world (``eval_lds.py``: 100 digits at 8x8, a ~180k-parameter UNet), each method
ranks the training images for each query with the full model; then, per query and method, a model
is retrained from scratch on the training set minus that method's top-K, and one minus K random
images. Every retrain of one query uses the same seed, so the only difference between its models
is which images were left out. A method whose top-K really made the query raises its loss more
than random removal: reported is the mean over queries of (loss without the top-K) / (loss without
K random images), and how often the top-K removal beat random (query loss: the LDS grid, 20
timesteps × 8 fixed draws). Models are saved one file each, so a rerun resumes.

    python benchmarks/eval_counterfactual.py               # 16 queries × 6 retrains
"""

import argparse
import time
from pathlib import Path

import eval_lds
import torch
from protocol import Setting, all_method_scores, markdown_table, write_results

from diffattr.engine import Queries, TrainingSet
from diffattr.sampling import generate

METHODS = ("forward-inf[default|calibrated]", "forward-inf[default|loss]", "pixel", "tracin", "dtrak[λ=0.01]")
RANDOM = "random"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/lds"), help="models (shared with eval_lds)")
    parser.add_argument("--queries", type=int, default=8, help="generated and held-out queries, each")
    parser.add_argument("--top-k", type=int, default=10, help="K: training images removed per retrain")
    parser.add_argument("--train-steps", type=int, default=600)
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
    ids, images, heldout_names, heldout_images = eval_lds.load_world(10, args.queries)
    progress = not args.quiet
    full = eval_lds.trained_model(
        args.work / "full.safetensors", images, steps=args.train_steps, seed=10_000, progress=progress
    )
    generated = generate(full, seeds=list(range(args.queries)), progress=progress)
    queries = Queries(
        torch.cat([generated, heldout_images]),
        None,
        [f"generated/seed{s}" for s in range(args.queries)] + heldout_names[: args.queries],
    )
    scores, seconds = all_method_scores(
        full, TrainingSet(images, None, ids), queries, settings=[Setting()], gradient_timesteps=(10,), progress=progress
    )
    sets = removed_sets(scores, len(ids), args.top_k)
    losses = {name: [] for name in sets}
    start = time.perf_counter()
    for q, query_name in enumerate(queries.names):
        one = Queries(queries.encodings[q : q + 1], None, [query_name])
        for name, removed in sets.items():
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[removed[q]] = False
            key = "-".join(map(str, sorted(removed[q].tolist())))
            path = args.work / "counterfactual" / f"{args.top_k}-{args.train_steps}-{q}-{key}.safetensors"
            model = eval_lds.trained_model(path, images[keep], steps=args.train_steps, seed=30_000 + q, progress=False)
            losses[name].append(eval_lds.query_losses(model, one).item())
        if progress:
            print(f"query {q + 1}/{len(queries.names)} retrained ({time.perf_counter() - start:.0f}s)", flush=True)
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
    write_results("counterfactual", {"top_k": args.top_k, "seconds": seconds, "methods": methods}, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
