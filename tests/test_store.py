"""The run directory: its layout, its one settings check, and caches that serve only their own settings."""

import json

import pytest
import torch

from diffattr.config import AttributionConfig
from diffattr.errors import DiffattrError
from diffattr.store import RunDirectory, tensors_digest, write_json

CONFIG = {
    "model": {"fingerprint": "abc", "source": "/models/a"},
    "data": {"fingerprint": "def", "root": "/data/a"},
    "scoring": {"num_timesteps": 10, "num_draws": 1, "seed": 0},
}


def test_a_config_is_written_once_then_checked(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.check_or_write_config(CONFIG)
    RunDirectory(tmp_path / "run").check_or_write_config(CONFIG)  # the same settings: accepted
    other = {**CONFIG, "scoring": {**CONFIG["scoring"], "seed": 1}}
    with pytest.raises(DiffattrError, match=r"scoring\.seed") as error:
        RunDirectory(tmp_path / "run").check_or_write_config(other)
    assert "--run-dir" in str(error.value) and "\n" not in str(error.value)


def test_paths_are_information_not_settings(tmp_path):
    RunDirectory(tmp_path / "run").check_or_write_config(CONFIG)
    moved = {**CONFIG, "model": {**CONFIG["model"], "source": "/elsewhere"}, "data": {**CONFIG["data"], "root": "/x"}}
    RunDirectory(tmp_path / "run").check_or_write_config(moved)


def test_a_new_section_is_added_and_then_checked(tmp_path):
    RunDirectory(tmp_path / "run").check_or_write_config(CONFIG)  # what `cache` writes
    with_attribution = {**CONFIG, "attribution": {"steps": 10}}
    RunDirectory(tmp_path / "run").check_or_write_config(with_attribution)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["attribution"] == {"steps": 10}
    with pytest.raises(DiffattrError, match=r"attribution\.steps"):
        RunDirectory(tmp_path / "run").check_or_write_config({**CONFIG, "attribution": {"steps": 5}})


def test_other_training_ids_are_refused(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.check_or_write_ids(["a.png", "b.png"])
    run.check_or_write_ids(["a.png", "b.png"])
    with pytest.raises(DiffattrError, match="ids.json"):
        run.check_or_write_ids(["b.png", "a.png"])  # the row order is part of the data


def test_a_broken_config_names_the_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(DiffattrError, match="config.json"):
        RunDirectory(tmp_path / "run").check_or_write_config(CONFIG)


def _run(path):
    """A run directory whose settings are checked, as every artifact's reader and writer needs."""
    run = RunDirectory(path)
    run.check_or_write_config(CONFIG)
    return run


def test_a_calibration_serves_only_the_settings_it_was_computed_under(tmp_path):
    run = _run(tmp_path / "run")
    settings = AttributionConfig().to_dict()
    assert run.read_calibration(settings, 5) is None
    reference = torch.arange(5.0)
    run.write_calibration(reference, torch.tensor([1, 3]), settings)
    assert torch.equal(run.read_calibration(settings, 5), reference)
    assert run.read_calibration(AttributionConfig(learning_rate=1e-3).to_dict(), 5) is None


def test_baseline_features_are_kept_per_setting(tmp_path):
    run = _run(tmp_path / "run")
    folders = {
        (method, dim): run.features_dir(method, {"projection_dim": dim})
        for method in ("dtrak", "tracin")
        for dim in (32, 64)
    }
    assert len({folder for folder, _ in folders.values()}) == 4  # another method or setting: another folder
    assert len({stamp for _, stamp in folders.values()}) == 4  # ... and another stamp on its shards
    assert folders["dtrak", 64] == run.features_dir("dtrak", {"projection_dim": 64})
    assert all(folder.parent == run.path / "methods" for folder, _ in folders.values())


def test_a_query_result_round_trips_and_only_finished_queries_are_listed(tmp_path):
    run = _run(tmp_path / "run")
    scores = {"scores": torch.randn(4), "deltas": torch.randn(4, 2)}
    run.save_result("b", {"query": "b.png"}, scores, torch.zeros(1, 8, 8))
    run.save_result("a", {"query": "a.png"}, scores, torch.zeros(1, 8, 8))
    run.query_dir("unfinished").mkdir()  # a query interrupted before its result.json
    folders = run.query_folders()
    assert [folder.name for folder in folders] == ["a", "b"]
    record, tensors = run.load_result(folders[1], 4)
    assert record == {"query": "b.png", "tensors_sha256": tensors_digest(scores)} and torch.equal(
        tensors["deltas"], scores["deltas"]
    )
    assert RunDirectory.query_image(folders[1]).is_file()
    assert not list(tmp_path.rglob("*.tmp*")), "an atomic write left its temporary file"


def test_a_result_that_is_not_an_object_names_the_file(tmp_path):
    run = _run(tmp_path / "run")
    folder = tmp_path / "run" / "queries" / "q"
    write_json(folder / "result.json", [1, 2])
    with pytest.raises(DiffattrError, match="result.json"):
        run.load_result(folder, 4)


def test_a_file_where_the_run_directory_should_be_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(DiffattrError, match="--run-dir"):
        RunDirectory(tmp_path / "run")


def test_a_run_made_before_a_field_existed_was_made_with_its_default(tmp_path):
    # A field added later (e.g. retain_batch) is absent from older config.json and calibration files.
    current = AttributionConfig().to_dict()
    older = {key: value for key, value in current.items() if key not in ("retain_batch", "null_stop")}
    run = RunDirectory(tmp_path / "run")
    run.check_or_write_config({**CONFIG, "attribution": older})
    RunDirectory(tmp_path / "run").check_or_write_config({**CONFIG, "attribution": current})
    with pytest.raises(DiffattrError, match="retain_batch"):
        changed = {**current, "retain_batch": 64}
        RunDirectory(tmp_path / "run").check_or_write_config({**CONFIG, "attribution": changed})
    run.write_calibration(torch.ones(3), torch.tensor([0]), older)
    assert run.read_calibration(current, 3) is not None
    assert run.read_calibration({**current, "retain_batch": 64}, 3) is None


def test_a_null_loss_file_is_read_back_or_named_when_broken(tmp_path):
    run = _run(tmp_path / "run")
    assert run.read_null_loss() is None
    run.write_null_loss(1.25)
    assert run.read_null_loss() == 1.25
    run.save_json(run.file("null_loss.json"), {"null_loss": -1.0})
    with pytest.raises(DiffattrError, match="null_loss.json"):
        run.read_null_loss()


def test_a_run_made_before_dtype_existed_is_fp32(tmp_path):
    old = {**CONFIG, "scoring": {k: v for k, v in CONFIG["scoring"].items() if k != "dtype"}}
    RunDirectory(tmp_path / "run").check_or_write_config(old)
    RunDirectory(tmp_path / "run").check_or_write_config({**CONFIG, "scoring": {**old["scoring"], "dtype": "fp32"}})
    with pytest.raises(DiffattrError, match=r"scoring\.dtype: 'fp32' → 'bf16'"):
        RunDirectory(tmp_path / "run").check_or_write_config({**CONFIG, "scoring": {**old["scoring"], "dtype": "bf16"}})
