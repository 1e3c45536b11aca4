"""The in-memory evaluation engine gives the same scores as the run-directory API."""

import torch

from diffattr import AttributionConfig, Attributor
from diffattr.config import GradientConfig, ScoringConfig
from diffattr.evaluation import (
    Queries,
    TrainingSet,
    baseline_losses,
    dtrak_sweep,
    forward_inf_scores,
    gradient_features,
    pixel_scores,
)


def test_evaluation_engine_matches_attributor(tmp_path, tiny_model, tiny_data):
    attribution = AttributionConfig(steps=2, draws_per_step=8, aggregation="calibrated", calibration_images=4)
    attributor = Attributor(
        tiny_model,
        tiny_data,
        tmp_path,
        scoring=ScoringConfig(num_timesteps=3),
        attribution=attribution,
        gradient=GradientConfig(projection_dim=32),
        progress=False,
    )
    query = tiny_data / "b" / "img_003.png"
    (expected,) = attributor.attribute(query)
    (expected_pixel,) = attributor.attribute(query, method="pixel")
    (expected_dtrak,) = attributor.attribute(query, method="dtrak")

    encodings, conditions = attributor.encodings()
    train = TrainingSet(encodings, conditions, attributor.ids)
    pixels = attributor._load(query)[None]
    queries = Queries(pixels, None, [expected.query_id])
    model = attributor.model
    baseline = baseline_losses(model, train, num_timesteps=3, num_draws=1, seed=0)
    assert torch.allclose(baseline, attributor.cache(), rtol=1e-5, atol=1e-7)
    scores = forward_inf_scores(
        model,
        train,
        queries,
        attribution,
        baseline=baseline,
        num_timesteps=3,
        aggregations=["calibrated"],
        progress=False,
    )
    assert torch.allclose(scores["calibrated"][0], expected.scores, rtol=1e-4, atol=1e-6)
    assert torch.allclose(pixel_scores(train, queries)[0], expected_pixel.scores)

    features = {
        name: gradient_features(
            model, images, None, names, method="dtrak", num_timesteps=3, seed=0, projection_dim=32, progress=False
        )
        for name, images, names in (
            ("train", encodings, train.ids),
            ("query", pixels, ["query:" + expected_dtrak.query_id]),
        )
    }
    dtrak = dtrak_sweep(features["query"], features["train"], [GradientConfig().damping])
    assert torch.allclose(dtrak[GradientConfig().damping][0], expected_dtrak.scores, rtol=1e-4, atol=1e-6)
