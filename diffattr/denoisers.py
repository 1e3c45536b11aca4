"""The Denoiser interface: everything the engine asks of a model family, and the family registry.

A :class:`Denoiser` wraps one trained network (UNet today) with its noise schedule and the parts
around it. The engine only calls:

- ``encode`` / ``decode``: images ``(B, C, H, W)`` in ``[-1, 1]`` ↔ the network's space;
- ``conditions``: the condition tensor of a batch (class labels, text-encoder states, or ``None``);
- ``add_noise`` / ``target``: the forward process at integer timesteps and the training target
  (what the network was trained to output: ε, v or x₀, from the scheduler's ``prediction_type``);
- ``predict``: one forward pass of the network, or of a perturbed copy of it;
- ``parameter_groups`` / ``lora_targets``: named sets of parameters a perturbation may move.

Each family is one subclass registered with :func:`register_denoiser`; ``models.py`` picks the
family whose ``network_class`` and ``components`` match a folder. Adding a family (a transformer,
another forward process) is one subclass here and its test.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from .errors import DiffattrError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DENOISERS: dict[str, type[Denoiser]] = {}


def register_denoiser(cls: type[Denoiser]) -> type[Denoiser]:
    """Registers a model family (a class decorator)."""
    if cls.family in DENOISERS:
        raise ValueError(f"model family {cls.family!r} is registered twice")
    DENOISERS[cls.family] = cls
    return cls


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


class Denoiser:
    """A trained denoising network with its noise schedule, ready for forward-only scoring.

    Attributes:
        network: the network, in eval mode, on its device. Never modified by diffattr.
        scheduler: the diffusers scheduler (``alphas_cumprod``, ``prediction_type``).
        source: where the model was loaded from.
        fingerprint: content hash of the weights and configs (and of a fused LoRA adapter).
    """

    family: ClassVar[str]
    network_class: ClassVar[str]  # the diffusers class of the network
    components: ClassVar[tuple[str, ...]] = ()  # the other pipeline components the family needs
    # Named parameter sets for --params (regular expressions on parameter names).
    parameter_groups: ClassVar[dict[str, str]] = {
        "attention": r"attn|attention",
        # What MUCS (Sony, 2026) moves: everything but attention, biases, embeddings and the
        # input/output layers.
        "mucs": r"^(?!.*(?:attn|attention|time_embedding|class_embedding|conv_in|conv_out|conv_norm_out))"
        r".*(?<!\.bias)$",
    }
    # Linear layers a fresh LoRA adapter wraps (--params lora): the attention projections.
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, network: torch.nn.Module, scheduler, *, source: str, fingerprint: str, **components):
        self.network = network
        self.scheduler = scheduler
        self.source = source
        self.fingerprint = fingerprint
        for name in self.components:
            setattr(self, name, components.get(name))
        self._alphas: torch.Tensor | None = None

    def with_network(self, network: torch.nn.Module, *, source: str, fingerprint: str) -> Denoiser:
        """The same family, scheduler and components around another network (e.g. a fine-tuned copy)."""
        components = {name: getattr(self, name) for name in self.components}
        return type(self)(network, self.scheduler, source=source, fingerprint=fingerprint, **components)

    def untrained_network(self, seed: int) -> torch.nn.Module:
        """A freshly initialised network of the same architecture: MUCS's reference of a loss that
        knows nothing (diffusers models rebuild from their config)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = type(self.network).from_config(self.network.config)
        dtype = next(self.network.parameters()).dtype
        if dtype != next(network.parameters()).dtype:  # diffusers warns on a cast to the same dtype
            network = network.to(dtype=dtype)
        return network.to(self.device).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> Denoiser:
        """Loads a local model folder; see :func:`diffattr.models.load_model` for the options."""
        from .models import load_model

        return load_model(path, **options)

    def fuse_lora(self, folder: Path) -> None:
        """Fuses a LoRA adapter into the weights, in place (families that support it override this)."""
        raise DiffattrError(f"--lora {folder}: LoRA adapters are supported for text-to-image pipelines only")

    # -- what the model is ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def is_latent(self) -> bool:
        return False

    @property
    def is_text_conditioned(self) -> bool:
        return False

    @property
    def num_classes(self) -> int | None:
        """Number of class labels of a class-conditional model, else ``None``."""
        return None

    @property
    def latent_scale_factor(self) -> int:
        """Pixels per side of one encoding position (1 for pixel-space models)."""
        return 1

    @property
    def resolution(self) -> int:
        """Side of the square images the model works at, in pixels."""
        size = self.network.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.latent_scale_factor

    @property
    def channels(self) -> int:
        """Image channels (1, 3 or 4)."""
        return self.network.config.in_channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one encoding, ``(C, H, W)``: an image, or a latent of a latent model."""
        size = self.resolution // self.latent_scale_factor
        return (self.network.config.in_channels, size, size)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self._alphas is None:
            self._alphas = self.scheduler.alphas_cumprod.to(torch.float32)
        return self._alphas

    # -- the forward process and the training target --------------------------------------------

    def _alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(timesteps.device)[timesteps]

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` at integer ``timesteps`` ``(B,)``."""
        alpha_bar = _broadcast(self._alpha_bar(timesteps), clean)
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: ε, ``v = √ᾱ ε − √(1−ᾱ) x_0``, or ``x_0``."""
        prediction_type = self.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return clean
        if prediction_type == "v_prediction":
            alpha_bar = _broadcast(self._alpha_bar(timesteps), clean)
            return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    # -- encodings, conditions, prediction (each family) ----------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Maps images ``(B, C, H, W)`` in ``[-1, 1]`` into the network's space."""
        return pixels

    def decode(self, encodings: torch.Tensor) -> torch.Tensor:
        """Maps encodings back to images in ``[-1, 1]`` (the inverse of :meth:`encode`)."""
        return encodings

    def conditions(
        self,
        ids: list[str],
        *,
        labels: list[int | None] | None = None,
        prompts: list[str | None] | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor | None:
        """The condition tensor for a batch of images, or ``None`` for an unconditional model.

        Args:
            ids: the images' ids, for error messages.
            labels: class label per image (class-conditional models; other models ignore them).
            prompts: caption or prompt per image (text-to-image models); ``None`` or ``""`` is the
                empty prompt, the unconditional branch.
        """
        return None

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor | None,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The network's output for a batch; ``network`` overrides the model's own (a perturbed copy)."""
        raise NotImplementedError


@register_denoiser
class PixelUNet(Denoiser):
    """A pixel-space ``UNet2DModel``, unconditional or class-conditional (``num_class_embeds``)."""

    family = "pixel-unet"
    network_class = "UNet2DModel"

    @property
    def num_classes(self) -> int | None:
        return self.network.config.get("num_class_embeds")

    def conditions(self, ids, *, labels=None, prompts=None, batch_size=64):
        """Long tensor ``(B,)`` of class labels for a class-conditional model, else ``None``."""
        if self.num_classes is None:
            return None
        labels = labels or [None] * len(ids)
        for label, image_id in zip(labels, ids):
            if label is None or not 0 <= label < self.num_classes:
                raise DiffattrError(
                    f"{image_id}: label {label!r} is not a class of this model (0..{self.num_classes - 1}); "
                    "give every image a `label` in metadata.jsonl, and queries --label"
                )
        return torch.tensor(labels, dtype=torch.long)

    def predict(self, noisy, timesteps, conditions, *, network=None):
        return (self.network if network is None else network)(noisy, timesteps, class_labels=conditions).sample


@register_denoiser
class LatentTextUNet(Denoiser):
    """A latent text-to-image model, Stable-Diffusion style: ``UNet2DConditionModel`` + ``AutoencoderKL``
    + a CLIP-style text encoder and its tokenizer.

    Encodings are the VAE posterior **mean** (not a sample, so an image always has the same
    encoding), shifted and scaled as the UNet was trained. Conditions are the text encoder's last
    hidden states; the loss uses the conditional branch only — classifier-free guidance is a
    sampling-time mix of two predictions, not what the model was trained to minimise.
    """

    family = "latent-text-unet"
    network_class = "UNet2DConditionModel"
    components = ("vae", "text_encoder", "tokenizer")
    parameter_groups: ClassVar[dict[str, str]] = {
        **Denoiser.parameter_groups,
        # Key and value projections of cross-attention (``attn2`` in diffusers' transformer blocks):
        # the text-to-image "custom diffusion" choice of Wang et al. 2024.
        "cross-attention-kv": r"attn2\.to_[kv]\.",
    }

    @property
    def is_latent(self) -> bool:
        return True

    @property
    def is_text_conditioned(self) -> bool:
        return True

    @property
    def latent_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.in_channels

    def _latent_affine(self) -> tuple[float, float]:
        config = self.vae.config
        return config.get("scaling_factor") or 1.0, config.get("shift_factor") or 0.0

    @torch.inference_mode()
    def encode(self, pixels):
        scale, shift = self._latent_affine()
        return (self.vae.encode(pixels.to(self.device)).latent_dist.mean - shift) * scale

    @torch.inference_mode()
    def decode(self, encodings):
        scale, shift = self._latent_affine()
        return self.vae.decode(encodings.to(self.device) / scale + shift).sample.clamp(-1, 1)

    def conditions(self, ids, *, labels=None, prompts=None, batch_size=64):
        """Float tensor ``(B, L, D)`` of the text encoder's last hidden states of each prompt."""
        return self.encode_prompts([p or "" for p in (prompts or [None] * len(ids))], batch_size=batch_size)

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """``(B, L, D)`` text-encoder hidden states of prompts, padded to the tokenizer's length."""
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                prompts[start : start + batch_size],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            chunks.append(self.text_encoder(tokens.input_ids.to(self.device))[0].float().cpu())
        return torch.cat(chunks)

    def predict(self, noisy, timesteps, conditions, *, network=None):
        return (self.network if network is None else network)(noisy, timesteps, encoder_hidden_states=conditions).sample

    def fuse_lora(self, folder: Path) -> None:
        """Loads a LoRA adapter (UNet and/or text encoder) and fuses it into the weights, in place.

        The fused model *is* the model being attributed: its training set is the base set ∪ the
        adapter's, and the perturbations of Forward-INF act on the fused weights.
        """
        import diffusers

        if not folder.is_dir():
            raise DiffattrError(
                f"--lora {folder}: no such folder (expected a folder with pytorch_lora_weights.safetensors)"
            )
        pipeline = diffusers.StableDiffusionPipeline(
            unet=self.network,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        try:
            pipeline.load_lora_weights(str(folder))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DiffattrError(f"--lora {folder}: cannot load this LoRA adapter ({error})") from None
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()  # keeps the fused weights, drops the adapter layers


# The name users know a loaded model by (``DiffusionModel.from_pretrained(folder)``).
DiffusionModel = Denoiser


def family_of(network_class: str) -> type[Denoiser] | None:
    """The registered family whose network is ``network_class``, else ``None``."""
    return next((cls for cls in DENOISERS.values() if cls.network_class == network_class), None)


def in_memory(network: torch.nn.Module, scheduler, **components) -> Denoiser:
    """A network and scheduler built in code (toy models, benchmarks) as a :class:`Denoiser`."""
    family = family_of(type(network).__name__)
    if family is None:
        raise DiffattrError(f"{type(network).__name__} is not a supported network ({sorted(DENOISERS)})")
    return family(network, scheduler, source="in memory", fingerprint="", **components)
