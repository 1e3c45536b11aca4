"""Tiny models and image folders built on the fly: no downloads, a few seconds to make."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from diffattr.training import toy_unet

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet(*, num_class_embeds=None):
    """A randomly initialised 8×8 grayscale UNet (≈20k parameters)."""
    return toy_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=num_class_embeds)


def make_tiny_model(folder: Path, *, prediction_type="epsilon", num_class_embeds=None, seed=0) -> Path:
    """Saves a randomly initialised 8×8 grayscale DDPM pipeline of :func:`tiny_unet`."""
    torch.manual_seed(seed)
    unet = tiny_unet(num_class_embeds=num_class_embeds)
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, *, seed=0, size=8, labels=True) -> Path:
    """``count`` random grayscale PNGs in two subfolders, with labels and captions."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        name = f"{'ab'[i % 2]}/img_{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / name)
        rows.append({"file_name": name, "text": f"image {i}", **({"label": i % 3} if labels else {})})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("tiny_data"), 12)


@pytest.fixture(scope="session")
def toy_run_dir(tmp_path_factory) -> Path:
    """One run directory for the bundled toy model with default settings, shared by the tests that
    attribute on it: its baseline and calibration (R perturbations) are computed once per session."""
    return tmp_path_factory.mktemp("toy_run")


@pytest.fixture
def link_toy_run(toy_run_dir):
    """``link_toy_run(path)`` makes ``path`` (where a demo or example writes its run directory) the
    shared toy run directory."""

    def link(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(toy_run_dir, target_is_directory=True)

    return link
