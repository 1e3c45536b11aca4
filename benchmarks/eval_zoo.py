"""Planted duplicates on every model of the zoo, and the Forward-INF setting chosen leave-one-model-out.

Protocol, per model of ``benchmarks/zoo.py`` (digits, mnist, faces):
- training images: 16 spread over the sorted ids (canary copies among them), each its own query;
  the right answer is the image itself or an identical copy;
- replicas: of 64 generated samples (seeds 0-63; a class-conditional model draws each canary's
  label in turn), those whose nearest training image is a canary copy at a mean squared pixel
  distance below 0.05, at most 8; the right answer is any copy of that canary.
A query scores a hit when its top-1 training image is a right answer (a tie with a wrong one fails).
A model's score of a method is the mean of its two top-1 rates.

Forward-INF settings: the default, descent at lr 1e-3 (the setting that ranked all five queries of
an unseen model first), perturbation by effect (``--target-change``: ascent until the query's loss
is 2x and 5x, lr 1e-5; descent until it halves, lr 3e-5; at most 50 steps), and MUCS's recipe
capped at 50 steps (``forward-inf[mucs (≤ 50 steps)|ratio]`` is its own score), and AbU's (the
default's ascent with an EWC penalty, ``--ewc-weight`` 1 and 100; its own score is ``loss``), each
under every aggregation.

Leave one model out: for each model, the Forward-INF setting with the best mean score over the
*other* models is chosen, and its score on the held-out model is reported beside pixel ℓ2, TracIn
and D-TRAK (fixed λ = 0.01, and the best λ of that model: an oracle).

    python benchmarks/eval_zoo.py                      # ~60 min on 2 cores, + ~20 min to build the zoo once
    python benchmarks/eval_zoo.py --models digits,faces --no-gradients
"""

import argparse
import json
import tempfile

import torch
import zoo
from protocol import ZOO_SETTINGS, Setting, all_method_scores, leave_one_out, markdown_table, write_results

from diffattr import Attributor, DiffusionModel
from diffattr.engine import Queries, TrainingSet
from diffattr.metrics import first_relevant_rank
from diffattr.sampling import generate

REPLICA_DISTANCE = 0.05
SAMPLES, MAX_REPLICAS, TRAINING_QUERIES = 64, 8, 16
QUERIES = [SAMPLES, MAX_REPLICAS, TRAINING_QUERIES, REPLICA_DISTANCE]
FIXED_DAMPING = "dtrak[λ=0.01]"
SETTINGS = ZOO_SETTINGS


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.RECIPES), help="comma-separated zoo models")
    parser.add_argument("--no-gradients", action="store_true", help="skip TracIn and D-TRAK")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse each setting's results saved by an earlier run",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def group_of(image_id: str) -> str:
    """Identical training images share a group: all copies of a canary, else the image alone."""
    return image_id.split("_")[0] if image_id.startswith("canaries/") else image_id


def find_replicas(model, encodings, conditions, ids, *, progress):
    """Generated samples that replicate a canary: ``(samples, labels or None, canary groups, seeds)``."""
    canaries = sorted({group_of(i) for i in ids if i.startswith("canaries/")})
    labels = None
    if conditions is not None:  # one canary's label per seed, in turn
        label_of = {group_of(i): int(conditions[row]) for row, i in enumerate(ids) if i.startswith("canaries/")}
        labels = [label_of[canaries[s % len(canaries)]] for s in range(SAMPLES)]
    samples = generate(model, seeds=list(range(SAMPLES)), labels=labels, progress=progress)
    distances = torch.cdist(samples.flatten(1), encodings.flatten(1)).pow(2) / samples[0].numel()
    nearest = distances.min(1)
    kept = [
        s
        for s in range(SAMPLES)
        if ids[nearest.indices[s]].startswith("canaries/") and nearest.values[s] < REPLICA_DISTANCE
    ][:MAX_REPLICAS]
    chosen_labels = None if labels is None else torch.tensor([labels[s] for s in kept])
    return samples[kept], chosen_labels, [group_of(ids[nearest.indices[s]]) for s in kept], kept


def evaluate(member: zoo.Member, args, settings: list[Setting], gradient_methods: bool) -> dict:
    """The top-1 rates of the given settings (and of pixel ℓ2, and with ``gradient_methods`` TracIn
    and D-TRAK) on the member's replicas and training images."""
    model = DiffusionModel.from_pretrained(member.model, device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(model, member.train, run_dir, progress=False)
        encodings, conditions = attributor.encodings()
    ids = attributor.ids
    samples, sample_labels, sample_groups, seeds = find_replicas(
        model, encodings, conditions, ids, progress=not args.quiet
    )
    picked = torch.linspace(0, len(ids) - 1, TRAINING_QUERIES).round().long().tolist()
    query_conditions = None
    if conditions is not None:
        query_conditions = torch.cat([sample_labels.to(conditions.dtype), conditions[picked]])
    queries = Queries(
        torch.cat([samples, encodings[picked]]),
        query_conditions,
        [f"replica/seed{s}" for s in seeds] + [f"train/{ids[i]}" for i in picked],
    )
    targets = sample_groups + [group_of(ids[i]) for i in picked]
    groups = [group_of(i) for i in ids]
    relevant = torch.tensor([[g == target for g in groups] for target in targets])
    kinds = {"replicas": slice(0, len(seeds)), "training images": slice(len(seeds), len(targets))}
    scores, seconds = all_method_scores(
        model,
        TrainingSet(encodings, conditions, ids),
        queries,
        settings=settings,
        gradient_methods=gradient_methods,
        progress=not args.quiet,
    )
    methods = {}
    for name, matrix in scores.items():
        ranks = first_relevant_rank(matrix, relevant)
        entry = {
            kind: (ranks[rows] == 1).float().mean().item() if len(ranks[rows]) else None for kind, rows in kinds.items()
        }
        rates = [rate for rate in entry.values() if rate is not None]
        entry["score"] = sum(rates) / len(rates)
        entry["ranks"] = ranks.tolist()
        methods[name] = entry
    return {
        "replicas": len(seeds),
        "training images": len(picked),
        "seconds": seconds,
        "methods": methods,
    }


def _same_queries(saved: dict | None, made_by: dict) -> bool:
    # Files of the first version name no queries: they were made with the same ones.
    return saved is not None and saved.get("recipe") == made_by["recipe"] and saved.get("queries", QUERIES) == QUERIES


def _merged(reused: dict | None, member: zoo.Member, args) -> dict:
    """The member's results for SETTINGS (+ gradient methods): reused where saved, run where not."""
    methods = reused["methods"] if reused else {}
    missing = [s for s in SETTINGS if not any(m.startswith(f"forward-inf[{s.name()}|") for m in methods)]
    gradients = not args.no_gradients and "tracin" not in methods
    if reused and not missing and not gradients:
        result = reused
    else:
        result = evaluate(member, args, missing, gradients)
        if reused:
            assert result["replicas"] == reused["replicas"], "the same model and seeds found other replicas"
            result["methods"] = {**reused["methods"], **result["methods"]}
            # Forward-INF's seconds add up over the runs that computed its settings.
            spent = result["seconds"].get("forward-inf", 0.0) + reused["seconds"].get("forward-inf", 0.0)
            result["seconds"] = {**reused["seconds"], **result["seconds"], "forward-inf": spent}
    wanted = {f"forward-inf[{s.name()}|" for s in SETTINGS}
    result["methods"] = {
        n: e for n, e in result["methods"].items() if not n.startswith("forward-inf[") or n.startswith(tuple(wanted))
    }
    return result


def choose_held_out(results: dict[str, dict]) -> dict[str, dict]:
    """Per held-out model: the Forward-INF setting best on the others, and its held-out score."""
    names = [n for n in next(iter(results.values()))["methods"] if n.startswith("forward-inf[")]
    scores = {model: {n: e["score"] for n, e in result["methods"].items()} for model, result in results.items()}
    folds = {}
    for held_out, (chosen, on_others) in leave_one_out(scores, names).items():
        held = results[held_out]["methods"]
        dtrak = {n: e["score"] for n, e in held.items() if n.startswith("dtrak[")}
        folds[held_out] = {
            "chosen": chosen,
            "score on the others": on_others,
            "held-out score": held[chosen]["score"],
            "pixel": held["pixel"]["score"],
            "tracin": held.get("tracin", {}).get("score"),
            FIXED_DAMPING: dtrak.get(FIXED_DAMPING),
            "dtrak (best λ, oracle)": max(dtrak.values()) if dtrak else None,
        }
    return folds


def main(args):
    results = {}
    for name in args.models.split(","):
        member = zoo.prepare(name, quiet=args.quiet)
        # Per model, so a failure later loses nothing; a setting's scores are reused only for the
        # same recipe and queries, and only the settings (and gradient methods) missing are run.
        saved = zoo.WORK / f"eval-{name}.json"
        made_by = json.loads(json.dumps({"recipe": zoo.RECIPES[name], "queries": QUERIES}))  # tuples read back as lists
        previous = json.loads(saved.read_text()) if args.reuse and saved.is_file() else {}
        reused = previous["result"] if _same_queries(previous.get("made_by"), made_by) else None
        results[name] = _merged(reused, member, args)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"made_by": made_by, "result": results[name]}) + "\n")
        print(f"{name}: {results[name]['replicas']} replicas found", flush=True)
    models = list(results)
    header = ["method", *[f"{m} (replicas / training images)" for m in models]]

    def cell(model, name):
        entry = results[model]["methods"].get(name)
        if entry is None:
            return "—"
        counts = [results[model]["replicas"], results[model]["training images"]]
        hits = [
            "—" if rate is None else f"{round(rate * count)}/{count}"
            for rate, count in zip((entry["replicas"], entry["training images"]), counts)
        ]
        return " / ".join(hits)

    method_names = list(next(iter(results.values()))["methods"])
    per_model = markdown_table(header, [[name, *[cell(m, name) for m in models]] for name in method_names])
    folds = choose_held_out(results) if len(models) > 1 else {}
    fold_header = ["held-out model", "chosen on the others", "its score there", "held-out score", "pixel", "tracin"]
    fold_header += [FIXED_DAMPING, "dtrak (best λ, oracle)"]
    fold_rows = [
        [
            model,
            fold["chosen"],
            fold["score on the others"],
            fold["held-out score"],
            fold["pixel"],
            "—" if fold["tracin"] is None else fold["tracin"],
            "—" if fold[FIXED_DAMPING] is None else fold[FIXED_DAMPING],
            "—" if fold["dtrak (best λ, oracle)"] is None else fold["dtrak (best λ, oracle)"],
        ]
        for model, fold in folds.items()
    ]
    markdown = per_model
    if folds:
        markdown += "\n\nLeave one model out (score: mean of the two top-1 rates):\n\n"
        markdown += markdown_table(fold_header, fold_rows)
    write_results("zoo", {"models": results, "folds": folds}, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
