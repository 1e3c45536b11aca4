"""Behaviour pinned: the full score vectors of the bundled toy model, as the code produced them
before the restructure into one engine and one store (``tests/data/regression_scores.safetensors``).

Pinned: one held-out digit attributed over all 720 training images with Forward-INF (the default
``calibrated`` aggregation and ``--aggregation loss``), pixel ℓ2 and D-TRAK (d = 64). A change in
any score beyond 1e-4 of the vector's largest score is a change of behaviour (the last real change,
re-keyed query noise, moved the ranking's Spearman to 0.95–0.98). Below that is float
rounding: the same commit that matched the pins on CI's machine moved Forward-INF's and D-TRAK's
scores by up to 1.7e-5 of it on another machine (kernels summing in another order), ranking identical.

Regenerate (only for an intended change of the numbers, said so in the commit):
``python tests/test_regression.py``
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from diffattr import AttributionConfig, Attributor, DiffusionModel, ImageFolder
from diffattr.config import GradientConfig
from diffattr.demo import toy_paths

PINS = Path(__file__).parent / "data" / "regression_scores.safetensors"
PROJECTION_DIM = 64  # D-TRAK's projection, small enough for the suite (p × d floats)


def pinned_scores(shared_run_dir: Path, loss_run_dir: Path) -> dict[str, torch.Tensor]:
    """``{method: (N,) scores}`` of the pinned query, computed with the current code.

    Args:
        shared_run_dir: a run directory of the toy model with default settings (the default
            Forward-INF setting and the baselines share it).
        loss_run_dir: a run directory for ``--aggregation loss``.
    """
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    query = ImageFolder(paths["heldout"]).records[0].path
    gradient = GradientConfig(projection_dim=PROJECTION_DIM)
    shared = Attributor(model, paths["train"], shared_run_dir, gradient=gradient, progress=False)
    loss = Attributor(
        model, paths["train"], loss_run_dir, attribution=AttributionConfig(aggregation="loss"), progress=False
    )
    scores = {
        "forward-inf": shared.attribute(query)[0].scores,
        "forward-inf-loss": loss.attribute(query)[0].scores,
        "pixel": shared.attribute(query, method="pixel")[0].scores,
        "dtrak": shared.attribute(query, method="dtrak")[0].scores,
    }
    assert shared.ids == loss.ids
    return scores


def test_scores_match_the_pinned_vectors(toy_run_dir, tmp_path):
    pins = _read_pins()
    scores = pinned_scores(toy_run_dir, tmp_path / "loss")
    assert set(scores) == set(pins)
    for method, expected in pins.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(scores[method], expected, rtol=0, atol=1e-4 * scale, msg=method)


def _read_pins() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(PINS)


if __name__ == "__main__":
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        computed = pinned_scores(Path(folder) / "shared", Path(folder) / "loss")
    PINS.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in computed.items()}, PINS)
    print(f"wrote {PINS}: " + ", ".join(f"{name} {tuple(v.shape)}" for name, v in computed.items()))
