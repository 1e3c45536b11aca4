"""Tiny offline pipelines of every model family, built from small configs and saved by diffusers'
own ``save_pretrained`` (a user's folder layout): SDXL, DiT, PixArt and SD3 (flow matching).

Each has random weights, then ``train_steps`` quick denoising steps on the training images it is
given (through diffattr's own loss, so the conditioning trained is the one scored). The CLIP
tokenizer is the bundled tiny-sd one (2,514 tokens, 16 positions); the T5 encoders (PixArt's, and
SD3's ``text_encoder_3``) read a real ``T5Tokenizer`` (a Unigram model, as T5's SentencePiece one)
over a small vocabulary of whole caption words and single characters.

``python -m tests.families OUT`` writes all four under ``OUT`` (about a minute on 2 cores).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from diffattr.demo import assets_dir
from diffattr.training import train_denoiser

TOKENIZER = assets_dir() / "tiny-sd" / "model" / "tokenizer"
FAMILIES = ("sdxl", "dit", "pixart", "sd3")
WIDTH = 32  # text-encoder width


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)


def _t5_tokenizer():
    import string

    from transformers import T5Tokenizer

    words = "a an the of in on with and handwritten digit zero one two three four five six seven eight nine sks"
    pieces = [("▁" + word, -2.0) for word in words.split()] + [("▁", -4.0)]
    pieces += [(char, -6.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    vocabulary = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]  # T5's ids: pad 0, eos 1, unk 2
    return T5Tokenizer(vocab=vocabulary, extra_ids=0, model_max_length=512)


def _t5(seed: int, width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(_t5_tokenizer()), d_model=width, d_ff=64, num_layers=2, num_heads=2, d_kv=16, pad_token_id=0
    )
    return T5EncoderModel(config).eval()


def _clip(seed: int, *, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2514,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=WIDTH,
        bos_token_id=2512,
        eos_token_id=2513,
        pad_token_id=2513,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def _sdxl():
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * WIDTH,  # the two encoders' hidden states side by side
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=WIDTH + 6 * 8,  # pooled + 6 time ids
    )
    return StableDiffusionXLPipeline(
        vae=_vae(1),
        text_encoder=_clip(2, projection=False),
        text_encoder_2=_clip(3, projection=True),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )


def _dit():
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # a learned variance beside the noise, as DiT-XL/2
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return DiTPipeline(transformer=transformer, vae=_vae(1), scheduler=DDPMScheduler(num_train_timesteps=1000))


def _pixart():
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        caption_channels=WIDTH,
        cross_attention_dim=32,
        patch_size=2,
        norm_num_groups=8,
    )
    return PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5(2, WIDTH),
        vae=_vae(1),
        transformer=transformer,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )


def _sd3(*, t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * WIDTH,
        out_channels=4,
        pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(1),
        text_encoder=_clip(2, projection=True),
        tokenizer=_tokenizer(),
        text_encoder_2=_clip(3, projection=True),
        tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(4, 2 * WIDTH) if t5 else None,  # T5 at the joint width, as SD3's
        tokenizer_3=_t5_tokenizer() if t5 else None,
    )


BUILDERS = {"sdxl": _sdxl, "dit": _dit, "pixart": _pixart, "sd3": _sd3}


def build(
    family: str,
    out: Path,
    *,
    images: torch.Tensor | None = None,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    train_steps: int = 0,
) -> Path:
    """Builds the ``family`` pipeline, trains it ``train_steps`` on ``images`` (``(N, 3, 16, 16)``
    in [-1, 1], with their labels or prompts), saves it to ``out`` and returns ``out``."""
    from diffattr.models import load_pipeline

    pipeline = BUILDERS[family]()
    if images is not None:
        # A random VAE's latents are small (std ≈ 0.05) and alike: noise would drown them. Scale and
        # shift them to unit spread, as SD's scaling_factor (0.18215) and SD3's shift_factor do.
        with torch.no_grad():
            raw = pipeline.vae.encode(images).latent_dist.mean
        pipeline.vae.register_to_config(
            scaling_factor=float(1 / (raw - raw.mean()).std()), shift_factor=float(raw.mean())
        )
    if train_steps:
        model = load_pipeline(pipeline, device="cpu")
        ids = [f"train {i}" for i in range(len(images))]
        conditions = model.conditions(ids, labels=labels, prompts=prompts)
        model.network.requires_grad_(True)
        train_denoiser(model, model.encode(images), labels=conditions, steps=train_steps, batch_size=16, progress=False)
        model.network.requires_grad_(False)
    if out.exists():
        shutil.rmtree(out)
    pipeline.save_pretrained(out)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-families")
    for name in FAMILIES:
        print(build(name, root / name))
