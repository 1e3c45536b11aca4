"""The benchmarks' shared engine (benchmarks/protocol.py) runs every method family on the same data."""

import sys
from pathlib import Path

import torch

from diffattr import AttributionConfig, Attributor, ScoringConfig
from diffattr.engine import Queries, TrainingSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from protocol import Setting, all_method_scores


def test_all_method_scores_rank_a_training_image_used_as_query_first(tmp_path, tiny_model, tiny_data):
    attributor = Attributor(tiny_model, tiny_data, tmp_path, scoring=ScoringConfig(num_timesteps=3), progress=False)
    encodings, conditions = attributor.encodings()
    train = TrainingSet(encodings, conditions, attributor.ids)
    queries = Queries(encodings[[2]], None, ["train/2"])
    setting = Setting(AttributionConfig(steps=2, draws_per_step=8, calibration_images=3), num_timesteps=3)
    scores, seconds = all_method_scores(
        attributor.model, train, queries, settings=[setting], projection_dim=16, progress=False
    )
    assert {"pixel", "tracin"} <= set(scores)
    for aggregation in ("calibrated", "loss", "zscore", "relative"):
        assert any(name.startswith("forward-inf[") and name.endswith(f"|{aggregation}]") for name in scores)
    assert any(name.startswith("dtrak[") for name in scores) and set(seconds) >= {"pixel", "forward-inf"}
    assert all(matrix.shape == (1, 12) and torch.isfinite(matrix).all() for matrix in scores.values())
    assert scores["pixel"][0].argmax() == 2
