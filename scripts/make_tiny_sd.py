"""Builds a tiny, offline Stable-Diffusion-style pipeline fixture from the toy digits, plus a concept set and a LoRA.

Writes, under ``--out``:

- ``model/``: a ``StableDiffusionPipeline`` folder without safety checker or feature extractor: a CLIPTokenizer cut
  down to open_clip's first ``--merges`` BPE merges (2,514 tokens, 16 positions), a small random, frozen
  ``CLIPTextModel``, an ``AutoencoderKL`` (16x16 RGB <-> 4x8x8 latents) and a ``UNet2DConditionModel`` trained on the
  captioned toy digits (``assets/toy/train``; 10% empty captions, for classifier-free guidance), a ``DDPMScheduler``;
- ``concept/``: 4 held-out digits rendered inverted (dark on white), captioned "a handwritten digit in sks style";
- ``lora/``: a rank-4 UNet LoRA (diffusers format, for ``pipeline.load_lora_weights``) trained on those 4 exemplars.

Two choices in the LoRA differ from the textbook SD recipe, both because this UNet is tiny: it adapts the ResNet
convolutions (conv1, conv2) as well as to_q/to_k/to_v/to_out.0, since attention alone learned the inverted background
but drew garbled strokes (tried ranks 4 and 16, learning rates 3e-3 and 1e-2, up to 800 steps, offset noise); and each
batch also holds 16 base training images with their captions (prior preservation), without which every prompt came
out inverted. The fused model is thus trained on the base set plus the concept set, and only the sks prompt changes.
``--lora-targets to_q,to_k,to_v,to_out.0 --prior-batch-size 0`` gives the attention-only, concept-only adapter.

It then reloads everything from disk, offline, checks it, and saves PNG grids to ``--grids``: VAE reconstructions,
samples for "a handwritten digit zero".."nine", and LoRA samples. About 9 minutes on one CPU thread:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/make_tiny_sd.py --out assets/tiny-sd
"""

import argparse
import gzip
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from open_clip.tokenizer import bytes_to_unicode
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffattr.denoisers import in_memory
from diffattr.training import train_denoiser

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # the names transformers' CLIPTokenizer and SD checkpoints use
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONCEPT_PROMPT = "a handwritten digit in sks style"
RESOLUTION = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("assets/toy/train"), help="captioned training digits")
    parser.add_argument("--heldout", type=Path, default=Path("assets/toy/heldout"), help="source of the concept")
    parser.add_argument("--out", type=Path, default=Path("assets/tiny-sd"))
    parser.add_argument("--grids", type=Path, default=Path("/tmp/tinysd"), help="where the check grids go")
    parser.add_argument("--merges", type=int, default=2000, help="BPE merges kept from open_clip's vocabulary")
    parser.add_argument("--max-length", type=int, default=16, help="tokenizer model_max_length")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--lora-steps", type=int, default=500)
    parser.add_argument(
        "--lora-targets",
        default="to_q,to_k,to_v,to_out.0,conv1,conv2",
        help="UNet modules the LoRA adapts; attention alone gives inverted but garbled digits (see the docstring)",
    )
    parser.add_argument(
        "--prior-batch-size", type=int, default=16, help="base training images added to each LoRA batch (0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the run reproducible)")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------------------------
# data


def read_metadata(folder: Path) -> list[dict]:
    with open(folder / "metadata.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_rgb(path: Path) -> torch.Tensor:
    """A ``(3, 16, 16)`` image in [-1, 1] (the grayscale digits are replicated to RGB, as SD expects)."""
    image = Image.open(path).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_captioned_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    records = read_metadata(folder)
    images = torch.stack([load_rgb(folder / record["file_name"]) for record in records])
    return images, [record["text"] for record in records]


def write_concept_set(heldout: Path, out: Path, *, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Inverted held-out digits of ``count`` different classes: a style neither the UNet nor its captions ever had."""
    records = read_metadata(heldout)
    labels = sorted(random.Random(seed).sample(sorted({record["label"] for record in records}), count))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, label in enumerate(labels):
        source = next(record for record in records if record["label"] == label)
        inverted = 255 - np.asarray(Image.open(heldout / source["file_name"]).convert("RGB"))
        file_name = f"sks_{index}.png"
        Image.fromarray(inverted.astype(np.uint8)).save(out / file_name)
        rows.append({"file_name": file_name, "label": label, "text": CONCEPT_PROMPT})
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return load_captioned_images(out)


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer and text encoder


def write_small_clip_vocab(folder: Path, num_merges: int) -> None:
    """vocab.json + merges.txt built the way open_clip's SimpleTokenizer builds its vocabulary, with fewer merges.

    Order: the 256 byte symbols, the same with '</w>', one token per merge, then the two special tokens, so every
    other token keeps its id in the full CLIP vocabulary.
    """
    with gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz") as bpe_file:
        lines = bpe_file.read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + num_merges]  # line 0 is the '#version' header
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge.split()) for merge in merges] + [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tokenizer(folder: Path, *, num_merges: int, max_length: int) -> CLIPTokenizer:
    """Writes the small vocabulary to ``folder`` and saves a CLIPTokenizer built from it there.

    vocab.json/merges.txt stay beside tokenizer.json so the slow tokenizer of older transformers loads it too.
    Padding with the end-of-text token, as SD's tokenizer does, is CLIPTokenizer's default.
    """
    write_small_clip_vocab(folder, num_merges)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    # Passing vocab/merges (rather than from_pretrained on the folder) keeps load-time kwargs out of the saved config.
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(line.split()) for line in merge_lines], model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_text_encoder(tokenizer: CLIPTokenizer, *, seed: int) -> CLIPTextModel:
    """Random and frozen: a fixed random encoder already maps each caption to distinct hidden states."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling looks for this id (not the legacy id 2)
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """``(B, L, 32)`` last hidden states, tokenized exactly as StableDiffusionPipeline.encode_prompt does."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids)[0]


def caption_conditions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Per-image hidden states, encoding each distinct caption once."""
    distinct = sorted(set(captions))
    hidden = encode_prompts(tokenizer, text_encoder, distinct)
    return hidden[[distinct.index(caption) for caption in captions]]


# ---------------------------------------------------------------------------------------------------------------------
# VAE


def build_vae(*, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),  # one downsampling: 16x16 pixels -> 8x8 latents
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def warmup_cosine(steps: int, warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, *, steps: int, batch_size: int, seed: int) -> list[float]:
    """MSE reconstruction of a posterior sample + a small KL, on the digits and their inverses.

    The inverses stand in for the broad image distribution SD's VAE is trained on: without them this VAE decodes the
    inverted concept with tinted grey backgrounds (reconstruction MSE ~0.3 instead of ~0.001). The UNet never sees them.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup=20))
    losses = []
    vae.train()
    for _ in tqdm(range(steps), desc="vae", mininterval=2):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        flip = torch.rand(batch_size, 1, 1, 1, generator=generator) < 0.5
        batch = torch.where(flip, -batch, batch)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def set_latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the training latents' means, so the UNet sees roughly unit-variance latents (SD's convention)."""
    scaling_factor = 1.0 / vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------------------------------
# UNet, scheduler, LoRA


def build_unet(*, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        # diffusers' legacy naming: this is the number of heads (num_attention_heads is refused here). Two heads of
        # 16/32 channels run faster on the CPU than 8 tiny ones.
        attention_head_dim=2,
    )


def build_scheduler() -> DDPMScheduler:
    # SD's schedule; steps_offset=1 and clip_sample=False are what StableDiffusionPipeline otherwise rewrites (with a
    # deprecation warning) on every load.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def add_lora(unet: UNet2DConditionModel, target_modules: list[str], *, seed: int) -> int:
    """Adds a rank-4 adapter (alpha 4: scale 1) and freezes the rest; returns the adapter's parameter count."""
    torch.manual_seed(seed)
    unet.requires_grad_(False)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=target_modules)
    unet.add_adapter(config)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_lora(unet: UNet2DConditionModel, folder: Path) -> None:
    """diffusers' format: pytorch_lora_weights.safetensors with 'unet.' keys.

    No LoraConfig metadata: the loader infers rank and target modules from the weights and alpha = rank (scale 1, as
    trained), while a saved peft 0.21 config would make LoraConfig(**metadata) fail under older peft versions.
    """
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)


def save_pipeline(folder: Path, *, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """safety_checker/feature_extractor/image_encoder are saved as [null, null] in model_index.json, which
    from_pretrained then loads as None."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------------------------
# checks


def load_pipeline(folder: Path, lora: Path | None = None) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    if lora is not None:
        pipeline.load_lora_weights(lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, prompts: list[str], *, per_prompt: int, args) -> np.ndarray:
    """``(len(prompts), per_prompt, 16, 16, 3)`` images in [0, 1]."""
    images = pipeline(
        prompts,
        num_images_per_prompt=per_prompt,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    ).images
    return images.reshape(len(prompts), per_prompt, *images.shape[1:])


def to_unit(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` in [0, 1]."""
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[np.ndarray], path: Path, *, scale: int = 4, gap: int = 2) -> None:
    """Rows of ``(N, H, W, 3)`` images in [0, 1], upscaled (nearest) on a mid-gray canvas."""
    columns = max(len(row) for row in rows)
    cell = RESOLUTION * scale + gap
    canvas = np.full((len(rows) * cell + gap, columns * cell + gap, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = gap + r * cell, gap + c * cell
            big = np.kron((image * 255).round().astype(np.uint8), np.ones((scale, scale, 1), dtype=np.uint8))
            canvas[top : top + RESOLUTION * scale, left : left + RESOLUTION * scale] = big
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def nearest_label_accuracy(samples: np.ndarray, train_images: torch.Tensor, train_labels: list[int]) -> float:
    """Share of samples whose nearest training image (pixel L2) has the prompted digit: a rough adherence score."""
    train = to_unit(train_images).reshape(len(train_images), -1)
    labels = np.asarray(train_labels)
    hits = []
    for digit, row in enumerate(samples):
        distances = ((row.reshape(len(row), -1)[:, None, :] - train[None]) ** 2).sum(-1)
        hits.extend(labels[distances.argmin(1)] == digit)
    return float(np.mean(hits))


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def predict_noise(unet, scheduler, latents: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """The UNet's output on a fixed noisy batch: a fingerprint to compare weights before saving and after loading."""
    generator = torch.Generator().manual_seed(1)
    timesteps = torch.linspace(50, 950, len(latents)).long()
    noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
    return unet(noisy, timesteps, encoder_hidden_states=conditions).sample


def check_loading(
    model_dir: Path, lora_dir: Path, tokenized: dict[str, list[int]], lora_fingerprint: tuple[torch.Tensor, ...]
) -> StableDiffusionPipeline:
    """Offline loads: the generic DiffusionPipeline (model_index.json alone), the tokenizer alone, and the pipeline
    with the LoRA, whose UNet must match the one trained here, as loaded and once fused.

    ``tokenized``: prompt -> expected ids; ``lora_fingerprint``: (expected output, latents, conditions).
    """
    generic = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(generic, StableDiffusionPipeline) and generic.safety_checker is None
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    assert all(tokenizer(prompt).input_ids == ids for prompt, ids in tokenized.items())
    expected, latents, conditions = lora_fingerprint
    lora = load_pipeline(model_dir, lora=lora_dir)
    loaded_error = (predict_noise(lora.unet, lora.scheduler, latents, conditions) - expected).abs().max().item()
    lora.fuse_lora()  # what diffattr does with --lora
    fused_error = (predict_noise(lora.unet, lora.scheduler, latents, conditions) - expected).abs().max().item()
    lora.unfuse_lora()
    lora.disable_lora()
    effect = (predict_noise(lora.unet, lora.scheduler, latents, conditions) - expected).abs().max().item()
    lora.enable_lora()
    print(
        f"LoRA reloaded vs trained: max |diff| {loaded_error:.1e} as loaded, {fused_error:.1e} fused "
        f"(vs {effect:.1e} with the adapter disabled)"
    )
    assert loaded_error < 1e-4 and fused_error < 1e-4 < effect
    return lora


def main(args):
    torch.set_num_threads(args.threads)
    start = time.time()
    model_dir, concept_dir, lora_dir = args.out / "model", args.out / "concept", args.out / "lora"
    for folder in (model_dir, concept_dir, lora_dir):
        shutil.rmtree(folder, ignore_errors=True)  # stale files (an old LoRA, say) would otherwise ride along

    images, captions = load_captioned_images(args.data)
    labels = [DIGIT_WORDS.index(caption.split()[-1]) for caption in captions]
    concept_images, concept_captions = write_concept_set(args.heldout, concept_dir, count=4, seed=args.seed)
    print(f"{len(images)} training images, {len(concept_images)} concept exemplars -> {concept_dir}")

    tokenizer = build_tokenizer(model_dir / "tokenizer", num_merges=args.merges, max_length=args.max_length)
    tokenized = {prompt: tokenizer(prompt).input_ids for prompt in ("a handwritten digit three", CONCEPT_PROMPT)}
    print(f"tokenizer: {len(tokenizer)} tokens; " + "; ".join(f"{p!r} -> {ids}" for p, ids in tokenized.items()))
    text_encoder = build_text_encoder(tokenizer, seed=args.seed)
    conditions = caption_conditions(tokenizer, text_encoder, captions)
    empty_condition = encode_prompts(tokenizer, text_encoder, [""])[0]
    concept_conditions = caption_conditions(tokenizer, text_encoder, concept_captions)

    vae = build_vae(seed=args.seed)
    vae_losses = train_vae(vae, images, steps=args.vae_steps, batch_size=args.batch_size, seed=args.seed)
    scaling_factor = set_latent_scaling_factor(vae, images)
    latents, concept_latents = encode_latents(vae, images), encode_latents(vae, concept_images)
    print(f"vae: final loss {np.mean(vae_losses[-50:]):.4f}, scaling_factor {scaling_factor:.4f}")

    scheduler = build_scheduler()
    unet = build_unet(seed=args.seed)
    model = in_memory(unet, scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    unet_losses = train_denoiser(
        model,
        latents,
        labels=conditions,
        steps=args.unet_steps,
        batch_size=args.batch_size,
        learning_rate=1e-3,
        warmup=0.1,
        drop_conditions=0.1,
        empty_condition=empty_condition,
        seed=args.seed,
        description="unet",
    )
    unet.requires_grad_(False)
    save_pipeline(model_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    print(f"unet: final loss {np.mean(unet_losses[-100:]):.4f}; pipeline saved to {model_dir}")

    lora_parameters = add_lora(unet, args.lora_targets.split(","), seed=args.seed)
    lora_losses = train_denoiser(
        model,
        concept_latents,
        labels=concept_conditions,
        parameters=[p for p in unet.parameters() if p.requires_grad],
        steps=args.lora_steps,
        batch_size=16,
        learning_rate=3e-3,
        warmup=0.1,
        prior=(latents, conditions),
        prior_batch_size=args.prior_batch_size,
        seed=args.seed,
        description="lora",
    )
    save_lora(unet, lora_dir)
    fingerprint = predict_noise(unet, scheduler, concept_latents, concept_conditions)
    print(f"lora: final loss {np.mean(lora_losses[-50:]):.4f}; saved to {lora_dir}")
    train_seconds = time.time() - start

    # --- checks, on what was written, offline ---
    lora = check_loading(model_dir, lora_dir, tokenized, (fingerprint, concept_latents, concept_conditions))
    base = load_pipeline(model_dir)
    shown = torch.cat([images[::72][:8], -images[::72][:8], concept_images])
    recon = reconstruct(base.vae, shown)
    recon_mse = F.mse_loss(reconstruct(base.vae, images), images).item()
    inverted_mse = F.mse_loss(reconstruct(base.vae, -images), -images).item()
    save_grid([to_unit(shown[:8]), to_unit(recon[:8]), to_unit(shown[8:]), to_unit(recon[8:])], args.grids / "vae.png")

    digit_prompts = [f"a handwritten digit {word}" for word in DIGIT_WORDS]
    samples = sample(base, digit_prompts, per_prompt=8, args=args)
    save_grid(list(samples), args.grids / "samples.png")
    adherence = nearest_label_accuracy(samples, images, labels)

    base_concept = sample(base, [CONCEPT_PROMPT], per_prompt=8, args=args)[0]
    lora_samples = sample(lora, [CONCEPT_PROMPT, "a handwritten digit three"], per_prompt=8, args=args)
    save_grid([to_unit(concept_images), lora_samples[0], base_concept, lora_samples[1]], args.grids / "lora.png")

    sizes = {name: folder_size(args.out / name) for name in ("model", "concept", "lora")}
    print(
        f"\nparameters: text_encoder {count_parameters(base.text_encoder):,}, vae {count_parameters(base.vae):,}, "
        f"unet {count_parameters(base.unet):,}, lora {lora_parameters:,}"
    )
    print(
        f"final losses: vae {np.mean(vae_losses[-50:]):.4f}, unet {np.mean(unet_losses[-100:]):.4f}, "
        f"lora {np.mean(lora_losses[-50:]):.4f}"
    )
    print(f"vae reconstruction MSE in [-1, 1]: {recon_mse:.4f} (digits), {inverted_mse:.4f} (inverted digits)")
    print(f"samples whose nearest training image has the prompted digit: {adherence:.0%}")
    print(
        f"mean brightness: sks prompt with LoRA {lora_samples[0].mean():.2f}, without {base_concept.mean():.2f}; "
        f"'three' with LoRA {lora_samples[1].mean():.2f} (concept exemplars {to_unit(concept_images).mean():.2f})"
    )
    print("sizes: " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()))
    print(f"total {sum(sizes.values()) / 1e6:.2f} MB; grids in {args.grids}")
    print(f"training {train_seconds:.0f}s, total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main(parse_args())
