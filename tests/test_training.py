"""The one denoising trainer (toy models, protocols) and the toy UNet builder."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffattr.denoisers import in_memory
from diffattr.losses import denoising_loss
from diffattr.training import toy_unet, train_denoiser


def _model(seed=0):
    torch.manual_seed(seed)
    unet = toy_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=2)
    return in_memory(unet, DDPMScheduler(num_train_timesteps=100))


def _held_loss(model, images, labels):
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    with torch.no_grad():
        return denoising_loss(model, images, noise, t, labels).loss.mean().item()


def test_training_lowers_the_loss_and_is_reproducible():
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.arange(16) % 2
    model = _model()
    before = _held_loss(model, images, labels)
    history = train_denoiser(model, images, labels=labels, steps=40, batch_size=8, learning_rate=3e-3, progress=False)
    assert _held_loss(model, images, labels) < before
    again = _model()
    assert (
        train_denoiser(again, images, labels=labels, steps=40, batch_size=8, learning_rate=3e-3, progress=False)
        == history
    )


def test_prior_images_join_every_batch():
    images, prior = torch.ones(4, 1, 8, 8), -torch.ones(4, 1, 8, 8)
    labels = torch.zeros(4, dtype=torch.long)
    held = {}
    for prior_batch_size in (0, 4):
        model = _model()
        train_denoiser(
            model,
            images,
            labels=labels,
            prior=(prior, labels),
            prior_batch_size=prior_batch_size,
            steps=40,
            batch_size=4,
            progress=False,
        )
        held[prior_batch_size] = _held_loss(model, prior, labels)
    assert held[4] < 0.8 * held[0], held


def test_dropping_conditions_needs_the_empty_condition():
    with pytest.raises(ValueError, match="empty_condition"):
        train_denoiser(_model(), torch.zeros(2, 1, 8, 8), labels=torch.zeros(2), drop_conditions=0.1, steps=4)
