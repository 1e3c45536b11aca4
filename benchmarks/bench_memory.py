"""Peak memory of every verb for 1k vs 10k training images: it must stay flat in N.

Encodings (VAE latents and caption embeddings) and the baselines' training features are written
and read in shards; the audit's neighbour search and D-TRAK's ΦᵀΦ stream over those shards. So the
only state that grows with N is a few numbers per image: the (N, K) loss matrices, the (N, k)
neighbour lists, the (N,) scores and the ids. Each (verb, size) runs in a fresh child process on a
run directory whose encodings and baseline are already cached, and reports its peak RSS; the table
sets the measured growth beside what holding every encoding (or feature) in memory would add.

Verbs: `attribute` (one Forward-INF query), `audit` (neighbours + loss gap), `dtrak` (featurise the
training set + one query, d = 1024), `pixel` (one query). Each is measured after a `cache` child
(encodings + baseline), whose own peak is the first row.

Model: the bundled tiny text-to-image pipeline's tokenizer, text encoder and scheduler, with a
random VAE and UNet at 32×32 pixels (latents 4×16×16), so that each encoding weighs something.
Data: synthetic images (smooth random blobs) with captions. Attribution: K = 2 timesteps, the
`loss` aggregation (the calibrated default adds R more passes of the same shape, not memory).

    python benchmarks/bench_memory.py            # ~25 min on 2 CPU cores
"""

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORK = Path("benchmarks/work/memory")
RESOLUTION = 32
CAPTIONS = [f"a blob of colour number {i}" for i in range(20)]


VERBS = ("cache", "attribute", "audit", "dtrak", "pixel")
PROJECTION_DIM = 1024


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--verbs", nargs="+", choices=VERBS[1:], default=list(VERBS[1:]))
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # verb, size
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


def child(verb: str, count: int, args) -> dict:
    """Runs in a fresh process: one verb on the cached run directory; returns its time and peak RSS."""
    import torch

    from diffattr import AttributionConfig, Attributor, AuditConfig, ScoringConfig
    from diffattr.config import GradientConfig

    torch.set_num_threads(args.threads)
    attributor = Attributor(
        WORK / f"model-{RESOLUTION}",
        WORK / f"data-{count}-{RESOLUTION}",
        WORK / f"run-{count}",
        scoring=ScoringConfig(num_timesteps=args.timesteps),
        attribution=AttributionConfig(aggregation="loss", steps=2, draws_per_step=8),
        gradient=GradientConfig(projection_dim=PROJECTION_DIM, projection="sparse"),
        device="cpu",
        progress=not args.quiet,
    )
    query = attributor.data.records[0].path
    start = time.perf_counter()
    if verb == "cache":
        attributor.cache()
    elif verb == "audit":
        attributor.audit(AuditConfig())
    else:
        method = {"attribute": "forward-inf"}.get(verb, verb)
        attributor.attribute(query, prompts=CAPTIONS[0], top_k=5, method=method)
    encodings, conditions = attributor.training_encodings()
    # What each verb would hold if it loaded the training set whole: encodings and conditions
    # (pixels for the pixel baseline), and D-TRAK's (N, d) features.
    held = encodings[0].numel() * 4 + (0 if conditions is None else conditions[0].numel() * 4)
    if verb == "pixel":
        held = 3 * RESOLUTION**2 * 4
    if verb == "dtrak":
        held += PROJECTION_DIM * 4
    return {
        "verb": verb,
        "images": count,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "held_bytes_per_image": held,
    }


def run_child(verb: str, count: int, args) -> dict:
    command = [sys.executable, __file__, "--child", verb, str(count), "--timesteps", str(args.timesteps)]
    command += ["--threads", str(args.threads)] + (["--quiet"] if args.quiet else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    make_model(WORK / f"model-{RESOLUTION}")
    rows = []
    for count in args.sizes:
        make_data(WORK / f"data-{count}-{RESOLUTION}", count)
        subprocess.run(["rm", "-rf", str(WORK / f"run-{count}")], check=True)
        for verb in ("cache", *args.verbs):
            rows.append(run_child(verb, count, args))
            if not args.quiet:
                print(json.dumps(rows[-1]), flush=True)
    first = {row["verb"]: row for row in rows if row["images"] == args.sizes[0]}
    lines = [
        f"Command: `{shlex.join(['python', 'benchmarks/bench_memory.py', *sys.argv[1:]])}`",
        "",
        "| verb | training images | peak RSS | growth vs first size | holding the set whole would add | time |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: (VERBS.index(row["verb"]), row["images"])):
        held = row["images"] * row["held_bytes_per_image"] / 2**20
        growth = row["peak_rss_mb"] - first[row["verb"]]["peak_rss_mb"]
        lines.append(
            f"| {row['verb']} | {row['images']:,} | {row['peak_rss_mb']:.0f} MB | {growth:+.0f} MB"
            f" | {held:.0f} MB | {row['seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    results = Path("benchmarks/results")
    (results / "memory.json").write_text(json.dumps({"command": lines[0][10:-1], "rows": rows}, indent=2) + "\n")
    (results / "memory.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
