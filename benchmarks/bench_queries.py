"""Many queries, one pass: Forward-INF's cost per query when Q perturbed copies share the pass over
the training set (``Engine.respond_many``; ``--queries-per-pass``) against one pass per query.

Measured in this one run on the same queries (held-out digits) and model: one pass per query
(``queries_per_pass = 1``) on the first 8 queries — the per-query cost of that mode does not depend
on Q — and one shared pass of Q copies for Q = 1, 8, 32 (no effect on the numbers: checked here
too). Prints seconds per query split into perturbation and scoring, and the speed-up.

    python benchmarks/bench_queries.py            # bundled toy model, 720 training images
"""

import argparse

import torch
from protocol import markdown_table, toy_world, write_results

from diffattr import AttributionConfig
from diffattr.config import ScoringConfig
from diffattr.data import load_image
from diffattr.engine import Engine
from diffattr.noise import ScoringGrid


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32], help="Q: copies per shared pass")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def timed(engine: Engine, items: list, config: AttributionConfig, per_pass: int) -> tuple[list, float, float]:
    """Responses, perturbation seconds and scoring seconds (totals) for ``items``, ``per_pass`` at a time."""
    responses, perturb, score = [], 0.0, 0.0
    for start in range(0, len(items), per_pass):
        group = engine.respond_many(items[start : start + per_pass], config)
        perturb += sum(r.timings["perturb_seconds"] for r in group)
        score += sum(r.timings["score_seconds"] for r in group)
        responses += group
    return responses, perturb, score


def main(args):
    model, train, records = toy_world(args.device)
    grid = ScoringGrid.of(model.num_train_timesteps, ScoringConfig())
    engine = Engine(model, train, grid)
    largest = max(args.sizes)
    images = [load_image(r.path, resolution=model.resolution, channels=model.channels) for r in records[:largest]]
    items = [(image.to(model.device), None, f"perturb:{r.id}") for image, r in zip(images, records)]
    config = AttributionConfig(aggregation="loss")  # the default perturbation; the calibration is not timed
    alone, perturb, score = timed(engine, items[:8], config, 1)
    per_query = {"perturb": perturb / len(alone), "score": score / len(alone)}
    table = [["one pass per query", "any", f"{per_query['perturb']:.2f}", f"{per_query['score']:.2f}", "1.00"]]
    payload = {"one_pass_per_query": per_query, "shared": {}}
    for size in args.sizes:
        shared, perturb, score = timed(engine, items[:size], config, size)
        for a, b in zip(alone, shared):
            assert torch.equal(a.after.losses, b.after.losses), "a shared pass changed the numbers"
        entry = {"perturb": perturb / size, "score": score / size}
        speedup = sum(per_query.values()) / sum(entry.values())
        payload["shared"][str(size)] = {**entry, "speedup": speedup}
        table.append(
            ["one shared pass", str(size), f"{entry['perturb']:.2f}", f"{entry['score']:.2f}", f"{speedup:.2f}"]
        )
    header = ["mode", "Q", "perturb s/query", "score s/query", "speed-up per query"]
    write_results("queries", payload, markdown_table(header, table))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
