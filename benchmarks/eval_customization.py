"""Customization (Wang et al. 2023, the protocol of the Forward-INF paper): Recall@10 and mAP.

Protocol (toy scale, CPU):
- base model: the bundled toy model (16x16 digits);
- 4 new concepts the base model never saw, each a set of 4 exemplars: held-out digits rendered
  inverted (white background), inside a frame, over horizontal stripes, or over a checkerboard;
- per concept: a copy of the base model fine-tuned on its 4 exemplars (150 steps, batch 16,
  lr 3e-4), then 2 samples generated from it (the queries);
- attribution with the fine-tuned model over training ∪ all 16 exemplars (736 images): the
  concept's own 4 exemplars are the right answers; Recall@10 and mAP, mean over the 8 queries.

    python benchmarks/eval_customization.py                # default setting, ~12 min (2 cores, 1 thread)
    python benchmarks/eval_customization.py --sweep core   # + the Forward-INF sweep, ~25 min
    python benchmarks/eval_customization.py --candidates  # + the default under --candidates M = 0.02N … 0.5N
"""

import argparse
import copy
import tempfile

import torch
from protocol import (
    add_candidate_scores,
    all_method_scores,
    default_name,
    mean_candidate_stats,
    retrieval_metrics,
    sweep_settings,
    write_candidate_table,
    write_tables,
)

from diffattr import Attributor, DiffusionModel
from diffattr.data import ImageFolder, load_image
from diffattr.demo import toy_paths
from diffattr.engine import Queries, TrainingSet
from diffattr.sampling import generate
from diffattr.training import train_denoiser


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="default", choices=["default", "core", "one-at-a-time"])
    parser.add_argument("--exemplars", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="generated queries per concept")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--no-gradients", action="store_true", help="skip TracIn and D-TRAK")
    parser.add_argument("--candidates", action="store_true", help="also the default under --candidates M (M = f·N)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def _stripes(x: torch.Tensor) -> torch.Tensor:
    lines = torch.zeros_like(x)
    lines[..., ::3, :] = 1.2
    return torch.maximum(x, lines - 1)


def _checker(x: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
    squares = ((rows // 2 + cols // 2) % 2).float()
    return torch.maximum(x, squares * 0.8 - 1)


def _frame(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., [0, -1], :] = 1
    x[..., :, [0, -1]] = 1
    return x


CONCEPTS = {"inverted": lambda x: -x, "framed": _frame, "striped": _stripes, "checker": _checker}


def concept_exemplars(count: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """``count`` held-out digits per concept, rendered in it: ``(len(CONCEPTS)·count, 1, 16, 16)`` images in
    [-1, 1], their ids (``exemplars/<concept>/<held-out id>``) and their concepts."""
    heldout = ImageFolder(toy_paths()["heldout"]).records
    images, ids, owner = [], [], []
    for c, (concept, render) in enumerate(CONCEPTS.items()):
        for j in range(count):
            record = heldout[(c * count + j) * 3 % len(heldout)]
            images.append(render(load_image(record.path, resolution=16, channels=1)))
            ids.append(f"exemplars/{concept}/{record.id}")
            owner.append(concept)
    return torch.stack(images), ids, owner


def main(args):
    paths = toy_paths()
    base = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(base, paths["train"], run_dir, progress=False)
        encodings, _ = attributor.encodings()
    exemplars, exemplar_ids, owner = concept_exemplars(args.exemplars)
    train = TrainingSet(torch.cat([encodings, exemplars]), None, attributor.ids + exemplar_ids)
    owners = [None] * len(attributor.ids) + owner
    per_concept = {}
    for c, concept in enumerate(CONCEPTS):
        mine = torch.tensor([o == concept for o in owner])
        unet = copy.deepcopy(base.network).requires_grad_(True)
        train_denoiser(
            base,
            exemplars[mine],
            network=unet,
            steps=args.finetune_steps,
            batch_size=16,
            learning_rate=3e-4,
            seed=c,
            progress=not args.quiet,
            description=f"fine-tuning on {concept}",
        )
        model = base.with_network(unet.requires_grad_(False).eval(), source=f"custom-{concept}", fingerprint=concept)
        seeds = list(range(100 * c, 100 * c + args.samples))
        samples = generate(model, seeds=seeds, progress=not args.quiet)
        queries = Queries(samples, None, [f"{concept}/seed{s}" for s in seeds])
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
        relevant = torch.tensor([[o == concept for o in owners]] * args.samples)
        per_concept[concept] = {"scores": scores, "relevant": relevant, "seconds": seconds}
        if args.candidates:
            per_concept[concept]["candidates"] = add_candidate_scores(scores, train, queries, default_losses)
    methods, rows = retrieval_metrics(per_concept, list(per_concept[next(iter(CONCEPTS))]["scores"]))
    payload = {"concepts": list(CONCEPTS), "methods": methods, "default": default_name()}
    payload["seconds"] = {c: v["seconds"] for c, v in per_concept.items()}
    header = ["method", "Recall@10", "mAP"]
    write_tables("customization", payload, header, rows, swept=args.sweep != "default")
    if args.candidates:  # every concept has the same number of queries: the mean of the means
        stats = mean_candidate_stats([c["candidates"] for c in per_concept.values()])
        write_candidate_table("customization", header, rows, stats)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
