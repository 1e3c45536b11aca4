"""Common random numbers: the baseline is a function of (model, image, grid, seed) only."""

import dataclasses
import json
import shutil

import pytest
import torch

from diffattr import Attributor, DiffusionModel, ImageFolder, ScoringConfig
from diffattr.losses import denoising_loss, loss_matrix
from diffattr.noise import ScoringGrid, draw_noise, noise_key, timestep_grid


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_data):
    model = DiffusionModel.from_pretrained(tiny_model, device="cpu")
    attributor = Attributor(model, tiny_data, "unused", progress=False)
    encodings = attributor._encode_rows(0, len(attributor.ids))["encodings"]
    return model, encodings, attributor.ids


def _grid(model, batch_size, draws=2):
    return ScoringGrid(timestep_grid(model.num_train_timesteps, 5), num_draws=draws, seed=3, batch_size=batch_size)


def _baseline(model, encodings, ids, batch_size, draws=2):
    return loss_matrix(model, encodings, None, ids, _grid(model, batch_size, draws), progress=False).losses


def test_a_row_range_is_the_same_rows_of_the_full_matrix(setup):
    model, encodings, ids = setup
    full = _baseline(model, encodings, ids, batch_size=7)
    grid = _grid(model, batch_size=5)
    part = loss_matrix(model, encodings, None, ids, grid, images=range(3, 8), progress=False).losses
    assert part.shape == (5, 5)
    assert torch.allclose(part, full[3:8], rtol=1e-5, atol=1e-7)


def test_some_grid_columns_are_those_columns_of_the_full_matrix(setup):
    model, encodings, ids = setup
    full = _baseline(model, encodings, ids, batch_size=7)
    grid = _grid(model, batch_size=5)
    part = loss_matrix(model, encodings, None, ids, grid, images=[9, 2], columns=[3, 1], progress=False).losses
    assert part.shape == (2, 2)
    assert torch.allclose(part, full[[9, 2]][:, [3, 1]], rtol=1e-5, atol=1e-7)


def test_each_row_is_the_denoising_loss_of_its_own_noise(setup):
    model, encodings, ids = setup
    grid = _grid(model, batch_size=16, draws=1)
    matrix = loss_matrix(model, encodings, None, ids, grid, progress=False).losses
    i, k = 4, 2
    noise = draw_noise([noise_key(3, ids[i], k, 0)], encodings.shape[1:])
    expected = denoising_loss(model, encodings[i : i + 1], noise, grid.timesteps[k : k + 1], None).loss
    assert torch.allclose(matrix[i, k], expected[0], rtol=1e-5)


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
    assert torch.allclose(part.baseline(), full.baseline()[rows], rtol=1e-5, atol=1e-7)


def test_encodings_and_baseline_are_cached(tmp_path, tiny_model, tiny_data):
    scoring = ScoringConfig(num_timesteps=3)
    first = Attributor(tiny_model, tiny_data, tmp_path / "run", scoring=scoring, device="cpu", progress=False)
    baseline = first.baseline()
    assert baseline.shape == (12, 3)
    saved = (tmp_path / "run" / "baseline.safetensors").stat().st_mtime_ns
    second = Attributor(tiny_model, tiny_data, tmp_path / "run", scoring=scoring, device="cpu", progress=False)
    assert torch.equal(second.baseline(), baseline)
    assert (tmp_path / "run" / "baseline.safetensors").stat().st_mtime_ns == saved


def test_a_bf16_pass_is_close_to_fp32_and_not_equal(setup):
    model, encodings, ids = setup
    grid = _grid(model, batch_size=7)
    full = loss_matrix(model, encodings, None, ids, grid, progress=False).losses
    half = loss_matrix(model, encodings, None, ids, dataclasses.replace(grid, dtype="bf16"), progress=False).losses
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert torch.allclose(half, full, rtol=0.05)
