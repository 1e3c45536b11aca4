"""Peak memory of `cache` + one `attribute` for 1k vs 10k training images: it must stay flat.

Encodings (VAE latents and caption embeddings) are written and read in shards, so the only state
that grows with N is the (N, K) loss matrices and the ids. Each size runs in a fresh child process
and reports its peak RSS; the table sets the measured growth beside what holding every encoding
in memory would have cost.

Model: the bundled tiny text-to-image pipeline's tokenizer, text encoder and scheduler, with a
random VAE and UNet at 32×32 pixels (latents 4×16×16), so that each encoding weighs something.
Data: synthetic images (smooth random blobs) with captions. Attribution: K = 2 timesteps, the
`loss` aggregation (the calibrated default adds R more passes of the same shape, not memory).

    python benchmarks/bench_memory.py            # ~10 min on 2 CPU cores
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORK = Path("benchmarks/work/memory")
RESOLUTION = 32
CAPTIONS = [f"a blob of colour number {i}" for i in range(20)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def make_model(folder: Path) -> None:
    """A text-to-image pipeline folder: the tiny fixture's text side, a random 64×64 latent side."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffattr.demo import assets_dir

    if (folder / "model_index.json").is_file():
        return
    fixture = assets_dir() / "tiny-sd" / "model"
    torch.manual_seed(0)
    for name in ("tokenizer", "text_encoder", "scheduler"):
        shutil.copytree(fixture / name, folder / name, dirs_exist_ok=True)
    vae = AutoencoderKL.from_pretrained(fixture / "vae")
    AutoencoderKL.from_config({**vae.config, "sample_size": RESOLUTION}).save_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(fixture / "unet")
    latent = RESOLUTION // 2 ** (len(vae.config.block_out_channels) - 1)
    UNet2DConditionModel.from_config({**unet.config, "sample_size": latent}).save_pretrained(folder / "unet")
    shutil.copy(fixture / "model_index.json", folder / "model_index.json")


def make_data(folder: Path, count: int) -> None:
    if (folder / "metadata.jsonl").is_file():
        return
    rng = np.random.default_rng(count)
    lines = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)
        name = f"{i // 1000:02d}/{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def child(count: int, timesteps: int, quiet: bool) -> dict:
    """Runs in a fresh process: cache + one attribution; returns timings and peak RSS."""
    import torch

    from diffattr import AttributionConfig, Attributor, ScoringConfig

    torch.set_num_threads(2)
    run_dir = WORK / f"run-{count}"
    attributor = Attributor(
        WORK / f"model-{RESOLUTION}",
        WORK / f"data-{count}-{RESOLUTION}",
        run_dir,
        scoring=ScoringConfig(num_timesteps=timesteps),
        attribution=AttributionConfig(aggregation="loss", steps=2, draws_per_step=8),
        device="cpu",
        progress=not quiet,
    )
    start = time.perf_counter()
    attributor.cache()
    cache_seconds = time.perf_counter() - start
    query = attributor.data.records[0].path
    start = time.perf_counter()
    attributor.attribute(query, prompts=CAPTIONS[0], top_k=5)
    encodings, conditions = attributor.training_encodings()
    bytes_per_image = encodings[0].numel() * 4 + (0 if conditions is None else conditions[0].numel() * 4)
    return {
        "images": count,
        "cache_seconds": cache_seconds,
        "attribute_seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "encoding_bytes_per_image": bytes_per_image,
        "score_matrix_mb": count * timesteps * 4 / 2**20,
    }


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.timesteps, args.quiet)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    make_model(WORK / f"model-{RESOLUTION}")
    rows = []
    for count in args.sizes:
        make_data(WORK / f"data-{count}-{RESOLUTION}", count)
        subprocess.run(["rm", "-rf", str(WORK / f"run-{count}")], check=True)
        command = [sys.executable, __file__, "--child", str(count), "--timesteps", str(args.timesteps)]
        output = subprocess.run(
            command + (["--quiet"] if args.quiet else []), check=True, capture_output=True, text=True
        )
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    first = rows[0]
    lines = [
        "Command: `python benchmarks/bench_memory.py`",
        "",
        "| training images | peak RSS | growth vs first | all encodings in memory would add | (N, K) matrix |"
        " cache | one attribution |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        held = row["images"] * row["encoding_bytes_per_image"] / 2**20
        lines.append(
            f"| {row['images']:,} | {row['peak_rss_mb']:.0f} MB | {row['peak_rss_mb'] - first['peak_rss_mb']:+.0f} MB"
            f" | {held:.0f} MB | {row['score_matrix_mb']:.2f} MB | {row['cache_seconds']:.0f} s"
            f" | {row['attribute_seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    results = Path("benchmarks/results")
    (results / "memory.json").write_text(json.dumps({"command": lines[0], "rows": rows}, indent=2) + "\n")
    (results / "memory.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
