"""Trains the tiny pixel-space DDPM shipped with diffattr's demo, and saves it as a pipeline folder.

A ~690k-parameter UNet2DModel on 16x16 grayscale digits (cosine schedule, epsilon prediction),
unconditional, or class-conditional with ``--class-conditional`` (labels from metadata.jsonl).

    python scripts/train_toy.py --data assets/toy/train --out assets/toy/model
"""

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffattr.data import ImageFolder, load_image
from diffattr.denoisers import in_memory
from diffattr.training import train_denoiser


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--class-conditional", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def tiny_unet(*, num_class_embeds: int | None = None) -> UNet2DModel:
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def main(args):
    torch.manual_seed(args.seed)
    folder = ImageFolder(args.data)
    images = torch.stack([load_image(r.path, resolution=16, channels=1) for r in folder.records])
    labels = torch.tensor([r.label if r.label is not None else 0 for r in folder.records])
    unet = tiny_unet(num_class_embeds=10 if args.class_conditional else None)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction_type
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
    print(
        f"trained {args.steps} steps in {time.time() - start:.0f}s "
        f"(mean loss of the last 50: {sum(losses[-50:]) / 50:.4f}); saved to {args.out}"
    )


if __name__ == "__main__":
    main(parse_args())
