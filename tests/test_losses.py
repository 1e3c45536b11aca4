"""Common random numbers: the baseline is a function of (model, image, grid, seed) only."""

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from diffattr import Attributor, DiffusionModel, ImageFolder, ScoringConfig
from diffattr.losses import add_noise, denoising_target, loss_matrix
from diffattr.noise import timestep_grid


def test_forward_process_and_targets_match_diffusers():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    clean, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    alpha_bar = scheduler.alphas_cumprod[t]
    assert torch.allclose(add_noise(clean, noise, alpha_bar), scheduler.add_noise(clean, noise, t), atol=1e-6)
    assert torch.allclose(
        denoising_target(clean, noise, alpha_bar, "v_prediction"), scheduler.get_velocity(clean, noise, t), atol=1e-6
    )
    assert denoising_target(clean, noise, alpha_bar, "epsilon") is noise
    assert denoising_target(clean, noise, alpha_bar, "sample") is clean


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_data):
    model = DiffusionModel.from_pretrained(tiny_model, device="cpu")
    attributor = Attributor(model, tiny_data, "unused", progress=False)
    encodings = attributor._encode_rows(0, len(attributor.ids))["encodings"]
    return model, encodings, attributor.ids


def _baseline(model, encodings, ids, batch_size, draws=2):
    grid = timestep_grid(model.num_train_timesteps, 5)
    return loss_matrix(
        model, encodings, None, ids, timesteps=grid, num_draws=draws, seed=3, batch_size=batch_size, progress=False
    ).losses


def test_baseline_is_independent_of_batch_size(setup):
    model, encodings, ids = setup
    reference = _baseline(model, encodings, ids, batch_size=256)
    for batch_size in (1, 7):
        assert torch.allclose(_baseline(model, encodings, ids, batch_size), reference, rtol=1e-5, atol=1e-7)


def test_baseline_follows_the_image_not_its_position(setup):
    model, encodings, ids = setup
    reference = _baseline(model, encodings, ids, batch_size=7)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    shuffled = _baseline(model, encodings[order], [ids[i] for i in order], batch_size=7)
    assert torch.allclose(shuffled, reference[order], rtol=1e-5, atol=1e-7)


def test_baseline_of_a_subset_folder_matches_the_full_one(tmp_path, tiny_model, tiny_data):
    subset = tmp_path / "subset"
    shutil.copytree(tiny_data, subset)
    removed = {"a/img_002.png", "b/img_005.png", "b/img_011.png"}
    for name in removed:
        (subset / name).unlink()
    rows = (subset / "metadata.jsonl").read_text().splitlines()
    (subset / "metadata.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["file_name"] not in removed))
    scoring = ScoringConfig(num_timesteps=4, num_draws=2, batch_size=5)
    full = Attributor(tiny_model, tiny_data, tmp_path / "full", scoring=scoring, device="cpu", progress=False)
    part = Attributor(tiny_model, subset, tmp_path / "part", scoring=scoring, device="cpu", progress=False)
    rows = [full.ids.index(image_id) for image_id in part.ids]
    assert len(rows) == len(ImageFolder(subset)) == 9
    assert torch.allclose(part.cache(), full.cache()[rows], rtol=1e-5, atol=1e-7)


def test_encodings_and_baseline_are_cached(tmp_path, tiny_model, tiny_data):
    scoring = ScoringConfig(num_timesteps=3)
    first = Attributor(tiny_model, tiny_data, tmp_path / "run", scoring=scoring, device="cpu", progress=False)
    baseline = first.cache()
    assert baseline.shape == (12, 3)
    saved = (tmp_path / "run" / "baseline.safetensors").stat().st_mtime_ns
    second = Attributor(tiny_model, tiny_data, tmp_path / "run", scoring=scoring, device="cpu", progress=False)
    assert torch.equal(second.cache(), baseline)
    assert (tmp_path / "run" / "baseline.safetensors").stat().st_mtime_ns == saved
