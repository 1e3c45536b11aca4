"""Chooses the demo's generation seeds: one sample that replicates a planted canary, and ordinary ones.

Generates ``--candidates`` samples from the toy model, finds each one's nearest training image in
pixel ℓ2, and calls a sample a replica of a canary when its nearest training image is a canary and
it is at least twice as close to it as to any training image that is not a copy of that canary.
Writes ``demo.json`` beside the model: ``{"seeds": [...], "replicas": {"<seed>": "<canary id>"}}``.

    python scripts/pick_demo_seeds.py --toy assets/toy
"""

import argparse
import json
from pathlib import Path

import torch

from diffattr import DiffusionModel, ImageFolder
from diffattr.data import load_image
from diffattr.sampling import generate


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", type=Path, required=True)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--ordinary", type=int, default=2, help="non-replica samples in the demo")
    return parser.parse_args()


def canary_of(image_id: str) -> str | None:
    """``canaries/canary2_copy07.png`` → ``canary2``; ordinary images → None."""
    return image_id.split("/")[1].split("_")[0] if image_id.startswith("canaries/") else None


def main(args):
    model = DiffusionModel.from_pretrained(args.toy / "model", device="cpu")
    folder = ImageFolder(args.toy / "train")
    train = torch.stack([load_image(r.path, resolution=16, channels=1) for r in folder.records]).flatten(1)
    seeds = list(range(args.candidates))
    samples = generate(model, seeds=seeds).flatten(1)
    distances = torch.cdist(samples, train)
    replicas, ordinary = {}, []
    for seed, row in zip(seeds, distances):
        nearest = row.argmin().item()
        group = canary_of(folder.ids[nearest])
        others = torch.tensor([canary_of(i) != group or group is None for i in folder.ids])
        others[nearest] = False
        if group is not None and row[nearest] * 2 < row[others].min():
            replicas[str(seed)] = folder.ids[nearest]
        elif group is None:
            ordinary.append(seed)
    print(f"{len(replicas)} of {len(seeds)} samples replicate a canary: {replicas}")
    if not replicas:
        raise SystemExit("no canary replica among the candidates; raise --candidates")
    first_replica = int(next(iter(replicas)))
    demo = {"seeds": [first_replica, *ordinary[: args.ordinary]], "replicas": replicas}
    (args.toy / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
    print(f"wrote {args.toy / 'demo.json'}: seeds {demo['seeds']}")


if __name__ == "__main__":
    main(parse_args())
