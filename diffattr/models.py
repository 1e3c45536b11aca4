"""Loading a diffusers model from a local folder, and the calls the engine makes on it.

Accepted layouts:
- a pipeline folder with ``model_index.json``: ``unet/`` and ``scheduler/``, and for latent
  text-to-image models (Stable-Diffusion style) ``vae/``, ``text_encoder/`` and ``tokenizer/``;
- a bare UNet folder (``config.json`` + weights) and a scheduler folder given separately, or found
  as ``scheduler/`` inside or beside the UNet folder.

Models:
- pixel-space ``UNet2DModel``, unconditional or class-conditional (``num_class_embeds``);
- latent ``UNet2DConditionModel`` with an ``AutoencoderKL`` and a CLIP-style text encoder, optionally
  with a LoRA adapter (diffusers / peft format) fused into its weights at load time.

Every image is scored in the model's own space (``encode``: pixels, or the VAE latent mean ×
``scaling_factor``) under its own condition (``conditions``: a class label, or the text encoder's
hidden states of its caption). The denoising loss uses the conditional branch only: classifier-free
guidance is a sampling-time mix of two predictions, not what the model was trained to minimise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from .data import file_digest
from .errors import DiffattrError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_TO_IMAGE_COMPONENTS = ("vae", "text_encoder", "tokenizer")
SUPPORTED_CLASSES = {"unet": ("UNet2DModel", "UNet2DConditionModel"), "vae": ("AutoencoderKL",)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DiffattrError(f"{path}: cannot read this JSON file ({error})") from None


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{file_digest(path)}".encode())
    return digest.hexdigest()


def _locate(path: Path, scheduler_path: Path | None) -> tuple[dict[str, Path], Path]:
    """Returns the component folders (``unet`` and, for latent models, ``vae``, ``text_encoder``,
    ``tokenizer``) and the scheduler folder of a model path."""
    if not path.is_dir():
        raise DiffattrError(f"--model {path}: no such folder (expected a local diffusers model folder)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            raise DiffattrError(f"{path / 'model_index.json'}: this pipeline has no `unet` component")
        components = {name: path / name for name in ("unet", *TEXT_TO_IMAGE_COMPONENTS) if index.get(name)}
        present = [name for name in TEXT_TO_IMAGE_COMPONENTS if name in components]
        if present and len(present) < len(TEXT_TO_IMAGE_COMPONENTS):
            missing = sorted(set(TEXT_TO_IMAGE_COMPONENTS) - set(present))
            raise DiffattrError(f"{path / 'model_index.json'}: a latent text-to-image pipeline also needs {missing}")
        for name, folder in components.items():
            if not folder.is_dir():
                raise DiffattrError(f"{path}: model_index.json lists `{name}` but there is no {name}/ folder")
        return components, scheduler_path or path / "scheduler"
    if (path / "config.json").is_file():
        if scheduler_path is None:
            candidates = [path / "scheduler", path.parent / "scheduler"]
            scheduler_path = next((c for c in candidates if (c / "scheduler_config.json").is_file()), None)
            if scheduler_path is None:
                raise DiffattrError(
                    f"--model {path} is a bare UNet folder without a scheduler: pass --scheduler DIR "
                    "(a folder with scheduler_config.json)"
                )
        return {"unet": path}, scheduler_path
    raise DiffattrError(f"--model {path}: neither a pipeline folder (model_index.json) nor a UNet folder (config.json)")


def _load_scheduler(folder: Path):
    config_path = folder / "scheduler_config.json"
    if not config_path.is_file():
        raise DiffattrError(f"scheduler folder {folder} has no scheduler_config.json (pass --scheduler DIR)")
    class_name = _read_json(config_path).get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise DiffattrError(f"{config_path}: unknown scheduler class {class_name!r}")
    scheduler = scheduler_class.from_pretrained(folder)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise DiffattrError(f"{config_path}: {class_name} has no `alphas_cumprod`; use a DDPM-family scheduler config")
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DiffattrError(f"{config_path}: prediction_type {prediction_type!r} is not supported ({PREDICTION_TYPES})")
    return scheduler


@contextlib.contextmanager
def _quiet_loading():
    """Silences the libraries' per-file progress bars and notices while diffattr loads a model."""
    diffusers_level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        transformers_level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(diffusers_level)
        if transformers is not None:
            transformers.logging.set_verbosity(transformers_level)
            transformers.logging.enable_progress_bar()


def _load_component(name: str, folder: Path):
    """Loads ``unet``, ``vae``, ``text_encoder`` or ``tokenizer`` from its folder, in float32."""
    if name == "tokenizer":
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise DiffattrError(f"tokenizer folder {folder}: cannot load the tokenizer ({error})") from None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DiffattrError(f"{name} folder {folder} has no config.json")
    config = _read_json(config_path)
    if name == "text_encoder":
        import transformers

        architectures = config.get("architectures") or ["CLIPTextModel"]
        model_class = getattr(transformers, architectures[0], None)
        if model_class is None:
            raise DiffattrError(f"{config_path}: unknown text encoder class {architectures[0]!r}")
    else:
        class_name = config.get("_class_name")
        if class_name not in SUPPORTED_CLASSES[name]:
            raise DiffattrError(
                f"{config_path}: {class_name!r} is not supported as `{name}` (supported: {SUPPORTED_CLASSES[name]})"
            )
        model_class = getattr(diffusers, class_name)
    try:
        model = model_class.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise DiffattrError(f"{name} folder {folder}: cannot load the model ({error})") from None
    return model.requires_grad_(False).eval()


def _fuse_lora(components: dict, scheduler, lora: Path) -> None:
    """Loads a LoRA adapter (UNet and/or text encoder) and fuses it into the weights, in place.

    The fused model *is* the model being attributed: its training set is the base set ∪ the
    adapter's, and the perturbations of Forward-INF act on the fused weights.
    """
    if "text_encoder" not in components:
        raise DiffattrError(f"--lora {lora}: LoRA adapters are supported for text-to-image pipelines only")
    if not lora.is_dir():
        raise DiffattrError(f"--lora {lora}: no such folder (expected a folder with pytorch_lora_weights.safetensors)")
    pipeline = diffusers.StableDiffusionPipeline(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    try:
        pipeline.load_lora_weights(str(lora))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise DiffattrError(f"--lora {lora}: cannot load this LoRA adapter ({error})") from None
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()  # keeps the fused weights, drops the adapter layers


@dataclass
class DiffusionModel:
    """A denoising UNet with its noise schedule, ready for forward-only scoring.

    Attributes:
        unet: the network, in eval mode, on ``device``. Never modified by diffattr.
        scheduler: the diffusers scheduler that defines ``alphas_cumprod`` and ``prediction_type``.
        source: where the model was loaded from.
        fingerprint: content hash of the weights and configs (and of the LoRA adapter).
        vae: the autoencoder of a latent model, else ``None``.
        text_encoder: the text encoder of a text-to-image model, else ``None``.
        tokenizer: its tokenizer, else ``None``.
    """

    unet: torch.nn.Module
    scheduler: object
    source: str
    fingerprint: str
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        scheduler: str | Path | None = None,
        lora: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> DiffusionModel:
        """Loads a local model folder (see the module docstring for the layouts).

        Args:
            path: pipeline folder or bare UNet folder.
            scheduler: scheduler folder, for a bare UNet folder.
            lora: a LoRA adapter folder, fused into the weights (text-to-image pipelines).
            device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).

        Raises:
            DiffattrError: the folder is missing, incomplete, or holds an unsupported model.
        """
        path = Path(path).expanduser()
        folders, scheduler_folder = _locate(path, Path(scheduler) if scheduler else None)
        scheduler = _load_scheduler(scheduler_folder)
        with _quiet_loading():
            components = {name: _load_component(name, folder) for name, folder in folders.items()}
        is_conditional_unet = type(components["unet"]).__name__ == "UNet2DConditionModel"
        if is_conditional_unet != ("text_encoder" in components):
            raise DiffattrError(
                f"--model {path}: a UNet2DConditionModel needs vae/, text_encoder/ and tokenizer/ in a pipeline "
                "folder, and a UNet2DModel takes none of them"
            )
        if lora is not None:
            with _quiet_loading():
                _fuse_lora(components, scheduler, Path(lora).expanduser())
        digests = [_folder_digest(folder) for folder in (*folders.values(), scheduler_folder)]
        if lora is not None:
            digests.append(_folder_digest(Path(lora).expanduser()))
        device = resolve_device(device)
        for name, component in components.items():
            if name != "tokenizer":
                component.to(device)
        source = str(path.resolve()) + ("" if lora is None else f" + LoRA {Path(lora).expanduser().resolve()}")
        return cls(
            components["unet"],
            scheduler,
            source,
            hashlib.sha256("".join(digests).encode()).hexdigest(),
            vae=components.get("vae"),
            text_encoder=components.get("text_encoder"),
            tokenizer=components.get("tokenizer"),
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def is_text_conditioned(self) -> bool:
        return self.text_encoder is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.is_latent else 1

    @property
    def resolution(self) -> int:
        """Side of the square images the model works at, in pixels."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def channels(self) -> int:
        """Image channels (1, 3 or 4)."""
        return self.vae.config.in_channels if self.is_latent else self.unet.config.in_channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one encoding, ``(C, H, W)``: an image, or a latent of a latent model."""
        size = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, size, size)

    @property
    def num_classes(self) -> int | None:
        """Number of class labels of a class-conditional model, else ``None``."""
        return self.unet.config.get("num_class_embeds")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    def _latent_affine(self) -> tuple[float, float]:
        config = self.vae.config
        return config.get("scaling_factor") or 1.0, config.get("shift_factor") or 0.0

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Maps images ``(B, C, H, W)`` in ``[-1, 1]`` into the model's space.

        Pixel models: unchanged. Latent models: the VAE posterior **mean** (not a sample, so an
        image always has the same encoding), shifted and scaled as the UNet was trained.
        """
        if not self.is_latent:
            return pixels
        scale, shift = self._latent_affine()
        return (self.vae.encode(pixels.to(self.device)).latent_dist.mean - shift) * scale

    @torch.inference_mode()
    def decode(self, encodings: torch.Tensor) -> torch.Tensor:
        """Maps encodings back to images in ``[-1, 1]`` (the inverse of :meth:`encode`)."""
        if not self.is_latent:
            return encodings
        scale, shift = self._latent_affine()
        return self.vae.decode(encodings.to(self.device) / scale + shift).sample.clamp(-1, 1)

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

        Returns:
            Long tensor ``(B,)`` of labels, or float tensor ``(B, L, D)`` of the text encoder's
            last hidden states, or ``None``.
        """
        labels = labels or [None] * len(ids)
        if self.is_text_conditioned:
            return self.encode_prompts([p or "" for p in (prompts or [None] * len(ids))], batch_size=batch_size)
        if self.num_classes is None:
            return None
        for label, image_id in zip(labels, ids):
            if label is None or not 0 <= label < self.num_classes:
                raise DiffattrError(
                    f"{image_id}: label {label!r} is not a class of this model (0..{self.num_classes - 1}); "
                    "give every image a `label` in metadata.jsonl, and queries --label"
                )
        return torch.tensor(labels, dtype=torch.long)

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

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor | None,
        *,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The network's output for a batch; ``unet`` overrides the model's own (a perturbed copy)."""
        return run_unet(self.unet if unet is None else unet, noisy, timesteps, conditions)


def run_unet(
    unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor | None
) -> torch.Tensor:
    """One forward pass: conditions are text hidden states for a ``UNet2DConditionModel``, class
    labels (or ``None``) for a ``UNet2DModel``."""
    if isinstance(unet, diffusers.UNet2DConditionModel):
        return unet(noisy, timesteps, encoder_hidden_states=conditions).sample
    return unet(noisy, timesteps, class_labels=conditions).sample
