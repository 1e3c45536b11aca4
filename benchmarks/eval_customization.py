"""Customization (Wang et al. 2023, the protocol of the Forward-INF paper): Recall@10 and mAP.

Protocol (toy scale, CPU):
- base model: the bundled toy model (16x16 digits);
- 4 new concepts the base model never saw, each a set of 4 exemplars: held-out digits rendered
  inverted (white background), inside a frame, over horizontal stripes, or over a checkerboard;
- per concept: a copy of the base model fine-tuned on its 4 exemplars (150 steps, batch 16,
  lr 3e-4), then 2 samples generated from it (the queries);
- attribution with the fine-tuned model over training ∪ all 16 exemplars (736 images): the
  concept's own 4 exemplars are the right answers; Recall@10 and mAP, mean over the 8 queries.

On the zoo (``--world``, the worlds of ``eval_lds.py``: their full 8x8 model is the base, their 100
training images the training set, their held-out images the exemplars, each concept's exemplars of
mixed classes; a class-conditional world fine-tunes and generates with the exemplars' labels), with
the zoo's settings and 4 samples per concept; ``--summary`` sets the worlds side by side, one held
out (the Forward-INF setting chosen on the others by mAP).

    python benchmarks/eval_customization.py                # default setting, ~12 min (2 cores, 1 thread)
    python benchmarks/eval_customization.py --sweep core   # + the Forward-INF sweep, ~25 min
    python benchmarks/eval_customization.py --candidates  # + the default under --candidates M = 0.02N … 0.5N
    # the zoo (each world's models come from eval_lds.py, trained here if missing), 15-20 min a world
    python benchmarks/eval_customization.py --world digits --sweep zoo --samples 4
    python benchmarks/eval_customization.py --world faces --sweep zoo --samples 4
    python benchmarks/eval_customization.py --world mnist --sweep zoo --samples 4
    python benchmarks/eval_customization.py --summary
"""

import argparse
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import eval_lds
import torch
from protocol import (
    ZOO_LDS_SETTINGS,
    add_candidate_scores,
    all_method_scores,
    default_name,
    fold_table,
    held_out_folds,
    markdown_table,
    mean_candidate_stats,
    retrieval_metrics,
    sweep_settings,
    world_results,
    write_candidate_table,
    write_results,
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
    parser.add_argument(
        "--world", choices=list(eval_lds.WORLDS), help="a world of eval_lds.py instead of the bundled model"
    )
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/lds"), help="eval_lds.py's models")
    parser.add_argument("--sweep", default="default", choices=["default", "core", "one-at-a-time", "zoo"])
    parser.add_argument("--summary", action="store_true", help="only the worlds' tables side by side, one held out")
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


@dataclass(frozen=True)
class Setup:
    """What a customization run starts from: a base model, its training set and the exemplars."""

    base: DiffusionModel
    train: TrainingSet  # the base's training images ∪ every exemplar
    owners: list[str | None]  # per training row: the concept of an exemplar, None for the base's images
    exemplars: torch.Tensor
    exemplar_labels: torch.Tensor | None  # a class-conditional base's labels of the exemplars


def bundled_setup(args) -> Setup:
    paths = toy_paths()
    base = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(base, paths["train"], run_dir, progress=False)
        encodings, _ = attributor.encodings()
    exemplars, exemplar_ids, owner = concept_exemplars(args.exemplars)
    train = TrainingSet(torch.cat([encodings, exemplars]), None, attributor.ids + exemplar_ids)
    return Setup(base, train, [None] * len(attributor.ids) + owner, exemplars, None)


def world_setup(args) -> Setup:
    """An LDS world's full model and training images; exemplars from its held-out images, concept
    ``c`` taking held-out images ``c, c + 4, …`` (the held-out classes come in turn: mixed classes)."""
    world = eval_lds.WORLDS[args.world]
    data = eval_lds.load_world(world, len(CONCEPTS) * args.exemplars)
    labels = data.labels if world.conditional else None
    base = eval_lds.full_model(args.world, args.work, data)
    images, ids, owner, exemplar_labels = [], [], [], []
    for c, (concept, render) in enumerate(CONCEPTS.items()):
        for j in range(args.exemplars):
            q = c + len(CONCEPTS) * j
            images.append(render(data.heldout_images[q]))
            ids.append(f"exemplars/{concept}/{data.heldout_names[q].removeprefix('heldout/')}")
            owner.append(concept)
            exemplar_labels.append(int(data.heldout_labels[q]))
    exemplars = torch.stack(images)
    exemplar_labels = torch.tensor(exemplar_labels) if world.conditional else None
    conditions = None if labels is None else torch.cat([labels, exemplar_labels])
    train = TrainingSet(torch.cat([data.images, exemplars]), conditions, data.ids + ids)
    return Setup(base, train, [None] * len(data.ids) + owner, exemplars, exemplar_labels)


def main(args):
    if args.summary:
        return write_summary()
    setup = world_setup(args) if args.world else bundled_setup(args)
    base, owner = setup.base, setup.owners
    per_concept = {}
    for c, concept in enumerate(CONCEPTS):
        mine = torch.tensor([o == concept for o in owner if o is not None])
        labels = None if setup.exemplar_labels is None else setup.exemplar_labels[mine]
        unet = copy.deepcopy(base.network).requires_grad_(True)
        train_denoiser(
            base,
            setup.exemplars[mine],
            network=unet,
            labels=labels,
            steps=args.finetune_steps,
            batch_size=16,
            learning_rate=3e-4,
            seed=c,
            progress=not args.quiet,
            description=f"fine-tuning on {concept}",
        )
        model = base.with_network(unet.requires_grad_(False).eval(), source=f"custom-{concept}", fingerprint=concept)
        seeds = list(range(100 * c, 100 * c + args.samples))
        # A class-conditional model draws the concept with its exemplars' labels in turn.
        sample_labels = None if labels is None else [int(labels[i % len(labels)]) for i in range(args.samples)]
        samples = generate(model, seeds=seeds, labels=sample_labels, progress=not args.quiet)
        queries = Queries(
            samples,
            None if sample_labels is None else torch.tensor(sample_labels),
            [f"{concept}/seed{s}" for s in seeds],
        )
        default_losses = {}
        scores, seconds = all_method_scores(
            model,
            setup.train,
            queries,
            settings=ZOO_LDS_SETTINGS if args.sweep == "zoo" else sweep_settings(args.sweep),
            gradient_methods=not args.no_gradients,
            progress=not args.quiet,
            default_losses=default_losses,
        )
        relevant = torch.tensor([[o == concept for o in owner]] * args.samples)
        per_concept[concept] = {"scores": scores, "relevant": relevant, "seconds": seconds}
        if args.candidates:
            per_concept[concept]["candidates"] = add_candidate_scores(scores, setup.train, queries, default_losses)
    methods, rows = retrieval_metrics(per_concept, list(per_concept[next(iter(CONCEPTS))]["scores"]))
    payload = {"concepts": list(CONCEPTS), "methods": methods, "default": default_name()}
    payload["seconds"] = {c: v["seconds"] for c, v in per_concept.items()}
    header = ["method", "Recall@10", "mAP"]
    if args.world:  # the zoo's tables stand apart: another base, training set and query count
        payload |= {"world": args.world, "samples": args.samples, "train_images": len(setup.train.ids)}
        write_results(f"customization_zoo_{args.world}", payload, markdown_table(header, list(rows.values())))
        return
    write_tables("customization", payload, header, rows, swept=args.sweep != "default")
    if args.candidates:  # every concept has the same number of queries: the mean of the means
        stats = mean_candidate_stats([c["candidates"] for c in per_concept.values()])
        write_candidate_table("customization", header, rows, stats)


def write_summary() -> None:
    """``customization_zoo``: Recall@10 / mAP of every method on each world, and the worlds held
    out in turn, the Forward-INF setting chosen on the others by mAP."""
    results, names = world_results("customization_zoo", eval_lds.WORLDS)
    worlds = list(results)

    def cell(world, method):
        entry = results[world]["methods"][method]
        return f"{entry['recall@10']:.3f} / {entry['mAP']:.3f}"

    header = ["method", *[f"{w} (Recall@10 / mAP)" for w in worlds]]
    markdown = markdown_table(header, [[n, *[cell(w, n) for w in worlds]] for n in names])
    folds = held_out_folds({w: {n: results[w]["methods"][n]["mAP"] for n in names} for w in worlds})
    markdown += "\n\nLeave one world out (mAP ×100):\n\n" + fold_table(folds, 100)
    write_results("customization_zoo", {"worlds": worlds, "folds": folds}, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
