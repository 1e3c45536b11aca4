import pytest
import torch

from diffattr.engine import spread_indices
from diffattr.scoring import (
    AGGREGATIONS,
    aggregate,
    calibrated_delta,
    mean_delta,
    prediction_change,
    ratio_delta,
    relative_delta,
    top_k,
    zscore_delta,
)

BASELINE = torch.tensor([[1.0, 0.1], [1.0, 0.1], [2.0, 0.2]])
AFTER = torch.tensor([[0.5, 0.05], [1.0, 0.1], [2.2, 0.22]])  # image 0 helped, 1 untouched, 2 hurt


def test_mean_delta_signs_make_higher_more_influential():
    delta = AFTER - BASELINE
    assert torch.allclose(mean_delta(delta, direction="descent"), torch.tensor([0.275, 0.0, -0.11]))
    assert torch.allclose(mean_delta(delta, direction="ascent"), -mean_delta(delta, direction="descent"))


def test_relative_delta_weighs_timesteps_by_their_own_scale():
    scores = relative_delta(AFTER - BASELINE, BASELINE, direction="descent")
    assert torch.allclose(scores, torch.tensor([0.5, 0.0, -0.1]))


def test_ratio_delta_is_bounded_and_scale_free():
    # MUCS's score: a loss that doubles scores 1/3 whatever its scale; the eps keeps 0/0 at 0.
    baseline = torch.tensor([[1.0, 100.0], [0.0, 0.0]])
    after = torch.tensor([[2.0, 200.0], [0.0, 0.0]])
    scores = ratio_delta(baseline, after, direction="ascent")
    assert torch.allclose(scores[0], torch.tensor(1 / 3), atol=2e-4) and scores[1] == 0
    assert torch.allclose(
        ratio_delta(baseline, after, direction="descent"), -ratio_delta(baseline, after, direction="ascent")
    )


def test_zscore_delta_on_known_columns():
    delta = torch.tensor([[-2.0, -20.0], [0.0, 0.0], [2.0, 20.0]])
    assert torch.allclose(zscore_delta(delta, direction="descent"), torch.tensor([1.0, 0.0, -1.0]))


def test_calibrated_delta_divides_by_each_images_usual_response():
    # Image 1 moves a lot under any perturbation (reference 1.0): its large Δ is ordinary. Image 0's
    # smaller Δ is ten times its usual response: it ranks first.
    delta = torch.tensor([[0.1, 0.1], [0.5, 0.5], [0.0, 0.0]])
    reference = torch.tensor([0.01, 1.0, 0.1])
    scores = calibrated_delta(delta, reference, direction="ascent")
    assert torch.allclose(scores, torch.tensor([10.0, 0.5, 0.0]))
    assert torch.equal(
        aggregate(
            "calibrated", baseline=BASELINE, after=BASELINE + delta, direction="ascent", reference=reference
        ).argsort(descending=True),
        torch.tensor([0, 1, 2]),
    )
    with pytest.raises(ValueError, match="calibration reference"):
        aggregate("calibrated", baseline=BASELINE, after=AFTER, direction="ascent")


def test_spread_indices_spread_over_the_ids():
    assert spread_indices(720, 8) == [45, 135, 225, 315, 405, 495, 585, 675]
    assert spread_indices(3, 8) == [0, 1, 2]


def test_prediction_change_is_unsigned_and_normalised():
    change = torch.tensor([[0.5, 0.05], [0.0, 0.0], [0.2, 0.02]])
    assert torch.allclose(prediction_change(change, BASELINE), torch.tensor([0.5, 0.0, 0.1]))


@pytest.mark.parametrize("aggregation", ["relative", "loss", "zscore", "ratio"])
def test_aggregate_ranks_the_helpful_image_first(aggregation):
    scores = aggregate(aggregation, baseline=BASELINE, after=AFTER, direction="descent")
    assert scores.argmax() == 0 and scores.argmin() == 2


def test_aggregate_prediction_needs_the_change_matrix():
    with pytest.raises(ValueError, match="prediction change"):
        aggregate("prediction", baseline=BASELINE, after=AFTER, direction="descent")


def test_top_k_is_stable_on_ties():
    values, indices = top_k(torch.tensor([0.1, 0.5, 0.5, 0.2]), 3)
    assert indices.tolist() == [1, 2, 3]
    assert values.tolist() == pytest.approx([0.5, 0.5, 0.2])


def test_every_aggregation_is_a_config_choice_with_its_help():
    from diffattr import AttributionConfig
    from diffattr.config import flag_name

    help_text = next(f for f in AttributionConfig.__dataclass_fields__.values() if f.name == "aggregation")
    for name, entry in AGGREGATIONS.items():
        assert AttributionConfig(aggregation=name).aggregation == name
        assert f"{name}: {entry.help}" in help_text.metadata["help"]
    assert flag_name("aggregation") == "--aggregation"


def test_top_k_above_n_lists_every_image():
    values, indices = top_k(torch.tensor([0.1, 0.5]), 10)
    assert indices.tolist() == [1, 0] and len(values) == 2
