import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffattr import AttributionConfig, Attributor, DiffattrError, DiffusionModel, ScoringConfig
from diffattr.engine import Engine

from .conftest import make_tiny_model

FAST = AttributionConfig(steps=2, draws_per_step=8)


def _attributor(model, data, run_dir, **kwargs):
    kwargs.setdefault("scoring", ScoringConfig(num_timesteps=3))
    kwargs.setdefault("attribution", FAST)
    return Attributor(model, data, run_dir, device="cpu", progress=False, **kwargs)


def test_attribute_writes_the_documented_run_directory(tmp_path, tiny_model, tiny_data):
    query = tiny_data / "b" / "img_003.png"
    (result,) = _attributor(tiny_model, tiny_data, tmp_path / "run").attribute([query], top_k=4)
    run = tmp_path / "run"
    ids = json.loads((run / "ids.json").read_text())
    assert ids == result.ids and len(ids) == 12
    folder = run / "queries" / result.query_id
    saved = json.loads((folder / "result.json").read_text())
    assert saved["query"] == str(query)
    assert [entry["id"] for entry in saved["top"]] == result.top_ids and len(saved["top"]) == 4
    assert all(isinstance(entry["score"], float) for entry in saved["top"])
    assert saved["config"]["attribution"] == FAST.to_dict()
    tensors = load_file(folder / "scores.safetensors")
    assert tensors["scores"].shape == (12,) and tensors["deltas"].shape == (12, 3)
    assert torch.equal(tensors["scores"], result.scores)
    top = tensors["scores"].argmax().item()
    assert saved["top"][0]["id"] == ids[top]
    config = json.loads((run / "config.json").read_text())
    assert config["scoring"]["timesteps"] == [16, 50, 83]
    assert (folder / "query.png").is_file()


def test_two_runs_give_identical_scores(tmp_path, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_004.png"
    first = _attributor(tiny_model, tiny_data, tmp_path / "one").attribute(query)[0]
    second = _attributor(tiny_model, tiny_data, tmp_path / "two").attribute(query)[0]
    assert torch.equal(first.scores, second.scores)
    assert first.top_ids == second.top_ids


def test_a_different_config_on_the_same_run_dir_is_refused(tmp_path, tiny_model, tiny_data):
    _attributor(tiny_model, tiny_data, tmp_path).attribute(tiny_data / "a" / "img_000.png")
    with pytest.raises(DiffattrError, match=r"scoring.num_timesteps: 3 → 5"):
        _attributor(tiny_model, tiny_data, tmp_path, scoring=ScoringConfig(num_timesteps=5)).cache()
    other = AttributionConfig(steps=2, draws_per_step=8, learning_rate=0.5, direction="descent")
    with pytest.raises(DiffattrError) as error:
        _attributor(tiny_model, tiny_data, tmp_path, attribution=other).attribute(tiny_data / "a" / "img_000.png")
    assert "attribution.direction: 'ascent' → 'descent'" in str(error.value)
    assert "attribution.learning_rate: 0.0001 → 0.5" in str(error.value)


def test_other_data_on_the_same_run_dir_is_refused(tmp_path, tiny_model, tiny_data):
    _attributor(tiny_model, tiny_data, tmp_path / "run").cache()
    changed = tmp_path / "changed"
    shutil.copytree(tiny_data, changed)
    (changed / "a" / "img_000.png").write_bytes((tiny_data / "a" / "img_002.png").read_bytes())
    with pytest.raises(DiffattrError, match=r"data.fingerprint"):
        _attributor(tiny_model, changed, tmp_path / "run").cache()


def test_a_bad_query_fails_before_any_work(tmp_path, tiny_model, tiny_data):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DiffattrError, match="broken.png: cannot read this image"):
        _attributor(tiny_model, tiny_data, tmp_path / "run").attribute(tmp_path / "broken.png")
    assert not (tmp_path / "run" / "baseline.safetensors").exists()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_run_end_to_end(tmp_path, tiny_data, prediction_type):
    model = make_tiny_model(tmp_path / "model", prediction_type=prediction_type)
    (result,) = _attributor(model, tiny_data, tmp_path / "run").attribute(tiny_data / "a" / "img_000.png")
    assert torch.isfinite(result.scores).all() and result.deltas.abs().sum() > 0


def test_class_conditional_model_uses_labels(tmp_path, tiny_data):
    model_dir = make_tiny_model(tmp_path / "model", num_class_embeds=3)
    attributor = _attributor(model_dir, tiny_data, tmp_path / "run")
    (result,) = attributor.attribute(tiny_data / "a" / "img_000.png", labels=0)
    assert torch.isfinite(result.scores).all()
    assert attributor.encodings()[1].tolist() == [0, 2, 1, 0, 2, 1, 1, 0, 2, 1, 0, 2]
    with pytest.raises(DiffattrError, match="no class label, and this model is class-conditional"):
        _attributor(model_dir, tiny_data, tmp_path / "other").attribute(tiny_data / "a" / "img_000.png")
    assert not (tmp_path / "other" / "baseline.safetensors").exists()  # refused before the long pass


def test_bad_params_are_refused_before_the_baseline(tmp_path, tiny_model, tiny_data):
    with pytest.raises(DiffattrError, match="--params '\\[': not a valid regular expression"):
        AttributionConfig(params="[")
    attributor = _attributor(tiny_model, tiny_data, tmp_path, attribution=AttributionConfig(params="nothing_here"))
    with pytest.raises(DiffattrError, match="--params 'nothing_here' matches no parameter"):
        attributor.attribute(tiny_data / "a" / "img_000.png")
    assert not (tmp_path / "baseline.safetensors").exists()


def test_attribute_works_inside_a_no_grad_block(tmp_path, tiny_model, tiny_data):
    with torch.no_grad():
        (result,) = _attributor(tiny_model, tiny_data, tmp_path).attribute(tiny_data / "a" / "img_000.png")
    assert result.deltas.abs().sum() > 0


def test_a_pipeline_without_its_scheduler_is_a_clear_error(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "scheduler")
    with pytest.raises(DiffattrError, match="has no scheduler_config.json"):
        DiffusionModel.from_pretrained(tmp_path / "model")


def test_a_label_for_an_unconditional_model_is_refused(tmp_path, tiny_model, tiny_data):
    with pytest.raises(DiffattrError, match="this model is not class-conditional: drop --label"):
        _attributor(tiny_model, tiny_data, tmp_path).attribute(tiny_data / "a" / "img_000.png", labels=1)


def test_bare_unet_folder_with_a_scheduler_folder(tmp_path, tiny_model, tiny_data):
    model = DiffusionModel.from_pretrained(tiny_model / "unet", scheduler=tiny_model / "scheduler")
    assert model.fingerprint == DiffusionModel.from_pretrained(tiny_model).fingerprint
    assert DiffusionModel.from_pretrained(tiny_model / "unet").resolution == 8  # finds ../scheduler
    lonely = tmp_path / "unet"
    shutil.copytree(tiny_model / "unet", lonely)
    with pytest.raises(DiffattrError, match="pass --scheduler"):
        DiffusionModel.from_pretrained(lonely)
    with pytest.raises(DiffattrError, match="neither a pipeline folder"):
        DiffusionModel.from_pretrained(tiny_data)


def test_calibration_is_computed_once_per_run_directory(tmp_path, tiny_model, tiny_data, monkeypatch):
    calls = []
    original = Engine.calibration
    monkeypatch.setattr(Engine, "calibration", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = AttributionConfig(steps=1, draws_per_step=4, aggregation="calibrated", calibration_images=3)
    for query in ("a/img_000.png", "b/img_001.png"):
        Attributor(tiny_model, tiny_data, tmp_path, attribution=config, progress=False).attribute(tiny_data / query)
    assert len(calls) == 1 and (tmp_path / "calibration.safetensors").is_file()


def test_cache_computes_everything_a_query_needs(tmp_path, tiny_model, tiny_data, monkeypatch):
    config = AttributionConfig(steps=1, draws_per_step=4, aggregation="calibrated", calibration_images=3)
    attributor = Attributor(tiny_model, tiny_data, tmp_path, attribution=config, progress=False)
    attributor.cache()
    assert (tmp_path / "calibration.safetensors").is_file()
    calls = []
    for name in ("perturb", "score_copies"):
        original = getattr(Engine, name)
        monkeypatch.setattr(
            Engine,
            name,
            lambda self, items, *a, _name=name, _original=original, **k: (
                calls.append((_name, len(items))) or _original(self, items, *a, **k)
            ),
        )
    monkeypatch.setattr(Engine, "baseline", lambda *a, **k: pytest.fail("the baseline was recomputed"))
    fresh = Attributor(tiny_model, tiny_data, tmp_path, attribution=config, progress=False)
    fresh.attribute(tiny_data / "a/img_000.png")
    assert calls == [("perturb", 1), ("score_copies", 1)]  # the query's own perturbation and pass, nothing else


def test_a_calibration_serves_only_its_own_attribution_settings(tmp_path, tiny_model, tiny_data):
    cached = AttributionConfig(steps=1, draws_per_step=4, calibration_images=3)
    Attributor(tiny_model, tiny_data, tmp_path, attribution=cached, progress=False).cache()
    assert "attribution" not in json.loads((tmp_path / "config.json").read_text())  # a query records it
    other = AttributionConfig(steps=2, draws_per_step=4, calibration_images=3)
    later = Attributor(tiny_model, tiny_data, tmp_path, attribution=other, progress=False)
    (result,) = later.attribute(tiny_data / "a/img_000.png")
    fresh = Attributor(tiny_model, tiny_data, tmp_path / "fresh", attribution=other, progress=False)
    assert torch.equal(result.scores, fresh.attribute(tiny_data / "a/img_000.png")[0].scores)


def test_top_k_above_the_training_set_lists_every_image(tmp_path, tiny_model, tiny_data):
    (result,) = _attributor(tiny_model, tiny_data, tmp_path).attribute(tiny_data / "a" / "img_000.png", top_k=50)
    assert len(result.top) == 12 and [e["rank"] for e in result.top] == list(range(1, 13))
