"""The engine: the one perturb-then-score loop, its common random numbers, and the calibration."""

import pytest
import torch

from diffattr import AttributionConfig, Attributor, DiffusionModel, ImageFolder, ScoringConfig
from diffattr.data import load_image
from diffattr.demo import toy_paths
from diffattr.engine import Engine, Queries, TrainingSet, spread_indices
from diffattr.noise import ScoringGrid

CONFIG = AttributionConfig(steps=2, draws_per_step=4, calibration_images=3)


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_data, tmp_path_factory):
    attributor = Attributor(
        tiny_model, tiny_data, tmp_path_factory.mktemp("run"), scoring=ScoringConfig(num_timesteps=3), progress=False
    )
    encodings, conditions = attributor.encodings()
    grid = ScoringGrid.of(attributor.model.num_train_timesteps, ScoringConfig(num_timesteps=3))
    return Engine(attributor.model, TrainingSet(encodings, conditions, attributor.ids), grid)


def test_an_unchanged_copy_scores_exactly_zero(engine):
    # The same noise and timesteps before and after: with no optimizer step, not one bit moves.
    baseline = engine.baseline()
    response = engine.respond(engine.train.encodings[0], None, "perturb:q", AttributionConfig(steps=0))
    assert torch.equal(response.after.losses, baseline)
    assert Engine.score(response, baseline, AttributionConfig(aggregation="loss")).abs().max() == 0


def test_the_same_name_gives_the_same_perturbation(engine):
    query = engine.train.encodings[1]
    first = engine.respond(query, None, "perturb:q", CONFIG)
    again = engine.respond(query, None, "perturb:q", CONFIG)
    other = engine.respond(query, None, "perturb:other", CONFIG)
    assert torch.equal(first.after.losses, again.after.losses) and first.query_losses == again.query_losses
    assert not torch.equal(first.after.losses, other.after.losses)


def test_query_scores_are_the_responses_scored(engine):
    baseline = engine.baseline()
    queries = Queries(engine.train.encodings[[4, 7]], None, ["a", "b"])
    reference = torch.rand(len(engine.ids)) + 0.5
    scores = engine.query_scores(
        queries, CONFIG, baseline=baseline, aggregations=["loss", "calibrated"], reference=reference
    )
    response = engine.respond(engine.train.encodings[7], None, "perturb:b", CONFIG)
    for name in ("loss", "calibrated"):
        expected = Engine.score(response, baseline, CONFIG, aggregation=name, reference=reference)
        assert torch.allclose(scores[name][1], expected, atol=0, rtol=1e-6)


def test_copies_sharing_one_pass_score_as_one_pass_each(engine):
    # Each loaded batch is scored by every copy: the numbers must not change, not by one bit.
    items = [(engine.train.encodings[i], None, f"perturb:{i}") for i in (0, 3, 5)]
    rows = torch.tensor([1, 4, 8, 9])
    for images in (None, rows):
        shared = engine.respond_many(items, CONFIG, with_prediction_change=True, images=images)
        for (encoding, condition, name), response in zip(items, shared):
            alone = engine.respond(encoding, condition, name, CONFIG, with_prediction_change=True, images=images)
            assert torch.equal(response.after.losses, alone.after.losses)
            assert torch.equal(response.after.prediction_change, alone.after.prediction_change)
            assert response.query_losses == alone.query_losses and response.timings["queries_per_pass"] == 3
    assert shared[0].after.losses.shape == (4, 3) and not torch.equal(shared[0].after.losses, shared[1].after.losses)


def test_calibration_is_the_median_response_to_other_images(engine):
    baseline = engine.baseline()
    reference, indices = engine.calibration(CONFIG, baseline)
    assert indices.tolist() == spread_indices(len(engine.ids), 3) == [2, 6, 10]
    responses = []
    for index in indices.tolist():
        after = engine.respond(engine.train.encodings[index], None, "calibration:" + engine.ids[index], CONFIG)
        responses.append((after.after.losses - baseline).mean(1).abs())
    assert torch.equal(reference, torch.stack(responses).median(0).values)


def test_spread_indices_cover_small_sets_once():
    assert spread_indices(4, 16) == [0, 1, 2, 3]
    assert len(set(spread_indices(1000, 16))) == 16


@pytest.fixture(scope="module")
def toy_engine():
    """The trained toy model over a 60-image slice (no canary copies): the engine alone, no run
    directory, the way the benchmarks use it."""
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    records = [r for r in ImageFolder(paths["train"]).records if not r.id.startswith("canaries/")][:60]
    encodings = torch.stack([load_image(r.path, resolution=16, channels=1) for r in records])
    return Engine(model, TrainingSet(encodings, None, [r.id for r in records]), ScoringGrid.of(1000, ScoringConfig()))


def test_a_training_image_used_as_query_is_top_1_on_the_toy_model(toy_engine):
    # (On this small slice `calibrated` ranks one of the three second or third: its median over R
    # perturbations is noisier than on the 720 images.)
    picked = [3, 31, 52]
    queries = Queries(toy_engine.train.encodings[picked], None, [f"q{i}" for i in picked])
    config = AttributionConfig(aggregation="loss")
    (scores,) = toy_engine.query_scores(queries, config, baseline=toy_engine.baseline(), aggregations=["loss"]).values()
    assert scores.argmax(1).tolist() == picked


def test_abu_ranks_a_training_image_used_as_query_first_on_the_toy_model(toy_engine):
    # AbU: the default ascent with the EWC penalty (F on the slice itself, once per engine), score `loss`.
    picked = [3, 31, 52]
    queries = Queries(toy_engine.train.encodings[picked], None, [f"q{i}" for i in picked])
    config = AttributionConfig(aggregation="loss", ewc_weight=100.0, fisher_images=30)
    (scores,) = toy_engine.query_scores(queries, config, baseline=toy_engine.baseline(), aggregations=["loss"]).values()
    assert scores.argmax(1).tolist() == picked
    assert set(toy_engine.fishers) == {("all", 30)}


def test_the_null_loss_is_an_untrained_networks_loss(toy_engine, monkeypatch):
    null_loss = toy_engine.null_loss()
    assert null_loss > 5 * toy_engine.baseline().mean().item()  # the trained model knows a lot
    again = Engine(toy_engine.model, toy_engine.train, toy_engine.grid).null_loss()
    assert again == null_loss  # the untrained network is seeded by the run's seed
    monkeypatch.setattr(type(toy_engine.model), "untrained_network", lambda self, seed: pytest.fail("recomputed"))
    assert toy_engine.null_loss() == null_loss  # computed once per engine
