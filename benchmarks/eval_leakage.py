"""Planted duplicates / leakage: top-1 rate of every method on the bundled toy model.

Protocol: the bundled model was trained on 600 ordinary digits and 4 canaries × 30 identical
copies (assets/toy). Queries:
- replicas: the 6 generated samples that reproduce a canary (demo.json's "replicas": seed → canary);
  the right answer is any copy of that canary;
- training images: 10 training images spread over the sorted ids (2 of them canary copies); the
  right answer is the image itself or an identical copy.
A query scores a hit when its top-1 training image is a right answer (a tie with a wrong one fails).

    python benchmarks/eval_leakage.py                 # default setting, ~6 min (2 cores, 1 thread)
    python benchmarks/eval_leakage.py --sweep core    # + the Forward-INF sweep, ~20 min
    python benchmarks/eval_leakage.py --candidates  # + the default under --candidates M = 0.02N … 0.5N
"""

import argparse
import tempfile

import torch
from protocol import (
    add_candidate_scores,
    all_method_scores,
    default_name,
    sweep_settings,
    write_candidate_table,
    write_tables,
)

from diffattr import Attributor, DiffusionModel
from diffattr.demo import toy_paths
from diffattr.engine import Queries, TrainingSet
from diffattr.metrics import first_relevant_rank, top1_rate
from diffattr.sampling import generate
from diffattr.store import read_json


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="default", choices=["default", "core", "one-at-a-time"])
    parser.add_argument("--no-gradients", action="store_true", help="skip TracIn and D-TRAK")
    parser.add_argument("--candidates", action="store_true", help="also the default under --candidates M (M = f·N)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def group_of(image_id: str) -> str:
    """Identical training images share a group: all copies of a canary, else the image alone."""
    return image_id.split("_")[0] if image_id.startswith("canaries/") else image_id


def main(args):
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(model, paths["train"], run_dir, progress=False)
        encodings, conditions = attributor.encodings()
    ids = attributor.ids
    train = TrainingSet(encodings, conditions, ids)
    replicas = read_json(paths["demo"])["replicas"]
    seeds = sorted(int(s) for s in replicas)
    picked = list(range(0, len(ids), len(ids) // 10))[:10]
    samples = generate(model, seeds=seeds, progress=not args.quiet)
    queries = Queries(
        torch.cat([samples, encodings[picked]]),
        None,
        [f"replica/seed{s}" for s in seeds] + [f"train/{ids[i]}" for i in picked],
    )
    targets = [group_of(replicas[str(s)]) for s in seeds] + [group_of(ids[i]) for i in picked]
    groups = [group_of(i) for i in ids]
    relevant = torch.tensor([[g == target for g in groups] for target in targets])
    kinds = {"replicas": slice(0, len(seeds)), "training images": slice(len(seeds), len(targets))}
    default_losses = {}
    scores, seconds = all_method_scores(
        model,
        train,
        queries,
        settings=sweep_settings(args.sweep),
        gradient_methods=not args.no_gradients,
        progress=not args.quiet,
        default_losses=default_losses,
    )
    recalls = add_candidate_scores(scores, train, queries, default_losses) if args.candidates else None
    rows, payload = {}, {"queries": queries.names, "seconds": seconds, "methods": {}, "default": default_name()}
    for name, matrix in scores.items():
        entry = {kind: top1_rate(matrix[rows_of], relevant[rows_of]) for kind, rows_of in kinds.items()}
        entry["ranks"] = first_relevant_rank(matrix, relevant).tolist()
        payload["methods"][name] = entry
        hits = [f"{round(entry[k] * (s.stop - s.start))}/{s.stop - s.start}" for k, s in kinds.items()]
        rows[name] = [name, *hits, " ".join(map(str, entry["ranks"]))]
    header = ["method", "top-1 replicas", "top-1 training images", "rank of the right image per query"]
    write_tables("leakage", payload, header, rows, swept=args.sweep != "default")
    if recalls:
        write_candidate_table("leakage", header, rows, recalls)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
