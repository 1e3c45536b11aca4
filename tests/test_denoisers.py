"""The Denoiser interface: the forward process and targets match diffusers, families are registered."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffattr import DiffattrError, DiffusionModel
from diffattr.denoisers import DENOISERS, LatentTextUNet, PixelUNet, family_of, in_memory

from .conftest import tiny_unet


def _model(prediction_type: str):
    return in_memory(tiny_unet(), DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type))


def test_forward_process_and_targets_match_diffusers():
    clean, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    model = _model("v_prediction")
    scheduler = model.scheduler
    assert torch.allclose(model.add_noise(clean, noise, t), scheduler.add_noise(clean, noise, t), atol=1e-6)
    assert torch.allclose(model.target(clean, noise, t), scheduler.get_velocity(clean, noise, t), atol=1e-6)
    assert _model("epsilon").target(clean, noise, t) is noise
    assert _model("sample").target(clean, noise, t) is clean


def test_families_are_found_by_their_network_class():
    assert set(DENOISERS) == {"pixel-unet", "latent-text-unet"}
    assert family_of("UNet2DModel") is PixelUNet and family_of("UNet2DConditionModel") is LatentTextUNet
    assert family_of("DiTTransformer2DModel") is None
    model = _model("epsilon")
    assert isinstance(model, DiffusionModel) and model.sample_shape == (1, 8, 8) and model.conditions(["x"]) is None


def test_a_loaded_pipeline_is_its_family(tiny_model):
    model = DiffusionModel.from_pretrained(tiny_model, device="cpu")
    assert type(model) is PixelUNet and model.resolution == 8 and model.num_train_timesteps == 100
    with pytest.raises(DiffattrError, match="LoRA adapters are supported for text-to-image pipelines only"):
        DiffusionModel.from_pretrained(tiny_model, lora=tiny_model, device="cpu")
