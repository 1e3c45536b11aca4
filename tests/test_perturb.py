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
    copy, history = perturbed_copy(model, query, None, config, seed=0)
    assert len(history) == 5
    assert all(torch.equal(p, before[name]) for name, p in model.network.named_parameters())
    original, perturbed = _query_loss(model, model.network, query), _query_loss(model, copy, query)
    assert perturbed < original if direction == "descent" else perturbed > original
    assert not any(p.requires_grad for p in copy.parameters())


def test_perturbation_is_deterministic(model):
    query = torch.zeros(1, 8, 8)
    config = AttributionConfig(steps=2, draws_per_step=8)
    first, _ = perturbed_copy(model, query, None, config, seed=5)
    second, _ = perturbed_copy(model, query, None, config, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_only_the_selected_parameters_move(model):
    config = AttributionConfig(steps=2, params="attention", draws_per_step=8)
    copy, _ = perturbed_copy(model, torch.zeros(1, 8, 8), None, config, seed=0)
    for (name, new), old in zip(copy.named_parameters(), model.network.parameters()):
        assert torch.equal(new, old) != ("attention" in name), name


def test_parameter_selection_errors_on_no_match(model):
    assert len(select_parameters(model, "all")) == len(list(model.network.parameters()))
    with pytest.raises(DiffattrError, match="matches no parameter"):
        select_parameters(model, "no_such_layer")


def test_zero_steps_give_exactly_zero_deltas(tmp_path, tiny_model, tiny_data):
    attributor = Attributor(
        tiny_model,
        tiny_data,
        tmp_path,
        scoring=ScoringConfig(num_timesteps=4),
        attribution=AttributionConfig(steps=0),
        device="cpu",
        progress=False,
    )
    (result,) = attributor.attribute(tiny_data / "a" / "img_000.png")
    assert result.deltas.shape == (12, 4)
    assert torch.count_nonzero(result.deltas) == 0
    assert torch.count_nonzero(result.scores) == 0
