"""AbU's EWC penalty: the diagonal Fisher of the training loss, its cache, and what it protects."""

import pytest
import torch

from diffattr import AttributionConfig, Attributor, DiffattrError, DiffusionModel, ScoringConfig
from diffattr.fisher import diagonal_fisher, ewc_penalty
from diffattr.losses import denoising_loss
from diffattr.noise import noise_key
from diffattr.perturb import perturbed_copy, query_loss, select_parameters


@pytest.fixture(scope="module")
def model(tiny_model):
    return DiffusionModel.from_pretrained(tiny_model, device="cpu")


def test_the_fisher_is_the_mean_squared_gradient_normalised_to_mean_one(model):
    encodings = torch.rand(3, 1, 8, 8) * 2 - 1
    ids = ["a", "b", "c"]
    names = [name for name, _ in select_parameters(model, "attention")]
    fisher = diagonal_fisher(model, encodings, None, ids, names, rows=[0, 2], seed=7)
    # By hand: each chosen image's own seeded draw, its squared gradient, summed, then mean 1.
    parameters = dict(model.network.named_parameters())
    squares = {name: torch.zeros_like(parameters[name]) for name in names}
    for row in (0, 2):
        generator = torch.Generator().manual_seed(noise_key(7, "fisher:" + ids[row]))
        t = torch.randint(0, model.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn((1, 1, 8, 8), generator=generator)
        for p in parameters.values():
            p.requires_grad_(True)
        loss = denoising_loss(model, encodings[row : row + 1], noise, t, None).loss.mean()
        for name, gradient in zip(names, torch.autograd.grad(loss, [parameters[n] for n in names])):
            squares[name] += gradient.pow(2)
        for p in parameters.values():
            p.requires_grad_(False)
    mean = sum(s.sum() for s in squares.values()) / sum(s.numel() for s in squares.values())
    assert set(fisher) == set(names)
    for name in names:
        assert torch.allclose(fisher[name], squares[name] / mean, rtol=1e-4, atol=1e-7)
    total = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    assert not any(p.requires_grad for p in model.network.parameters())  # the model is left as it was


def test_the_penalty_is_zero_at_the_anchor_and_weighted_by_the_fisher():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    anchor = {"w": torch.tensor([0.0, 2.0])}
    assert ewc_penalty([("w", weight)], anchor, {"w": torch.tensor([4.0, 100.0])}).item() == pytest.approx(2.0)
    assert ewc_penalty([("w", weight)], {"w": weight.detach().clone()}, {"w": torch.ones(2)}).item() == 0


def test_the_ewc_penalty_protects_the_training_loss(model):
    retain = torch.rand(16, 1, 8, 8) * 2 - 1
    query = torch.rand(1, 8, 8) * 2 - 1
    names = [name for name, _ in select_parameters(model, "all")]
    fisher = diagonal_fisher(model, retain, None, [f"r{i}" for i in range(16)], names, rows=list(range(16)), seed=0)

    def training_loss(network):
        generator = torch.Generator().manual_seed(1)
        return sum(query_loss(model, network, image, None, draws=32, generator=generator).item() for image in retain)

    rise = {}
    for weight in (0.0, 1e4):
        config = AttributionConfig(steps=20, learning_rate=3e-3, draws_per_step=16, ewc_weight=weight)
        copy = perturbed_copy(model, query, None, config, seed=0, fisher=fisher)
        rise[weight] = training_loss(copy.network) - training_loss(model.network)
    assert rise[1e4] < rise[0.0] and rise[0.0] > 0, rise


def test_ewc_settings_are_checked():
    with pytest.raises(DiffattrError, match="--ewc-weight"):
        AttributionConfig(ewc_weight=-1.0)
    with pytest.raises(DiffattrError, match="--params"):
        AttributionConfig(ewc_weight=1.0, params="lora")
    with pytest.raises(ValueError, match="fisher"):
        perturbed_copy(None, torch.zeros(1, 8, 8), None, AttributionConfig(ewc_weight=1.0), seed=0)


def test_the_fisher_is_computed_once_per_run_directory_and_setting(tmp_path, tiny_model, tiny_data, monkeypatch):
    attribution = AttributionConfig(aggregation="loss", ewc_weight=10.0, fisher_images=4, steps=2, draws_per_step=8)
    options = {"scoring": ScoringConfig(num_timesteps=2), "attribution": attribution, "progress": False}
    first = Attributor(tiny_model, tiny_data, tmp_path, **options)
    first.cache()
    (saved,) = tmp_path.glob("fisher-*.safetensors")
    computed = first.fisher()
    later = Attributor(tiny_model, tiny_data, tmp_path, **options)
    monkeypatch.setattr("diffattr.engine.diagonal_fisher", lambda *a, **k: pytest.fail("recomputed F"))
    assert all(torch.equal(later.fisher()[n], computed[n]) for n in computed)
    (result,) = later.attribute(tiny_data / "a" / "img_000.png")
    assert torch.isfinite(result.scores).all()
    # Another setting of the Fisher is another file, never the saved one reused.
    monkeypatch.undo()
    other = AttributionConfig(aggregation="loss", ewc_weight=10.0, fisher_images=2, steps=2, draws_per_step=8)
    Attributor(tiny_model, tiny_data, tmp_path, **{**options, "attribution": other}).cache()
    assert len(list(tmp_path.glob("fisher-*.safetensors"))) == 2 and saved.is_file()
