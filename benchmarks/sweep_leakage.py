"""Leakage ground truth on the bundled toy model, swept over direction × learning rate × aggregation.

Queries: 10 training images spread over the sorted ids (2 of them planted canaries) and 2 generated
replicas of canaries (demo.json's seeds 0 and 27). A query's rank is the best rank of any training
image identical to it (for a replica: any copy of its canary). Prints, per setting, the top-1 count
and every query's rank. The baseline is computed once; each query costs one perturbation and one
scoring pass per setting.

    python benchmarks/sweep_leakage.py --directions ascent descent --lrs 3e-5 1e-4 3e-4 1e-3
"""

import argparse
import tempfile
import time

import torch

from diffattr import AttributionConfig, Attributor, DiffusionModel
from diffattr.demo import toy_paths
from diffattr.losses import loss_matrix
from diffattr.perturb import perturbed_copy
from diffattr.sampling import generate
from diffattr.scoring import aggregate
from diffattr.store import read_json

AGGREGATIONS = ("loss", "zscore", "relative")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", nargs="+", default=["ascent", "descent"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args()


def group_of(image_id: str) -> str:
    """Identical training images share a group: all copies of a canary, else the image alone."""
    return image_id.split("_")[0] if image_id.startswith("canaries/") else image_id


def main(args):
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(model, paths["train"], run_dir, progress=False)
        baseline = attributor.cache()
        encodings, _ = attributor.encodings()
    ids = attributor.ids
    picked = list(range(0, len(ids), len(ids) // 10))[:10]
    replicas = read_json(paths["demo"])["replicas"]
    replica_seeds = [0, 27]
    queries = [encodings[i] for i in picked] + list(generate(model, seeds=replica_seeds, progress=False))
    targets = [group_of(ids[i]) for i in picked] + [group_of(replicas[str(s)]) for s in replica_seeds]
    groups = [group_of(i) for i in ids]
    print(f"{len(queries)} queries: {[ids[i] for i in picked]} + replicas of seeds {replica_seeds}")
    for direction in args.directions:
        for lr in args.lrs:
            config = AttributionConfig(direction=direction, learning_rate=lr, steps=args.steps)
            start = time.perf_counter()
            ranks = {name: [] for name in AGGREGATIONS}
            for query, target in zip(queries, targets):
                unet, _ = perturbed_copy(model, query, None, config, seed=1)
                after = loss_matrix(
                    model,
                    encodings,
                    None,
                    ids,
                    timesteps=attributor.timesteps,
                    num_draws=1,
                    seed=0,
                    unet=unet,
                    progress=False,
                ).losses
                for name in AGGREGATIONS:
                    order = aggregate(name, baseline=baseline, after=after, direction=direction).argsort(
                        descending=True
                    )
                    ranks[name].append(1 + next(r for r, i in enumerate(order.tolist()) if groups[i] == target))
            print(f"\n{direction} lr={lr:g} steps={args.steps} ({time.perf_counter() - start:.0f}s)")
            for name, values in ranks.items():
                print(f"  {name:9s} top-1 {sum(r == 1 for r in values):2d}/{len(values)}  ranks {values}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
