"""The memorization audit: pure signals on known inputs, the audit/ folder end to end, ground truth."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffattr import AttributionConfig, Attributor, AuditConfig, DiffattrError, DiffusionModel, ScoringConfig
from diffattr.cli import main
from diffattr.demo import toy_paths
from diffattr.engine import Engine
from diffattr.memorization import (
    auc,
    carlini_ratio,
    combined_score,
    is_replica,
    loss_gap,
    mislabel_scores,
    nearest_neighbours,
    precision_at_k,
    reference_distance,
    timestep_weights,
    tpr_at_fpr,
    within_distance,
)
from diffattr.store import read_json

from .conftest import make_tiny_model, write_images

FAST = AttributionConfig(steps=2, draws_per_step=8)
# alpha = 100: every sample of the random tiny model counts as a replica, so the replica path runs.
TINY_AUDIT = AuditConfig(samples=3, sampling_steps=4, alpha=100.0, neighbours=4)


def _attributor(model, data, run_dir):
    return Attributor(
        model, data, run_dir, scoring=ScoringConfig(num_timesteps=3), attribution=FAST, device="cpu", progress=False
    )


# -- pure functions -------------------------------------------------------------------------------


def test_streamed_neighbours_equal_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(37, 3, 2, 2, generator=generator), torch.randn(53, 3, 2, 2, generator=generator)
    found = nearest_neighbours(queries, keys, k=5, chunk_size=8)
    expected = torch.cdist(queries.flatten(1).double(), keys.flatten(1).double()).float().topk(5, largest=False)
    assert torch.equal(found.indices, expected.indices)
    torch.testing.assert_close(found.distances, expected.values)
    assert found.num_copies.sum() == 0


def test_streamed_neighbours_leave_out_self_and_copies():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(20, 6, generator=generator)
    images[7] = images[3]  # 3 and 7 are copies of each other
    images[11] = images[3] + 1e-4
    found = nearest_neighbours(images, images, k=4, copy_distance=1e-2, max_copies=5, skip_self=True, chunk_size=6)
    distances = torch.cdist(images.double(), images.double()).float()
    distances.fill_diagonal_(float("inf"))
    copies = distances <= 1e-2
    assert found.num_copies.tolist() == copies.sum(1).tolist()
    assert sorted(found.copies[3][found.copies[3] >= 0].tolist()) == [7, 11]
    # Ties (rows 3 and 7 are identical) go to the lower index, whatever the chunking.
    expected = torch.sort(distances.masked_fill(copies, float("inf")), stable=True).indices[:, :4]
    assert torch.equal(found.indices, expected)
    assert not {3, 7, 11} & set(found.indices[3].tolist())
    assert sorted(within_distance(images[3], images, 1e-2).tolist()) == [3, 7, 11]


def test_neighbours_pad_when_fewer_keys_than_k():
    found = nearest_neighbours(torch.zeros(2, 4), torch.ones(3, 4), k=5)
    assert found.indices[:, 3:].eq(-1).all() and found.distances[:, 3:].isinf().all()
    assert reference_distance(found.distances).tolist() == [2.0, 2.0]  # inf padding ignored


def test_carlini_criterion():
    distance = torch.tensor([0.1, 0.6, 0.4, 0.5])
    reference = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert is_replica(distance, reference, alpha=0.5).tolist() == [True, False, False, False]  # strict <
    assert carlini_ratio(distance, reference).tolist() == [pytest.approx(0.1), pytest.approx(0.6), float("inf"), 0.5]
    all_copies = torch.full((1, 3), float("inf"))
    assert reference_distance(all_copies).tolist() == [0.0]  # nothing can be a replica of it on distance


def test_loss_gap_is_per_timestep_and_scale_free():
    losses = torch.tensor([[1.0, 10.0], [1.1, 11.0], [0.9, 9.0], [1.05, 10.5], [0.01, 10.0]])
    gap, per_timestep = loss_gap(losses)
    assert gap.argmax() == 4 and per_timestep.shape == (5, 2)
    scaled = losses * torch.tensor([1000.0, 1.0])
    torch.testing.assert_close(loss_gap(scaled)[0], gap)
    first = timestep_weights(torch.tensor([100, 600]), num_train_timesteps=1000, max_fraction=0.5)
    assert first.tolist() == [1.0, 0.0]
    torch.testing.assert_close(loss_gap(losses, weights=first)[0], per_timestep[:, 0])
    # Held-out images are scored against the training set's population.
    held_out, _ = loss_gap(torch.tensor([[1.0, 10.0]]), reference=losses)
    assert held_out.abs().item() < 0.1
    assert combined_score(gap, torch.tensor([0, 1, 0, 3, 0]), replica_weight=2.0)[3] == gap[3] + 4.0


def test_mislabel_score_is_own_label_loss_minus_best_other():
    class_losses = torch.tensor([[0.1, 0.5, 0.7], [0.9, 0.2, 0.4], [0.3, 0.3, 0.1]])
    scores, best = mislabel_scores(class_losses, torch.tensor([0, 0, 2]))
    torch.testing.assert_close(scores, torch.tensor([0.1 - 0.5, 0.9 - 0.2, 0.1 - 0.3]))
    assert best.tolist() == [1, 1, 0]


def test_auc_and_precision_at_k():
    assert auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([1, 0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 0, 0])) == 0.5  # ties count half


def test_tpr_at_fpr_allows_that_fraction_of_negatives_above_the_threshold():
    negatives = torch.arange(100.0)  # 0 … 99
    positives = torch.tensor([99.5, 98.5, 50.0, 200.0])
    scores, truth = torch.cat([positives, negatives]), torch.tensor([1] * 4 + [0] * 100)
    # 1 % of 100 negatives: one (99) may be flagged; the threshold is the next one, 98.
    assert tpr_at_fpr(scores, truth, 0.01) == 0.75
    assert tpr_at_fpr(scores, truth, 0.0) == 0.5  # above every negative: 99.5 and 200
    assert tpr_at_fpr(torch.tensor([1.0, 1.0]), torch.tensor([1, 0]), 0.0) == 0.0  # a tie is not flagged
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=generator).float()
    positives = torch.rand(40, generator=generator) < 0.3
    pos, neg = scores[positives], scores[~positives]
    brute = ((pos[:, None] > neg).float() + 0.5 * (pos[:, None] == neg).float()).mean().item()
    assert auc(scores, positives) == pytest.approx(brute)
    assert precision_at_k(torch.tensor([0.9, 0.8, 0.1, 0.5]), torch.tensor([1, 0, 0, 1]), 2) == 0.5
    with pytest.raises(DiffattrError, match="--alpha -1.0: must be positive"):
        AuditConfig(alpha=-1.0)


# -- the audit end to end on the tiny model -------------------------------------------------------


def test_audit_writes_the_report_and_resumes(tmp_path, tiny_model, tiny_data, monkeypatch):
    report = _attributor(tiny_model, tiny_data, tmp_path).audit(TINY_AUDIT)
    folder = tmp_path / "audit"
    saved = read_json(folder / "report.json")
    ranking = saved["ranking"]
    ids = read_json(tmp_path / "ids.json")
    assert sorted(entry["id"] for entry in ranking) == sorted(ids) and len(ranking) == 12
    assert set(ranking[0]) == {"id", "score", "loss_gap", "replicas", "copies", "evidence"}
    assert {"loss", "neighbour_loss", "nearest", "copies", "replicas"} <= set(ranking[0]["evidence"])
    scores = [entry["score"] for entry in ranking]
    assert scores == sorted(scores, reverse=True)
    tensors = load_file(folder / "scores.safetensors")
    assert tensors["score"].shape == (12,) and tensors["loss_gap_per_timestep"].shape == (12, 3)
    assert tensors["score"][ids.index(ranking[0]["id"])].item() == pytest.approx(scores[0])
    assert [entry["id"] for entry in report.ranking] == [entry["id"] for entry in ranking]
    # Every sample is a replica (alpha = 100): saved as an image, attributed, credited to its top-1.
    assert len(report.replicas) == 3 and saved["samples"]["replicas"] == 3
    for sample in report.replicas:
        assert (folder / sample["file"]).is_file() and sample["top1"] in ids
        assert (tmp_path / "queries" / sample["query_id"] / "result.json").is_file()
        credited = next(entry for entry in ranking if entry["id"] == sample["top1"])
        assert sample["file"] in [replica["file"] for replica in credited["evidence"]["replicas"]]
    assert sum(entry["replicas"] for entry in ranking) == 3  # random images: no copies to share credit
    # A rerun with the same settings recomputes nothing expensive.
    monkeypatch.setattr("diffattr.audit.generate", lambda *a, **k: pytest.fail("samples were redrawn"))
    monkeypatch.setattr(Attributor, "attribute", lambda *a, **k: pytest.fail("replicas were re-attributed"))
    monkeypatch.setattr(Engine, "losses", lambda *a, **k: pytest.fail("a pass over the training set was redone"))
    again = _attributor(tiny_model, tiny_data, tmp_path).audit(TINY_AUDIT)
    assert torch.equal(again.scores, report.scores) and again.ranking == report.ranking
    with pytest.raises(DiffattrError, match=r"audit.alpha: 100.0 → 0.5.*delete .*audit"):
        _attributor(tiny_model, tiny_data, tmp_path).audit(AuditConfig(samples=3, sampling_steps=4, neighbours=4))


def test_leakage_finds_a_planted_copy(tmp_path, tiny_model, tiny_data):
    test = write_images(tmp_path / "test", 3, seed=99)
    shutil.copy(tiny_data / "b" / "img_005.png", test / "planted.png")
    report = _attributor(tiny_model, tiny_data, tmp_path / "run").audit(AuditConfig(neighbours=4), leakage=test)
    verdicts = {entry["id"]: entry for entry in report.leakage}
    assert verdicts["planted.png"]["copy"] and verdicts["planted.png"]["top1"] == "b/img_005.png"
    assert verdicts["planted.png"]["distance"] < 1e-3
    assert [entry["copy"] for entry in report.leakage].count(True) == 1  # random images are no copies
    saved = read_json(tmp_path / "run" / "audit" / "leakage.json")
    assert saved["results"][0]["id"] == "planted.png" and saved["copies"] == 1


def test_mislabeled_needs_a_class_conditional_model(tmp_path, tiny_model, tiny_data):
    with pytest.raises(DiffattrError, match="--mislabeled needs a class-conditional model"):
        _attributor(tiny_model, tiny_data, tmp_path).audit(mislabeled=True)
    assert not (tmp_path / "baseline.safetensors").exists()  # refused before any work


def test_mislabeled_on_a_class_conditional_model(tmp_path, tiny_data, monkeypatch):
    model = DiffusionModel.from_pretrained(make_tiny_model(tmp_path / "model", num_class_embeds=3), device="cpu")
    attributor = _attributor(model, tiny_data, tmp_path / "run")
    report = attributor.audit(AuditConfig(neighbours=4), mislabeled=True)
    baseline = attributor.cache()
    assert len(report.mislabeled) == 12
    scores = [entry["score"] for entry in report.mislabeled]
    assert scores == sorted(scores, reverse=True)
    first = report.mislabeled[0]
    index = attributor.ids.index(first["id"])
    assert first["own_loss"] == pytest.approx(baseline[index].mean().item())
    assert first["best_other_label"] != first["label"]
    # Under another label, with the same noise, the loss is that of a separate pass.
    losses = load_file(tmp_path / "run" / "audit" / "mislabeled.safetensors")["class_losses"]
    assert losses.shape == (12, 3, 3) and torch.isfinite(losses).all()
    monkeypatch.setattr("diffattr.audit.loss_matrix", lambda *a, **k: pytest.fail("recomputed"))
    again = _attributor(model, tiny_data, tmp_path / "run").audit(AuditConfig(neighbours=4), mislabeled=True)
    assert again.mislabeled == report.mislabeled


def test_the_audit_reads_the_encodings_a_shard_at_a_time_with_the_numbers_of_one_shard(
    tmp_path, tiny_data, monkeypatch
):
    """Neighbours, replicas, leakage and mislabels over encodings sharded five rows at a time equal
    those over one shard: the audit streams the training set (memory flat in N)."""
    model = DiffusionModel.from_pretrained(make_tiny_model(tmp_path / "model", num_class_embeds=3), device="cpu")
    test = write_images(tmp_path / "test", 3, seed=99)
    shutil.copy(tiny_data / "b" / "img_005.png", test / "planted.png")

    def audit(run_dir):
        return _attributor(model, tiny_data, run_dir).audit(TINY_AUDIT, leakage=test, mislabeled=True)

    whole = audit(tmp_path / "whole")
    monkeypatch.setattr("diffattr.attributor.ENCODING_SHARD_ROWS", 5)
    sharded = audit(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded" / "encodings").glob("*.safetensors"))) == 3
    assert torch.equal(sharded.scores, whole.scores) and sharded.ranking == whole.ranking
    assert sharded.leakage == whole.leakage and sharded.mislabeled == whole.mislabeled
    assert [s["top1"] for s in sharded.replicas] == [s["top1"] for s in whole.replicas]
    for name in ("neighbours", "mislabeled"):
        a, b = (load_file(tmp_path / run / "audit" / f"{name}.safetensors") for run in ("whole", "sharded"))
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_cli_audit(tmp_path, tiny_model, tiny_data, capsys):
    common = ["--model", str(tiny_model), "--train", str(tiny_data), "--run-dir", str(tmp_path), "--quiet"]
    code = main(["audit", *common, "--timesteps", "3", "--samples", "2", "--sampling-steps", "3", "--top-k", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "loss gap" in out and "0 of 2 samples are replicas" in out
    assert json.loads((tmp_path / "audit" / "config.json").read_text())["audit"]["samples"] == 2
    assert main(["audit", *common, "--timesteps", "3", "--samples", "2", "--mislabeled"]) == 2
    assert "--mislabeled needs a class-conditional model" in capsys.readouterr().err
    assert main(["audit", *common, "--timesteps", "3", "--samples", "2", "--leakage", str(tmp_path / "nope")]) == 2
    assert f"--leakage: data folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


# -- ground truth on the bundled toy model --------------------------------------------------------


def test_audit_finds_the_canaries_of_the_toy_model(toy_run_dir):
    """720 digits, 4 canaries × 30 copies: the loss gap ranks the canaries first, and a generated
    replica (demo.json's seed) is flagged and attributed to its canary."""
    paths = toy_paths()
    seed, canary = next(iter(read_json(paths["demo"])["replicas"].items()))
    model = DiffusionModel.from_pretrained(paths["model"], device="cpu")
    attributor = Attributor(model, paths["train"], toy_run_dir, progress=False)
    report = attributor.audit(AuditConfig(samples=1, sample_seed=int(seed)))
    is_canary = torch.tensor([image_id.startswith("canaries/") for image_id in report.ids])
    assert auc(report.signals["loss_gap"], is_canary) >= 0.95
    assert auc(report.scores, is_canary) >= 0.95
    assert all(entry["id"].startswith("canaries/") for entry in report.ranking[:120])
    assert report.ranking[0]["copies"] == 29 and report.ranking[-1]["copies"] == 0
    (replica,) = report.replicas
    assert replica["nearest"][0]["id"].startswith(canary.split("_")[0] + "_")
    assert replica["top1"].startswith(canary.split("_")[0] + "_"), replica["top"]
    credited = [entry for entry in report.ranking if entry["replicas"]]
    assert len(credited) == 30 and all(entry["id"].startswith(canary.split("_")[0] + "_") for entry in credited)
