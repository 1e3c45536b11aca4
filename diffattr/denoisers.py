"""The Denoiser interface: everything the engine asks of a model family, and the family registry.

A :class:`Denoiser` wraps one trained network (a UNet or a transformer) with its noise schedule and
the parts around it. The engine only calls:

- ``encode`` / ``decode``: images ``(B, C, H, W)`` in ``[-1, 1]`` ↔ the network's space;
- ``conditions``: the condition tensor of a batch (class labels, text-encoder states, or ``None``);
- ``add_noise`` / ``target``: the forward process at integer timesteps and the training target
  (what the network was trained to output: ε, v or x₀, from the scheduler's ``prediction_type``;
  the velocity ε − x₀ for a flow-matching scheduler, SD3's ``FlowMatchEulerDiscreteScheduler``);
- ``predict``: one forward pass of the network, or of a perturbed copy of it, at integer grid
  timesteps (``call_network`` takes the network's own timestep values, as a sampler does);
- ``parameter_groups`` / ``lora_targets``: named sets of parameters a perturbation may move.

Conditions of several parts (SDXL's hidden states, pooled embedding and time ids; PixArt's hidden
states and attention mask) travel as one flat ``(B, F)`` float tensor per batch, packed by the
family and unpacked in its ``call_network``: the engine, the store and the shards see one tensor.

Each family is one subclass registered with :func:`register_denoiser`; :func:`family_for` picks the
family whose ``network_class`` matches a network and whose :meth:`Denoiser.accepts` takes its
config. Adding a family is one subclass here and its test.
"""

from __future__ import annotations

import math
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
    optional_components: ClassVar[tuple[str, ...]] = ()  # components it uses when the pipeline has them
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
        for name in (*self.components, *self.optional_components):
            setattr(self, name, components.get(name))
        self._alphas: torch.Tensor | None = None
        self._flow: tuple[torch.Tensor, torch.Tensor] | None = None

    def with_network(self, network: torch.nn.Module, *, source: str, fingerprint: str) -> Denoiser:
        """The same family, scheduler and components around another network (e.g. a fine-tuned copy)."""
        components = {name: getattr(self, name) for name in (*self.components, *self.optional_components)}
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

    @classmethod
    def accepts(cls, config) -> bool:
        """Whether a network of ``network_class`` with this config belongs to the family."""
        return True

    @property
    def is_flow_matching(self) -> bool:
        """A rectified-flow model (SD3, Flux): ``x_t = (1 − σ) x₀ + σ ε``, trained on ``ε − x₀``."""
        return is_flow_matching(self.scheduler)

    @property
    def prediction_type(self) -> str:
        if self.is_flow_matching:
            return "flow_matching"
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self._alphas is None:
            self._alphas = self.scheduler.alphas_cumprod.to(torch.float32)
        return self._alphas

    def _flow_schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ, network timesteps)`` of a flow-matching scheduler, ascending in the integer t.

        Read from a fresh scheduler of the same config, as diffusers' SD3 training scripts read
        them (the shift applied, ``set_timesteps`` never called): grid step t ↔ σ_t, timestep σ_t·T.
        """
        if self._flow is None:
            fresh = type(self.scheduler).from_config(self.scheduler.config)
            self._flow = (fresh.sigmas.flip(0).to(torch.float32), fresh.timesteps.flip(0).to(torch.float32))
        return self._flow

    # -- the forward process and the training target --------------------------------------------

    def _alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(timesteps.device)[timesteps]

    def _sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self._flow_schedule()[0].to(timesteps.device)[timesteps]

    def network_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's timestep input at integer grid ``timesteps`` (σ_t·T for flow matching)."""
        if self.is_flow_matching:
            return self._flow_schedule()[1].to(timesteps.device)[timesteps]
        return timesteps

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` (flow matching: ``(1 − σ_t) x_0 + σ_t ε``)
        at integer ``timesteps`` ``(B,)``."""
        if self.is_flow_matching:
            sigma = _broadcast(self._sigma(timesteps), clean)
            return (1 - sigma) * clean + sigma * noise
        alpha_bar = _broadcast(self._alpha_bar(timesteps), clean)
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: ε, ``v = √ᾱ ε − √(1−ᾱ) x_0``, ``x_0``, or the
        flow-matching velocity ``ε − x_0``."""
        prediction_type = self.prediction_type
        if prediction_type == "flow_matching":
            return noise - clean
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
        """The network's output for a batch at integer grid ``timesteps``; ``network`` overrides the
        model's own (a perturbed copy)."""
        return self.call_network(noisy, self.network_timesteps(timesteps), conditions, network=network)

    def call_network(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor | None,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The network's output at its own timestep values (a scheduler's ``timesteps``)."""
        raise NotImplementedError


def class_labels(ids: list[str], labels: list[int | None] | None, num_classes: int) -> torch.Tensor:
    """Long tensor ``(B,)`` of class labels, each checked against the model's classes."""
    labels = labels or [None] * len(ids)
    for label, image_id in zip(labels, ids):
        if label is None:
            raise DiffattrError(
                f"{image_id}: no class label, and this model is class-conditional (0..{num_classes - 1}): "
                "give queries --label, and training images a label (a metadata label column, or class sub-folders)"
            )
        if not 0 <= label < num_classes:
            raise DiffattrError(f"{image_id}: label {label!r} is not a class of this model (0..{num_classes - 1})")
    return torch.tensor(labels, dtype=torch.long)


def pack(*parts: torch.Tensor) -> torch.Tensor:
    """Several per-image condition tensors ``(B, ...)`` as one flat ``(B, F)`` float32 tensor."""
    return torch.cat([part.float().flatten(1).cpu() for part in parts], dim=1)


def unpack(packed: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The inverse of :func:`pack`, given each part's per-image shape."""
    sizes = [math.prod(shape) for shape in shapes]
    if packed.shape[1] != sum(sizes):
        raise DiffattrError(
            f"conditions of {packed.shape[1]} values per image, the model expects {sum(sizes)}: "
            "they were encoded by another text encoder; delete the run directory's encodings/ to recompute"
        )
    return [part.reshape(len(packed), *shape) for part, shape in zip(packed.split(sizes, dim=1), shapes)]


def is_flow_matching(scheduler) -> bool:
    """Whether a scheduler is a rectified-flow one (``FlowMatchEulerDiscreteScheduler``, …)."""
    return type(scheduler).__name__.startswith("FlowMatch")


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
        return None if self.num_classes is None else class_labels(ids, labels, self.num_classes)

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        return (self.network if network is None else network)(noisy, timesteps, class_labels=conditions).sample


class LatentDenoiser(Denoiser):
    """A network working on the latents of an ``AutoencoderKL`` (``vae``).

    Encodings are the VAE posterior **mean** (not a sample, so an image always has the same
    encoding), shifted and scaled as the network was trained (``shift_factor``, ``scaling_factor``).
    """

    components: ClassVar[tuple[str, ...]] = ("vae",)
    lora_pipeline: ClassVar[str | None] = None  # the diffusers pipeline whose load_lora_weights fuses a LoRA

    @property
    def is_latent(self) -> bool:
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

    def _learned_sigma_dropped(self, output: torch.Tensor) -> torch.Tensor:
        """DiT and PixArt also output a variance (twice the latent channels): the loss is on the
        noise half, as their pipelines sample with it."""
        channels = self.network.config.in_channels
        return output[:, :channels] if output.shape[1] == 2 * channels else output

    def fuse_lora(self, folder: Path) -> None:
        """Loads a LoRA adapter through the family's pipeline's own ``load_lora_weights`` (the
        denoiser and/or its text encoders) and fuses it into the weights, in place.

        The fused model *is* the model being attributed: its training set is the base set ∪ the
        adapter's, and the perturbations of Forward-INF act on the fused weights.
        """
        import inspect

        import diffusers

        if self.lora_pipeline is None:
            raise DiffattrError(
                f"--lora {folder}: diffusers has no load_lora_weights for {self.network_class} pipelines; merge the "
                "adapter into the weights (peft's merge_and_unload) and save the merged model"
            )
        if not folder.is_dir():
            raise DiffattrError(
                f"--lora {folder}: no such folder (expected a folder with pytorch_lora_weights.safetensors)"
            )
        pipeline_class = getattr(diffusers, self.lora_pipeline)
        parameters = inspect.signature(pipeline_class.__init__).parameters
        parts = {"unet" if "unet" in parameters else "transformer": self.network, "scheduler": self.scheduler}
        parts.update({name: getattr(self, name) for name in self.components})
        optional = {name: None for name in parameters if name not in parts and name not in ("self", "kwargs")}
        if "requires_safety_checker" in optional:
            optional["requires_safety_checker"] = False
        pipeline = pipeline_class(**parts, **optional)
        try:
            pipeline.load_lora_weights(str(folder))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DiffattrError(f"--lora {folder}: cannot load this LoRA adapter ({error})") from None
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()  # keeps the fused weights, drops the adapter layers


class TextConditioned(LatentDenoiser):
    """A latent text-to-image model; conditions come from :meth:`encode_prompts`.

    The loss uses the conditional branch only — classifier-free guidance is a sampling-time mix of
    two predictions, not what the model was trained to minimise.
    """

    @property
    def is_text_conditioned(self) -> bool:
        return True

    def conditions(self, ids, *, labels=None, prompts=None, batch_size=64):
        return self.encode_prompts([p or "" for p in (prompts or [None] * len(ids))], batch_size=batch_size)

    def encode_prompts(self, prompts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """The condition tensor of each prompt, computed in batches, on the CPU."""
        with torch.inference_mode():
            chunks = [self._encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return torch.cat(chunks)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _tokens(self, tokenizer, prompts: list[str], max_length: int | None = None):
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A CLIP text encoder's penultimate hidden states ``(B, L, D)`` (what SDXL and SD3 condition
        on) and its first output: the projected pooled embedding of ``CLIPTextModelWithProjection``."""
        output = encoder(self._tokens(tokenizer, prompts).input_ids.to(self.device), output_hidden_states=True)
        return output.hidden_states[-2].float(), output[0].float()


@register_denoiser
class LatentTextUNet(TextConditioned):
    """Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` + ``AutoencoderKL`` + a CLIP-style text
    encoder and its tokenizer. Conditions are the text encoder's last hidden states ``(B, L, D)``."""

    family = "latent-text-unet"
    network_class = "UNet2DConditionModel"
    components = ("vae", "text_encoder", "tokenizer")
    lora_pipeline = "StableDiffusionPipeline"
    parameter_groups: ClassVar[dict[str, str]] = {
        **Denoiser.parameter_groups,
        # Key and value projections of cross-attention (``attn2`` in diffusers' transformer blocks):
        # the text-to-image "custom diffusion" choice of Wang et al. 2024.
        "cross-attention-kv": r"attn2\.to_[kv]\.",
    }

    @classmethod
    def accepts(cls, config) -> bool:
        return config.get("addition_embed_type") is None

    def _encode(self, prompts):
        return self.text_encoder(self._tokens(self.tokenizer, prompts).input_ids.to(self.device))[0].float().cpu()

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        network = self.network if network is None else network
        return network(noisy, timesteps, encoder_hidden_states=conditions.to(noisy.device)).sample


@register_denoiser
class SDXLUNet(TextConditioned):
    """SDXL: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` and two CLIP text
    encoders, conditioned as diffusers' SDXL training script does: the two encoders' penultimate
    hidden states side by side, the second's pooled projection, and the time ids (original size,
    crop top-left, target size) of an uncropped square image at the model's resolution."""

    family = "sdxl-unet"
    network_class = "UNet2DConditionModel"
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    lora_pipeline = "StableDiffusionXLPipeline"
    parameter_groups = LatentTextUNet.parameter_groups

    @classmethod
    def accepts(cls, config) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def _shapes(self) -> list[tuple[int, ...]]:
        length = self.tokenizer.model_max_length
        return [(length, self.network.config.cross_attention_dim), (self.text_encoder_2.config.projection_dim,), (6,)]

    def _encode(self, prompts):
        first, _ = self._clip(self.tokenizer, self.text_encoder, prompts)
        second, pooled = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(len(prompts), 6)
        return pack(torch.cat([first, second], dim=-1), pooled, time_ids)

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        hidden, pooled, time_ids = (part.to(noisy.device) for part in unpack(conditions, self._shapes()))
        network = self.network if network is None else network
        extra = {"text_embeds": pooled, "time_ids": time_ids}
        return network(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=extra).sample


@register_denoiser
class DiTTransformer(LatentDenoiser):
    """DiT: a class-conditional latent transformer (``DiTTransformer2DModel``) with its VAE."""

    family = "dit"
    network_class = "DiTTransformer2DModel"

    @property
    def num_classes(self) -> int | None:
        return self.network.config.num_embeds_ada_norm

    def conditions(self, ids, *, labels=None, prompts=None, batch_size=64):
        return class_labels(ids, labels, self.num_classes)

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        network = self.network if network is None else network
        output = network(noisy, timestep=timesteps, class_labels=conditions.to(noisy.device)).sample
        return self._learned_sigma_dropped(output)


@register_denoiser
class PixArtTransformer(TextConditioned):
    """PixArt-α/Σ: ``PixArtTransformer2DModel`` with a T5 text encoder. Conditions: T5's hidden
    states and their attention mask, at 300 tokens (padding is masked out, so the length only
    decides what a long caption loses); the resolution/aspect-ratio conditions of the 1024-pixel
    models are those of an uncropped square image at the model's resolution."""

    family = "pixart"
    network_class = "PixArtTransformer2DModel"
    components = ("vae", "text_encoder", "tokenizer")
    max_tokens = 300

    def _shapes(self) -> list[tuple[int, ...]]:
        return [(self.max_tokens, self.network.config.caption_channels), (self.max_tokens,)]

    def _encode(self, prompts):
        tokens = self._tokens(self.tokenizer, prompts, self.max_tokens)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return pack(hidden, mask)

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        hidden, mask = (part.to(noisy.device) for part in unpack(conditions, self._shapes()))
        network = self.network if network is None else network
        extra = {"resolution": None, "aspect_ratio": None}
        if network.config.sample_size == 128:  # PixArt's 1024-pixel models take them (use_additional_conditions)
            size = torch.tensor([[self.resolution, self.resolution]], dtype=noisy.dtype, device=noisy.device)
            extra = {"resolution": size.expand(len(noisy), 2), "aspect_ratio": size.new_ones(len(noisy), 1)}
        inputs = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "added_cond_kwargs": extra}
        output = network(noisy, timestep=timesteps, **inputs).sample
        return self._learned_sigma_dropped(output)


@register_denoiser
class SD3Transformer(TextConditioned):
    """Stable Diffusion 3: an MMDiT (``SD3Transformer2DModel``) trained by flow matching, with two
    CLIP text encoders and an optional T5 (``text_encoder_3``). Conditioned as its pipeline encodes
    prompts: the CLIP encoders' penultimate hidden states side by side, zero-padded to the joint
    width and followed by T5's 256 tokens (zeros without a T5, added at the call rather than
    stored), and both pooled projections."""

    family = "sd3"
    network_class = "SD3Transformer2DModel"
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3")
    lora_pipeline = "StableDiffusion3Pipeline"
    t5_tokens = 256

    @property
    def _has_t5(self) -> bool:
        return getattr(self, "text_encoder_3", None) is not None

    def _shapes(self) -> list[tuple[int, ...]]:
        config = self.network.config
        # Without a T5 its 256 tokens are zeros: made at the call, not stored for every image.
        length = self.tokenizer.model_max_length + (self.t5_tokens if self._has_t5 else 0)
        return [(length, config.joint_attention_dim), (config.pooled_projection_dim,)]

    def _encode(self, prompts):
        first, pooled_first = self._clip(self.tokenizer, self.text_encoder, prompts)
        second, pooled_second = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        width = self.network.config.joint_attention_dim
        clip = torch.cat([first, second], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        pooled = torch.cat([pooled_first, pooled_second], dim=-1)
        if not self._has_t5:
            return pack(clip, pooled)
        ids = self._tokens(self.tokenizer_3, prompts, self.t5_tokens).input_ids.to(self.device)
        return pack(torch.cat([clip, self.text_encoder_3(ids)[0].float()], dim=1), pooled)

    def call_network(self, noisy, timesteps, conditions, *, network=None):
        hidden, pooled = (part.to(noisy.device) for part in unpack(conditions, self._shapes()))
        if not self._has_t5:  # the pipeline's zeros in T5's place: they take part in joint attention
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, self.t5_tokens))
        network = self.network if network is None else network
        return network(noisy, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timesteps).sample


# The name users know a loaded model by (``DiffusionModel.from_pretrained(folder)``).
DiffusionModel = Denoiser


def family_for(network: torch.nn.Module) -> type[Denoiser] | None:
    """The registered family of a network (its class, and its config where a class serves two
    families: SD's and SDXL's UNet), else ``None``."""
    name, config = type(network).__name__, getattr(network, "config", {})
    return next((cls for cls in DENOISERS.values() if cls.network_class == name and cls.accepts(config)), None)


def supported_networks() -> list[str]:
    return sorted({cls.network_class for cls in DENOISERS.values()})


def in_memory(network: torch.nn.Module, scheduler, **components) -> Denoiser:
    """A network and scheduler built in code (toy models, benchmarks) as a :class:`Denoiser`."""
    family = family_for(network)
    if family is None:
        raise DiffattrError(f"{type(network).__name__} is not a supported network ({supported_networks()})")
    return family(network, scheduler, source="in memory", fingerprint="", **components)
