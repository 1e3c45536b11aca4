"""``diffattr demo``: the whole loop offline, on the bundled toy model and digits.

Generates a few images with the bundled 16×16 digit model (seeds listed in ``demo.json``, one of
which reproduces a planted canary), attributes each one over the 720 training digits, writes the
HTML gallery, and prints where the results are.
"""

from __future__ import annotations

import time
from pathlib import Path

from .attributor import Attributor
from .data import save_image
from .denoisers import DiffusionModel
from .errors import DiffattrError
from .gallery import write_gallery
from .sampling import generate
from .store import read_json


def assets_dir() -> Path:
    """The toy assets: ``assets/`` of a source checkout, or ``diffattr/_assets`` of a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_assets", package.parent / "assets"):
        if (candidate / "toy" / "model" / "model_index.json").is_file():
            return candidate
    raise DiffattrError("the bundled toy assets are missing; reinstall diffattr from its source tree")


def toy_paths() -> dict[str, Path]:
    """Folders of the bundled toy model, training set, held-out set, and the demo's settings file."""
    toy = assets_dir() / "toy"
    return {"model": toy / "model", "train": toy / "train", "heldout": toy / "heldout", "demo": toy / "demo.json"}


def run_demo(out: str | Path, *, device: str | None = None, progress: bool = True) -> list:
    """Generates the demo images, attributes them, and prints a summary.

    Returns:
        The list of :class:`AttributionResult`, one per generated image.
    """
    out = Path(out)
    paths = toy_paths()
    settings = read_json(paths["demo"])
    model = DiffusionModel.from_pretrained(paths["model"], device=device)
    start = time.perf_counter()
    images = generate(model, seeds=settings["seeds"], progress=progress)
    queries = []
    for seed, image in zip(settings["seeds"], images):
        queries.append(out / "generated" / f"sample_seed{seed}.png")
        save_image(image, queries[-1])
    generate_seconds = time.perf_counter() - start
    attributor = Attributor(model, paths["train"], out / "run", progress=progress)
    results = attributor.attribute(queries, top_k=5)
    for result in results:
        print(result.table())
    print(f"\ngenerated {len(queries)} images in {generate_seconds:.1f}s")
    for result in results:
        t = result.timings
        print(f"{result.query_id}: perturbation {t['perturb_seconds']:.1f}s, scoring {t['score_seconds']:.1f}s")
    print(f"results in {attributor.run.path / 'queries'}")
    print(f"gallery: {write_gallery(attributor.run.path, progress=progress)}")
    return results
