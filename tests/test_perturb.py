import json

import pytest
import torch

from diffattr import AttributionConfig, Attributor, DiffattrError, DiffusionModel, ScoringConfig
from diffattr.perturb import perturbed_copy, query_loss, select_parameters


@pytest.fixture(scope="module")
def model(tiny_model):
    return DiffusionModel.from_pretrained(tiny_model, device="cpu")


def _query_loss(model, unet, query):
    return query_loss(model, unet, query, None, draws=256, generator=torch.Generator().manual_seed(0)).item()


@pytest.mark.parametrize("direction", ["descent", "ascent"])
def test_perturbation_moves_the_query_loss_and_leaves_the_model_alone(model, direction):
    before = {name: p.clone() for name, p in model.network.named_parameters()}
    query = torch.rand(1, 8, 8) * 2 - 1
    config = AttributionConfig(direction=direction, steps=5, learning_rate=1e-2, draws_per_step=32)
    copy, history, _ = perturbed_copy(model, query, None, config, seed=0)
    assert len(history) == 5
    assert all(torch.equal(p, before[name]) for name, p in model.network.named_parameters())
    original, perturbed = _query_loss(model, model.network, query), _query_loss(model, copy, query)
    assert perturbed < original if direction == "descent" else perturbed > original
    assert not any(p.requires_grad for p in copy.parameters())


def test_perturbation_is_deterministic(model):
    query = torch.zeros(1, 8, 8)
    config = AttributionConfig(steps=2, draws_per_step=8)
    first, *_ = perturbed_copy(model, query, None, config, seed=5)
    second, *_ = perturbed_copy(model, query, None, config, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_only_the_selected_parameters_move(model):
    config = AttributionConfig(steps=2, params="attention", draws_per_step=8)
    copy, *_ = perturbed_copy(model, torch.zeros(1, 8, 8), None, config, seed=0)
    for (name, new), old in zip(copy.named_parameters(), model.network.parameters()):
        assert torch.equal(new, old) != ("attention" in name), name


def test_parameter_selection_errors_on_no_match(model):
    assert len(select_parameters(model, "all")) == len(list(model.network.parameters()))
    with pytest.raises(DiffattrError, match="matches no parameter"):
        select_parameters(model, "no_such_layer")


def test_zero_steps_are_refused_at_the_ranking(tmp_path, tiny_model, tiny_data):
    # Zero deltas everywhere (test_engine: not one bit moves) would rank the images by id.
    attributor = Attributor(
        tiny_model,
        tiny_data,
        tmp_path,
        scoring=ScoringConfig(num_timesteps=4),
        attribution=AttributionConfig(steps=0),
        device="cpu",
        progress=False,
    )
    with pytest.raises(DiffattrError, match="every training image scores 0, the perturbed copy took no optimizer"):
        attributor.attribute(tiny_data / "a" / "img_000.png")


@pytest.mark.parametrize(("direction", "target"), [("ascent", 0.5), ("descent", 0.2)])
def test_a_target_change_stops_once_the_query_loss_has_moved_that_far(model, direction, target):
    query = torch.rand(1, 8, 8) * 2 - 1
    config = AttributionConfig(
        direction=direction, steps=200, learning_rate=3e-3, draws_per_step=32, target_change=target
    )
    copy = perturbed_copy(model, query, None, config, seed=0)
    start, end = copy.query_losses[0], copy.query_losses[-1]
    ratio = end / start
    assert ratio >= 1 + target if direction == "ascent" else ratio <= 1 - target
    assert 0 < copy.steps < 200 and len(copy.query_losses) == copy.steps + 1
    # The step before the last had not reached it: it stopped at the first step that did.
    before_last = copy.query_losses[-2] / start
    assert before_last < 1 + target if direction == "ascent" else before_last > 1 - target


def test_a_target_change_out_of_reach_stops_at_the_step_bound(model):
    config = AttributionConfig(steps=3, learning_rate=1e-6, draws_per_step=8, target_change=10.0)
    copy = perturbed_copy(model, torch.zeros(1, 8, 8), None, config, seed=0)
    assert copy.steps == 3 and len(copy.query_losses) == 4


def test_a_descent_target_of_the_whole_loss_is_refused():
    with pytest.raises(DiffattrError, match="--target-change"):
        AttributionConfig(direction="descent", target_change=1.0)
    with pytest.raises(DiffattrError, match="--target-change"):
        AttributionConfig(target_change=0.0)


def test_the_steps_a_target_change_took_are_recorded(tmp_path, tiny_model, tiny_data):
    attribution = AttributionConfig(
        aggregation="loss", target_change=0.5, steps=50, learning_rate=3e-3, draws_per_step=16
    )
    attributor = Attributor(
        tiny_model, tiny_data, tmp_path, scoring=ScoringConfig(num_timesteps=2), attribution=attribution, progress=False
    )
    attributor.attribute(tiny_data / "a" / "img_000.png")
    (folder,) = attributor.run.query_folders()
    record, _ = attributor.run.load_result(folder, len(attributor.ids))
    assert 0 < record["perturb_steps"] < 50
    assert len(record["query_loss_per_step"]) == record["perturb_steps"] + 1
    assert record["query_loss_per_step"][-1] >= 1.5 * record["query_loss_per_step"][0]


def test_the_null_stop_clamps_the_query_loss_and_stops_at_its_fraction(model):
    query = torch.rand(1, 8, 8) * 2 - 1
    start = _query_loss(model, model.network, query)
    null_loss = 1.5 * start
    config = AttributionConfig(steps=200, learning_rate=3e-3, draws_per_step=32, null_stop=0.95)
    copy = perturbed_copy(model, query, None, config, seed=0, null_loss=null_loss)
    assert 0 < copy.steps < 200
    assert copy.query_losses[-1] >= 0.95 * null_loss > copy.query_losses[-2]
    # Each draw's loss is clamped at L_null: a query already above it stops at once, at L_null.
    below = perturbed_copy(model, query, None, config, seed=0, null_loss=0.5 * start)
    assert below.steps == 0 and below.query_losses == [pytest.approx(0.5 * start, rel=1e-5)]


def test_the_retain_term_keeps_the_training_loss(model):
    retain = torch.rand(16, 1, 8, 8) * 2 - 1
    query = torch.rand(1, 8, 8) * 2 - 1

    def retain_loss(network):
        return query_loss(model, network, retain[0], None, draws=64, generator=torch.Generator().manual_seed(1)).item()

    moved = {}
    for batch in (0, 16):
        config = AttributionConfig(steps=20, learning_rate=3e-3, draws_per_step=16, retain_batch=batch)
        copy = perturbed_copy(model, query, None, config, seed=0, retain=(retain, None))
        moved[batch] = retain_loss(copy.network) - retain_loss(model.network)
    assert moved[16] < moved[0] and moved[0] > 0, moved


def test_mucs_settings_are_checked():
    with pytest.raises(DiffattrError, match="--null-stop"):
        AttributionConfig(direction="descent", null_stop=0.95)
    with pytest.raises(DiffattrError, match="--retain-batch"):
        AttributionConfig(retain_batch=-1)
    with pytest.raises(ValueError, match="null_loss"):
        perturbed_copy(None, torch.zeros(1, 8, 8), None, AttributionConfig(null_stop=0.95), seed=0)


def test_cache_computes_the_null_loss_once_per_run_directory(tmp_path, tiny_model, tiny_data, monkeypatch):
    attribution = AttributionConfig(aggregation="ratio", null_stop=0.95, retain_batch=4, steps=3, draws_per_step=8)
    options = {"scoring": ScoringConfig(num_timesteps=2), "attribution": attribution, "progress": False}
    first = Attributor(tiny_model, tiny_data, tmp_path, **options)
    first.cache()
    saved = json.loads((tmp_path / "null_loss.json").read_text())["null_loss"]
    assert saved > 0
    later = Attributor(tiny_model, tiny_data, tmp_path, **options)
    monkeypatch.setattr(type(later.model), "untrained_network", lambda self, seed: pytest.fail("recomputed L_null"))
    try:  # reaching the perturbation is what counts: L_null is read, not recomputed
        (result,) = later.attribute(tiny_data / "a" / "img_000.png")
        assert torch.isfinite(result.scores).all()
    except DiffattrError as error:  # this random model's query starts at its L_null: nothing to unlearn
        assert "took no optimizer step" in str(error)


def test_the_mucs_group_moves_no_attention_bias_or_outer_layer(model):
    names = [name for name, _ in select_parameters(model, "mucs")]
    assert names and all(not name.endswith(".bias") for name in names)
    assert not any(part in name for name in names for part in ("attention", "conv_in", "conv_out", "time_embedding"))
    assert any(".resnets." in name for name in names)


def test_adamw_is_an_optimizer_choice(model):
    config = AttributionConfig(steps=2, optimizer="adamw", draws_per_step=8)
    copy = perturbed_copy(model, torch.zeros(1, 8, 8), None, config, seed=0)
    assert copy.steps == 2 and not all(
        torch.equal(a, b) for a, b in zip(copy.network.parameters(), model.network.parameters())
    )
