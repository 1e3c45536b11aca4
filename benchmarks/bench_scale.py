"""Cost at realistic model sizes: Forward-INF against D-TRAK, from per-row costs measured side by side.

For each UNet — (a) the bundled toy (≈0.69M parameters, 16×16×1), (b) a DDPM-CIFAR10-layout UNet
(≈36M, 32×32×3), (c) an SD-1.5-shaped conditional UNet (≈860M, 64×64×4 latents, 77×768 text states),
random weights — this one run measures on this machine:

- ``forward``: seconds per row (image × timestep) of a no-grad forward pass, the scoring loop's unit;
- ``backward``: seconds per row of forward + backward of the denoising loss (a perturbation draw, or
  one timestep of a per-example gradient);
- ``adam``: one optimizer step over every parameter (the perturbation's);
- ``project``: projecting one p-vector to d = 1024, as ``projected_gradients`` does (vectors batched up
  to its 1 GiB buffer), with the dense Gaussian projection (kept in memory when p × d fits its 4 GiB
  budget, else regenerated per batch; timed on ``--project-blocks`` blocks of 65,536 parameters and
  scaled to p) and with the sparse one (``--projection sparse``, timed on all p).

It then composes the methods' costs from those units (the engine's scoring loop runs at ≥ 0.9 of the
raw forward throughput: ``bench_scoring.py``), for N training images and Q queries:

- Forward-INF set-up: baseline N·K forward rows, plus for the default ``calibrated`` aggregation R
  calibration perturbations and passes; per query: J steps × (D backward rows + one Adam step) and
  N·K forward rows (M·K with ``--candidates M``);
- D-TRAK set-up: N images × (K backward rows + one projection); per query: K backward rows + one
  projection (the d × d solve and the (d,) × (d, N) product are negligible here).

Defaults: K = 10, J = 10, D = 64, R = 16 (diffattr's), d = 1024, N = 10,000.

    python benchmarks/bench_scale.py                     # all three models (~10 min on 2 cores)
    python benchmarks/bench_scale.py --models toy cifar  # skip the SD-size UNet
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from protocol import markdown_table, write_results

from diffattr.demo import toy_paths
from diffattr.gradients import GRADIENT_BUFFER_BYTES, PROJECTION_CACHE_BYTES, Projector

K, STEPS, DRAWS, CALIBRATION, DIM = 10, 10, 64, 16, 1024


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "cifar", "sd"], choices=["toy", "cifar", "sd"])
    parser.add_argument("--images", type=int, default=10_000, help="N, training images in the composed costs")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 10, 100, 1000], help="Q")
    parser.add_argument("--candidates", type=float, default=0.01, help="M / N of the pre-filtered rows")
    parser.add_argument("--rows", type=int, default=2, help="rows per timed batch (the SD UNet on a CPU: keep small)")
    parser.add_argument("--project-blocks", type=int, default=4, help="Gaussian blocks timed, then scaled to p")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build(name: str):
    """``(unet, sample shape, conditioning kwargs maker)`` with random weights."""
    torch.manual_seed(0)
    if name == "toy":
        unet = UNet2DModel.from_pretrained(toy_paths()["model"], subfolder="unet")
        return unet, (1, 16, 16), lambda b: {}
    if name == "cifar":  # google/ddpm-cifar10-32's layout
        unet = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        return unet, (3, 32, 32), lambda b: {}
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD-1.5's layout
    return unet, (4, 64, 64), lambda b: {"encoder_hidden_states": torch.randn(b, 77, 768)}


def synchronized(function, device: torch.device):
    def run():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def seconds(function, repeats: int = 2) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def unit_costs(name: str, args) -> dict[str, float]:
    device = torch.device(args.device)
    unet, shape, condition = build(name)
    unet.to(device)
    params = [p for p in unet.parameters()]
    num_params = sum(p.numel() for p in params)
    b = args.rows
    x, t = torch.randn(b, *shape, device=device), torch.randint(0, 1000, (b,), device=device)
    extra = {key: value.to(device) for key, value in condition(args.rows).items()}

    def forward():
        with torch.inference_mode():
            unet(x, t, **extra)

    def backward():
        loss = (unet(x, t, **extra).sample - x).pow(2).mean()
        loss.backward()

    optimizer = torch.optim.Adam(params, lr=1e-6)
    costs = {"parameters": num_params}
    costs["forward"] = seconds(synchronized(forward, device)) / b
    costs["backward"] = seconds(synchronized(backward, device)) / b
    costs["adam"] = seconds(synchronized(optimizer.step, device))
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    # As projected_gradients does: gradient rows batched up to its buffer, the Gaussian blocks kept
    # when the whole matrix fits its budget, else regenerated per batch (timed on a few blocks, scaled).
    rows = max(1, min(32, GRADIENT_BUFFER_BYTES // (4 * num_params)))
    cached = num_params * 4 * DIM <= PROJECTION_CACHE_BYTES
    timed = min(num_params, args.project_blocks << 16)
    gaussian = Projector(timed, DIM, seed=0, device=device, max_cached_bytes=(1 << 62) if cached else 0)
    sample = torch.randn(rows, timed, device=device)
    costs["project_gaussian"] = seconds(synchronized(lambda: gaussian(sample), device), 1) * num_params / timed / rows
    sparse = Projector(num_params, DIM, seed=0, device=device, kind="sparse")
    gradient = torch.randn(rows, num_params, device=device)
    costs["project_sparse"] = seconds(synchronized(lambda: sparse(gradient), device), 1) / rows
    return costs


def composed(costs: dict[str, float], num_images: int, fraction: float) -> dict[str, tuple[float, float]]:
    """``{method: (set-up seconds, seconds per query)}``."""
    perturb = STEPS * (DRAWS * costs["backward"] + costs["adam"])
    full_pass = num_images * K * costs["forward"]
    candidates = max(1, round(fraction * num_images)) * K * costs["forward"]
    baseline = full_pass
    calibration = CALIBRATION * (perturb + full_pass)
    featurise = K * costs["backward"]
    return {
        "forward-inf (default, calibrated)": (baseline + calibration, perturb + full_pass),
        "forward-inf (loss)": (baseline, perturb + full_pass),
        f"forward-inf (loss, --candidates {fraction:g}N)": (baseline, perturb + candidates),
        "d-trak (Gaussian P)": (
            num_images * (featurise + costs["project_gaussian"]),
            featurise + costs["project_gaussian"],
        ),
        "d-trak (sparse P)": (num_images * (featurise + costs["project_sparse"]), featurise + costs["project_sparse"]),
    }


def crossover(ours: tuple[float, float], theirs: tuple[float, float]) -> float:
    """Q*: the number of queries from which D-TRAK's total is below ours (inf: never; 0: from the first)."""
    if ours[1] <= theirs[1]:
        return math.inf if ours[0] <= theirs[0] else 0.0
    return max(0.0, (theirs[0] - ours[0]) / (ours[1] - theirs[1]))


def human(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def main(args):
    payload, unit_rows, cost_rows = {"images": args.images, "models": {}}, [], []
    for name in args.models:
        costs = unit_costs(name, args)
        methods = composed(costs, args.images, args.candidates)
        payload["models"][name] = {"units": costs, "methods": {m: list(v) for m, v in methods.items()}}
        unit_rows.append(
            [name, f"{costs['parameters'] / 1e6:.1f}M"]
            + [f"{costs[k] * 1e3:.1f}" for k in ("forward", "backward", "adam", "project_gaussian", "project_sparse")]
        )
        # The anchor at its cheapest: whichever projection costs D-TRAK less at Q = 1.
        dtrak = min((v for m, v in methods.items() if m.startswith("d-trak")), key=lambda v: v[0] + v[1])
        for method, (setup, per_query) in methods.items():
            totals = [setup + q * per_query for q in args.queries]
            row = [name, method, human(setup), human(per_query), *map(human, totals)]
            if method.startswith("forward-inf"):
                ratio = (dtrak[0] + dtrak[1]) / (setup + per_query)
                q_star = crossover((setup, per_query), dtrak)
                row += [f"{ratio:.2f}×", "never" if math.isinf(q_star) else f"{q_star:.0f}"]
            else:
                row += ["", ""]
            cost_rows.append(row)
    units = markdown_table(
        [
            "model",
            "p",
            "forward ms/row",
            "fwd+bwd ms/row",
            "Adam step ms",
            "Gaussian P ms/vector",
            "sparse P ms/vector",
        ],
        unit_rows,
    )
    header = ["model", "method", "set-up", "per query", *[f"total Q={q}" for q in args.queries]]
    header += ["cheaper D-TRAK ÷ this at Q=1", "Q* (D-TRAK cheaper from)"]
    table = markdown_table(header, cost_rows)
    machine = "2 CPU cores" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    note = f"N = {args.images:,}; K = {K}, J = {STEPS}, D = {DRAWS}, R = {CALIBRATION}, d = {DIM}; {machine}, fp32."
    write_results("scale" if args.device == "cpu" else "scale_gpu", payload, f"{units}\n\n{note}\n\n{table}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
