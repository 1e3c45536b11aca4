"""Forward-INF vs D-TRAK, side by side: wall time for Q = 1, 10, 100 queries, crossover, peak memory.

Same model (bundled toy, ~690k parameters), same 720 training images, same queries (held-out
digits), same grid (K = 10). Each method runs in its own child process, one after the other, so
its peak memory (max RSS, and CUDA peak when on a GPU) is its own. Rows: Forward-INF with its
default `calibrated` aggregation (set-up = baseline pass + R = 16 calibration perturbations), with
`--aggregation loss` (set-up = baseline pass), and D-TRAK (set-up = N·K backward passes, the
projection and the d×d kernel). Per query: Forward-INF perturbs and makes one forward pass over the
training set; D-TRAK takes K backward passes on the query.

    python benchmarks/bench_speed.py                        # ~8 min on 2 CPU cores
    python benchmarks/bench_speed.py --finf-queries 100     # measure Forward-INF at Q=100 too
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from protocol import markdown_table, write_results

from diffattr import AttributionConfig, Attributor, DiffusionModel
from diffattr.config import GradientConfig
from diffattr.data import ImageFolder
from diffattr.demo import toy_paths

# Forward-INF with its default (`calibrated`: R perturbations once per run, in the set-up) and with
# `--aggregation loss` (no calibration), then D-TRAK.
METHODS = ("forward-inf", "forward-inf-loss", "dtrak")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--finf-queries", type=int, default=10, help="queries Forward-INF is timed on")
    parser.add_argument("--dtrak-queries", type=int, default=100, help="queries D-TRAK is timed on")
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args()


def child(args) -> dict:
    """Times one method: set-up, then each query; returns the numbers as a dict."""
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device=args.device)
    queries = [r.path for r in ImageFolder(paths["heldout"]).records]
    count = args.dtrak_queries if args.child == "dtrak" else args.finf_queries
    queries = (queries * (count // len(queries) + 1))[:count]
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(
            model,
            paths["train"],
            run_dir,
            gradient=GradientConfig(projection_dim=args.projection_dim),
            attribution=AttributionConfig(aggregation="loss") if args.child == "forward-inf-loss" else None,
            progress=False,
        )
        attributor.encodings()
        start = time.perf_counter()
        if args.child.startswith("forward-inf"):
            attributor.cache()  # the baseline, and the calibration of `calibrated`
            method = "forward-inf"
        else:
            attributor.train_features(attributor.scorer("dtrak"))
            method = "dtrak"
        setup = time.perf_counter() - start
        per_query = []
        for i, query in enumerate(queries):
            start = time.perf_counter()
            # Distinct copies so every query is a new one (no cached result, distinct query ids).
            copy = Path(run_dir) / f"q{i}.png"
            copy.write_bytes(query.read_bytes())
            attributor.attribute(copy, method=method)
            per_query.append(time.perf_counter() - start)
    peak = {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and args.device != "cpu":
        peak["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {"setup_s": setup, "per_query_s": per_query, **peak}


def main(args):
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--child", method, "--device", args.device]
        command += ["--finf-queries", str(args.finf_queries), "--dtrak-queries", str(args.dtrak_queries)]
        command += ["--projection-dim", str(args.projection_dim)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
    rows = []
    for method, r in results.items():
        mean = sum(r["per_query_s"]) / len(r["per_query_s"])
        measured = len(r["per_query_s"])
        totals = []
        for q in (1, 10, 100):
            total = r["setup_s"] + (sum(r["per_query_s"][:q]) if q <= measured else mean * q)
            totals.append(f"{total / q:.2f}{'' if q <= measured else '*'}")
        memory = f"{r['max_rss_mib']:.0f}" + (f" (CUDA {r['cuda_peak_mib']:.0f})" if "cuda_peak_mib" in r else "")
        rows.append((method, f"{r['setup_s']:.1f}", f"{mean:.2f}", *totals, memory))
        r["mean_per_query_s"] = mean
    crossovers = []
    for method in METHODS[:2]:
        finf, dtrak = results[method], results["dtrak"]
        gap = finf["mean_per_query_s"] - dtrak["mean_per_query_s"]
        extra_setup = dtrak["setup_s"] - finf["setup_s"]
        # D-TRAK is cheaper in total for Q > extra_setup / gap (for every Q when its set-up is cheaper too).
        crossover = max(extra_setup / gap, 0.0) if gap > 0 else float("inf")
        crossovers.append(f"{method} vs D-TRAK: D-TRAK's total time is lower from Q ≈ {crossover:.1f} queries on")
    header = ["method", "set-up s", "s/query", "s/query at Q=1", "Q=10", "Q=100", "peak RSS MiB"]
    markdown = "\n".join(
        [
            f"Device {args.device}, {torch.get_num_threads()} torch threads, 720 training images, K = 10, "
            f"D-TRAK d = {args.projection_dim}. Time per query includes the method's set-up, spread over Q queries.",
            "",
            markdown_table(header, rows),
            "",
            "\\* extrapolated from the measured per-query mean (the other cells are measured).",
            "",
            "Crossover — " + "; ".join(crossovers) + ".",
        ]
    )
    write_results("speed" if args.device == "cpu" else f"speed_{args.device.split(':')[0]}", results, markdown)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    arguments = parse_args()
    if arguments.child:
        print(json.dumps(child(arguments)))
    else:
        main(arguments)
