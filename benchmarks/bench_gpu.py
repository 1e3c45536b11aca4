"""The GPU checks, as one short script for a machine with a CUDA GPU (run it when one is lent):

1. ``bench_scoring.py --device cuda``: the scoring loop's rows/s against the raw UNet forward;
2. ``bench_dtype.py --device cuda`` for bf16 and fp16: Spearman / top-10 agreement with fp32;
3. ``bench_scale.py --device cuda --rows 16``: per-row costs of the toy, DDPM-CIFAR and SD-1.5-size
   UNets and the composed Forward-INF / D-TRAK costs (``results/scale_gpu.md``).

Each step is timed and a failing step does not stop the others.

    python benchmarks/bench_gpu.py        # ~5 min on one recent GPU
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
STEPS = [
    ["bench_scoring.py", "--device", "cuda"],
    ["bench_dtype.py", "--device", "cuda", "--dtype", "bf16"],
    ["bench_dtype.py", "--device", "cuda", "--dtype", "fp16"],
    ["bench_scale.py", "--device", "cuda", "--rows", "16"],
]


def main() -> int:
    failed = 0
    for step in STEPS:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]])
        failed += done.returncode != 0
        print(f"== {' '.join(step)}: exit {done.returncode}, {time.perf_counter() - start:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
