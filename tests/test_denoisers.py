"""The Denoiser interface: the forward process and targets match diffusers, families are registered."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffattr import DiffattrError, DiffusionModel
from diffattr.denoisers import DENOISERS, LatentTextUNet, PixelUNet, SDXLUNet, family_for, in_memory

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


def test_flow_matching_follows_diffusers_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    model = in_memory(tiny_unet(), scheduler)
    clean, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    expected = torch.cat(
        [
            scheduler.scale_noise(clean[i : i + 1], model.network_timesteps(t[i : i + 1]), noise[i : i + 1])
            for i in range(4)
        ]
    )
    assert model.prediction_type == "flow_matching"
    torch.testing.assert_close(model.add_noise(clean, noise, t), expected)
    torch.testing.assert_close(model.target(clean, noise, t), noise - clean)


def test_families_are_found_by_their_network_class_and_config():
    assert set(DENOISERS) == {"pixel-unet", "latent-text-unet", "sdxl-unet", "dit", "pixart", "sd3"}
    assert family_for(tiny_unet()) is PixelUNet
    from diffusers import UNet2DConditionModel

    small = {
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "cross_attention_dim": 8,
        "layers_per_block": 1,
    }
    assert family_for(UNet2DConditionModel(**small)) is LatentTextUNet
    sdxl = UNet2DConditionModel(
        **small, addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32
    )
    assert family_for(sdxl) is SDXLUNet
    assert family_for(torch.nn.Linear(2, 2)) is None
    model = _model("epsilon")
    assert isinstance(model, DiffusionModel) and model.sample_shape == (1, 8, 8) and model.conditions(["x"]) is None


def test_a_loaded_pipeline_is_its_family(tiny_model):
    model = DiffusionModel.from_pretrained(tiny_model, device="cpu")
    assert type(model) is PixelUNet and model.resolution == 8 and model.num_train_timesteps == 100
    with pytest.raises(DiffattrError, match="LoRA adapters are supported for text-to-image pipelines only"):
        DiffusionModel.from_pretrained(tiny_model, lora=tiny_model, device="cpu")
