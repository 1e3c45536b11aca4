"""The candidate pre-filter (``--candidates``): which rows it keeps, that it scores them exactly as
the full pass does, and a planted replica still attributed to its canary on the bundled model."""

import pytest
import torch

from diffattr import AttributionConfig, Attributor, DiffusionModel
from diffattr.candidates import candidate_rows, retrieval_column, rms_distances
from diffattr.data import save_image
from diffattr.demo import toy_paths
from diffattr.errors import DiffattrError
from diffattr.sampling import generate
from diffattr.scoring import direction_sign, top_k
from diffattr.store import read_json


def test_the_m_nearest_and_every_near_duplicate_of_them_are_kept():
    query = torch.zeros(1, 2, 2)
    # RMS distances 0.1, 0.2, 0.3, 0.4, and a copy of row 1 (distance 0.2 + 0.01 from the query)
    encodings = torch.stack([torch.full((1, 2, 2), d) for d in (0.4, 0.2, 0.1, 0.3, 0.21)])
    assert torch.allclose(rms_distances(query, encodings), torch.tensor([0.4, 0.2, 0.1, 0.3, 0.21]))
    assert candidate_rows(query, encodings, 1).tolist() == [2]
    assert candidate_rows(query, encodings, 2).tolist() == [1, 2, 4]  # row 4 is within 0.02 of row 1
    assert candidate_rows(query, encodings, 2, duplicate_radius=0).tolist() == [1, 2]
    assert candidate_rows(query, encodings, 9).tolist() == [0, 1, 2, 3, 4]


def test_candidates_are_scored_as_in_the_full_pass(tmp_path, tiny_model, tiny_data):
    config = AttributionConfig(steps=2, draws_per_step=8, calibration_images=3)  # calibrated, as the default
    attributor = Attributor(tiny_model, tiny_data, tmp_path, attribution=config, progress=False)
    query = tiny_data / "a/img_004.png"
    (full,) = attributor.attribute(query, top_k=12)
    (some,) = attributor.attribute(query, top_k=12, candidates=4)
    (folder,) = [f for f in (tmp_path / "queries").iterdir() if f.name.endswith("-candidates4")]
    record = read_json(folder / "result.json")
    kept = torch.isfinite(some.scores)
    assert 4 <= kept.sum() == record["candidates"]["scored"] == len(record["top"]) < 12
    assert "a/img_004.png" in some.top_ids  # itself, at distance 0
    torch.testing.assert_close(
        some.scores[kept], full.scores[kept], rtol=1e-5, atol=1e-6
    )  # rows batched otherwise: float rounding
    assert torch.isnan(some.deltas[~kept]).all() and some.scores[~kept].eq(float("-inf")).all()
    assert some.top_ids == [i for i in full.top_ids if kept[full.ids.index(i)]]
    with pytest.raises(DiffattrError, match="--candidates"):
        attributor.attribute(query, candidates=0)
    with pytest.raises(DiffattrError, match="--candidates"):
        attributor.attribute(query, candidates=3, method="pixel")
    zscore = Attributor(tiny_model, tiny_data, tmp_path / "z", attribution=AttributionConfig(aggregation="zscore"))
    with pytest.raises(DiffattrError, match="--aggregation zscore"):
        zscore.attribute(query, candidates=3)


def test_the_loss_retriever_adds_the_images_the_copy_moves_most_at_one_timestep(tmp_path, tiny_model, tiny_data):
    config = AttributionConfig(steps=2, draws_per_step=8, aggregation="loss")
    attributor = Attributor(tiny_model, tiny_data, tmp_path, attribution=config, progress=False)
    query = tiny_data / "a/img_004.png"
    (full,) = attributor.attribute(query, top_k=12)
    (some,) = attributor.attribute(query, top_k=12, candidates=3, retriever="loss")
    # expected: the 3 nearest encodings, and the 3 largest loss rises at the retriever's column
    column = retrieval_column(len(attributor.timesteps))
    moved = top_k(direction_sign(config.direction) * full.deltas[:, column], 3)[1]
    nearest = candidate_rows(attributor.load_image(query), attributor.encodings()[0], 3)
    kept = torch.isfinite(some.scores)
    assert torch.nonzero(kept).flatten().tolist() == sorted({*moved.tolist(), *nearest.tolist()})
    assert set(moved.tolist()) - set(nearest.tolist())  # the loss stage added images ℓ2 did not find
    torch.testing.assert_close(some.scores[kept], full.scores[kept], rtol=1e-5, atol=1e-6)
    (folder,) = [f for f in (tmp_path / "queries").iterdir() if f.name.endswith("-candidates3-loss")]
    record = read_json(folder / "result.json")["candidates"]
    assert record["scored"] == kept.sum() and record["retrieval_timestep"] == attributor.timesteps[column]
    with pytest.raises(DiffattrError, match="--retriever loss finds the --candidates"):
        attributor.attribute(query, retriever="loss")
    with pytest.raises(DiffattrError, match="--retriever 'dino'"):
        attributor.attribute(query, candidates=3, retriever="dino")


def test_a_replica_is_attributed_to_its_canary_from_few_candidates(toy_run_dir, tmp_path):
    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    seed, canary_id = next(iter(read_json(paths["demo"])["replicas"].items()))
    save_image(generate(model, seeds=[int(seed)], progress=False)[0], tmp_path / "replica.png")
    attributor = Attributor(model, paths["train"], toy_run_dir, progress=False)
    (result,) = attributor.attribute(tmp_path / "replica.png", top_k=3, candidates=8)  # 720 images, 8 (+ copies)
    group = canary_id.split("_")[0]
    assert result.top_ids[0].startswith(group + "_"), result.top
    assert torch.isfinite(result.scores).sum() >= 30  # the canary's 30 copies are near duplicates: all kept
