"""Writes the toy training set shipped with diffattr: real handwritten digits as an image folder.

From scikit-learn's bundled 8x8 digits (no download), upscaled to 16x16 grayscale PNGs:
- ``train/digits/<label>/<index>.png``: a class-balanced sample of ordinary digits;
- ``train/canaries/canary<j>_copy<c>.png``: a few digits duplicated many times — planted
  memorization canaries the model will reproduce;
- ``train/metadata.jsonl``: ``file_name``, ``label`` and a caption ``text`` for every image;
- ``heldout/``: digits the model never sees (non-members, for audits and held-out queries).

    python scripts/make_toy_data.py --out assets/toy
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/ and heldout/ into")
    parser.add_argument("--per-class", type=int, default=60, help="ordinary training digits per class")
    parser.add_argument("--canaries", type=int, default=4, help="number of planted canaries")
    parser.add_argument("--copies", type=int, default=30, help="copies of each canary")
    parser.add_argument("--heldout-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def to_png(pixels_8x8: np.ndarray, path: Path) -> None:
    image = Image.fromarray(np.clip(pixels_8x8 * 16, 0, 255).astype(np.uint8), mode="L")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((16, 16), Image.Resampling.BICUBIC).save(path)


def write_folder(root: Path, entries: list[tuple[str, np.ndarray, int]]) -> None:
    rows = []
    for file_name, pixels, label in entries:
        to_png(pixels, root / file_name)
        rows.append({"file_name": file_name, "label": label, "text": f"a handwritten digit {WORDS[label]}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(args):
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(digits.target))
    by_class = {label: [i for i in order if digits.target[i] == label] for label in range(10)}
    train, heldout = [], []
    for label, indices in by_class.items():
        for i in indices[: args.per_class]:
            train.append((f"digits/{label}/{i:04d}.png", digits.images[i], label))
        for i in indices[args.per_class : args.per_class + args.heldout_per_class]:
            heldout.append((f"{label}/{i:04d}.png", digits.images[i], label))
    used = {i for label in range(10) for i in by_class[label][: args.per_class + args.heldout_per_class]}
    canary_indices = [i for i in order if i not in used][: args.canaries]
    for j, i in enumerate(canary_indices):
        for c in range(args.copies):
            train.append((f"canaries/canary{j}_copy{c:02d}.png", digits.images[i], int(digits.target[i])))
    for name in ("train", "heldout"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    write_folder(args.out / "train", train)
    write_folder(args.out / "heldout", heldout)
    print(
        f"wrote {len(train)} training images ({args.canaries} canaries x {args.copies} copies) "
        f"and {len(heldout)} held-out images under {args.out}"
    )


if __name__ == "__main__":
    main(parse_args())
