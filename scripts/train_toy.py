"""Trains a tiny pixel-space DDPM on an image folder, and saves it as a pipeline folder.

Defaults: the bundled demo model, a ~690k-parameter UNet2DModel on 16x16 grayscale digits (cosine
schedule, epsilon prediction), unconditional, or class-conditional with ``--class-conditional``
(labels from metadata.jsonl). ``--widths``, ``--attention-levels``, ``--beta-schedule`` and
``--prediction-type`` make the other architectures of ``benchmarks/zoo.py``.

    python scripts/train_toy.py --data assets/toy/train --out assets/toy/model
"""

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffattr.data import ImageFolder, load_image
from diffattr.denoisers import in_memory
from diffattr.training import toy_unet, train_denoiser


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--widths", type=_ints, default=(16, 32, 64), help="channels per level, e.g. 16,32,64")
    parser.add_argument(
        "--attention-levels", type=_ints, help="levels with self-attention, 0 = full resolution (default: the last)"
    )
    parser.add_argument("--beta-schedule", default="squaredcos_cap_v2", choices=["squaredcos_cap_v2", "linear"])
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--class-conditional", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(args):
    torch.manual_seed(args.seed)
    folder = ImageFolder(args.data)
    images = torch.stack([load_image(r.path, resolution=args.resolution, channels=1) for r in folder.records])
    labels = torch.tensor([r.label if r.label is not None else 0 for r in folder.records])
    unet = toy_unet(
        sample_size=args.resolution,
        block_out_channels=args.widths,
        attention_levels=args.attention_levels,
        num_class_embeds=max(10, int(labels.max()) + 1) if args.class_conditional else None,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=args.beta_schedule, prediction_type=args.prediction_type
    )
    start = time.time()
    losses = train_denoiser(
        in_memory(unet, scheduler),
        images,
        labels=labels if args.class_conditional else None,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=not args.quiet,
    )
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.out)
    parameters = sum(p.numel() for p in unet.parameters())
    print(
        f"trained {parameters:,} parameters {args.steps} steps in {time.time() - start:.0f}s "
        f"(mean loss of the last 50: {sum(losses[-50:]) / 50:.4f}); saved to {args.out}"
    )


if __name__ == "__main__":
    main(parse_args())
