"""Writes the ground truth of the memorization audit: digits with canaries at several duplication levels.

From scikit-learn's bundled 8x8 digits, upscaled to 16x16 (``make_toy_data.py``'s writer):
- ``train/digits/<index>.png``: ordinary digits, once each; ``--flip`` of them carry a wrong label
  in ``metadata.jsonl`` (the mislabeled ground truth);
- ``train/canaries/dup<L>/c<j>/<copy>.png``: ``--canaries-per-level`` digits duplicated L times,
  for each L in ``--levels``;
- ``heldout/``: digits the model never sees (non-members);
- ``leakage/``: a test set of the held-out digits plus planted copies of training images, half exact,
  half with light pixel noise, under neutral names;
- ``truth.json``: copies and duplicate group of every training image, flipped labels, and the source
  of every planted test image.

    python scripts/make_audit_data.py --out runs/audit-data
"""

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def _script(name: str):
    """Imports a sibling script (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toy_data = _script("make_toy_data")
DIGIT_CAPTIONS = [f"a handwritten digit {word}" for word in _toy_data.WORDS]


def write_folder(root: Path, entries: list[tuple[str, np.ndarray, int]]) -> None:
    """Writes digits given on scikit-learn's 0-16 scale (noise added on that scale is clipped)."""
    as_bytes = [(name, np.clip(pixels * 16, 0, 255).astype(np.uint8), label) for name, pixels, label in entries]
    _toy_data.write_folder(root, as_bytes, DIGIT_CAPTIONS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/, heldout/, leakage/ into")
    parser.add_argument("--per-class", type=int, default=60, help="ordinary training digits per class")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 5, 20, 100], help="copies per canary")
    parser.add_argument("--canaries-per-level", type=int, default=3)
    parser.add_argument("--heldout-per-class", type=int, default=10)
    parser.add_argument("--planted", type=int, default=20, help="copies of training images in the leakage set")
    parser.add_argument("--flip", type=float, default=0.05, help="fraction of ordinary digits with a wrong label")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(
    out: Path,
    *,
    per_class: int,
    levels: list[int],
    canaries_per_level: int,
    heldout_per_class: int,
    planted: int,
    flip: float,
    seed: int,
) -> dict:
    """Writes the folders and returns the ground truth (also saved as ``truth.json``)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    by_class = {label: [i for i in order if digits.target[i] == label] for label in range(10)}
    ordinary = [i for label in range(10) for i in by_class[label][:per_class]]
    heldout = [i for label in range(10) for i in by_class[label][per_class : per_class + heldout_per_class]]
    used = set(ordinary) | set(heldout)
    sources = [i for i in order if i not in used][: len(levels) * canaries_per_level]
    if len(sources) < len(levels) * canaries_per_level:
        raise SystemExit("not enough digits for these settings: lower --per-class or --canaries-per-level")

    train, copies, group = [], {}, {}
    flipped = {}
    flip_indices = set(rng.choice(len(ordinary), size=round(flip * len(ordinary)), replace=False).tolist())
    for position, i in enumerate(ordinary):
        image_id, label = f"digits/{i:04d}.png", int(digits.target[i])
        if position in flip_indices:
            flipped[image_id] = label
            label = int((label + rng.integers(1, 10)) % 10)
        train.append((image_id, digits.images[i], label))
        copies[image_id], group[image_id] = 1, image_id
    for level_index, level in enumerate(levels):
        for j in range(canaries_per_level):
            i = sources[level_index * canaries_per_level + j]
            name = f"dup{level}/c{j}"
            for c in range(level):
                image_id = f"canaries/{name}/{c:03d}.png"
                train.append((image_id, digits.images[i], int(digits.target[i])))
                copies[image_id], group[image_id] = level, name

    # Leakage: held-out digits (genuine non-members) and planted copies of distinct training images.
    distinct = sorted({group[image_id]: image_id for image_id in group}.values())
    picked = rng.choice(len(distinct), size=planted, replace=False)
    pixels = {image_id: image for image_id, image, _ in train}
    labels = {image_id: label for image_id, _, label in train}
    tests = [(None, "heldout", digits.images[i], int(digits.target[i])) for i in heldout]
    for n, p in enumerate(picked.tolist()):
        source = distinct[p]
        image = pixels[source]
        kind = "exact" if n % 2 == 0 else "noisy"
        if kind == "noisy":
            image = image + rng.normal(0.0, 0.3, image.shape)
        tests.append((source, kind, image, labels[source]))
    shuffled = rng.permutation(len(tests)).tolist()
    leakage_entries, leakage_truth = [], {}
    for position, t in enumerate(shuffled):
        source, kind, image, label = tests[t]
        test_id = f"img{position:04d}.png"
        leakage_entries.append((test_id, image, label))
        leakage_truth[test_id] = {"source": source, "kind": kind}

    for name in ("train", "heldout", "leakage"):
        shutil.rmtree(out / name, ignore_errors=True)
    write_folder(out / "train", train)
    write_folder(out / "heldout", [(f"{i:04d}.png", digits.images[i], int(digits.target[i])) for i in heldout])
    write_folder(out / "leakage", leakage_entries)
    truth = {"levels": levels, "copies": copies, "group": group, "flipped": flipped, "leakage": leakage_truth}
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def main(args):
    truth = build(
        args.out,
        per_class=args.per_class,
        levels=args.levels,
        canaries_per_level=args.canaries_per_level,
        heldout_per_class=args.heldout_per_class,
        planted=args.planted,
        flip=args.flip,
        seed=args.seed,
    )
    print(
        f"wrote {len(truth['copies'])} training images (canaries at {args.levels} copies, "
        f"{len(truth['flipped'])} flipped labels) and {len(truth['leakage'])} leakage test images under {args.out}"
    )


if __name__ == "__main__":
    main(parse_args())
