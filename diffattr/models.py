"""Loading a diffusers model from a local folder, and the one call the engine makes on it.

Accepted layouts:
- a pipeline folder with ``model_index.json`` (e.g. a saved ``DDPMPipeline``): ``unet/`` and
  ``scheduler/`` subfolders;
- a bare UNet folder (``config.json`` + weights) and a scheduler folder given separately, or found
  as ``scheduler/`` inside or beside the UNet folder.

Pixel-space ``UNet2DModel`` models, unconditional or class-conditional (``num_class_embeds``).
The condition of an image is carried as a tensor next to its encoding, so latent text-to-image
models plug in by adding an encoder and a condition kind, not by changing the engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from .data import file_digest
from .errors import DiffattrError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
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


def _locate(path: Path, scheduler_path: Path | None) -> tuple[Path, Path]:
    """Returns the UNet folder and the scheduler folder of a model path."""
    if not path.is_dir():
        raise DiffattrError(f"--model {path}: no such folder (expected a local diffusers model folder)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            raise DiffattrError(f"{path / 'model_index.json'}: this pipeline has no `unet` component")
        return path / "unet", scheduler_path or path / "scheduler"
    if (path / "config.json").is_file():
        if scheduler_path is None:
            candidates = [path / "scheduler", path.parent / "scheduler"]
            scheduler_path = next((c for c in candidates if (c / "scheduler_config.json").is_file()), None)
            if scheduler_path is None:
                raise DiffattrError(
                    f"--model {path} is a bare UNet folder without a scheduler: pass --scheduler DIR "
                    "(a folder with scheduler_config.json)"
                )
        return path, scheduler_path
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


@dataclass
class DiffusionModel:
    """A denoising UNet with its noise schedule, ready for forward-only scoring.

    Attributes:
        unet: the network, in eval mode, on ``device``. Never modified by diffattr.
        scheduler: the diffusers scheduler that defines ``alphas_cumprod`` and ``prediction_type``.
        source: where the model was loaded from.
        fingerprint: content hash of the weights and configs.
    """

    unet: torch.nn.Module
    scheduler: object
    source: str
    fingerprint: str

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        scheduler: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> DiffusionModel:
        """Loads a local model folder (see the module docstring for the layouts).

        Raises:
            DiffattrError: the folder is missing, incomplete, or holds an unsupported model.
        """
        path = Path(path).expanduser()
        unet_folder, scheduler_folder = _locate(path, Path(scheduler) if scheduler else None)
        config_path = unet_folder / "config.json"
        if not config_path.is_file():
            raise DiffattrError(f"UNet folder {unet_folder} has no config.json")
        class_name = _read_json(config_path).get("_class_name")
        if class_name != "UNet2DModel":
            raise DiffattrError(
                f"{config_path}: {class_name!r} is not supported yet; diffattr scores pixel-space UNet2DModel models"
            )
        scheduler = _load_scheduler(scheduler_folder)
        try:
            unet = diffusers.UNet2DModel.from_pretrained(unet_folder, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as error:
            raise DiffattrError(f"UNet folder {unet_folder}: cannot load the model ({error})") from None
        unet.requires_grad_(False).eval().to(resolve_device(device))
        fingerprint = hashlib.sha256(
            (_folder_digest(unet_folder) + _folder_digest(scheduler_folder)).encode()
        ).hexdigest()
        return cls(unet, scheduler, str(path.resolve()), fingerprint)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one encoding, ``(C, H, W)``."""
        return (self.channels, self.resolution, self.resolution)

    @property
    def num_classes(self) -> int | None:
        """Number of class labels of a class-conditional model, else ``None``."""
        return self.unet.config.num_class_embeds

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Maps images ``(B, C, H, W)`` in ``[-1, 1]`` into the model's space (pixels: unchanged)."""
        return pixels

    def conditions(self, labels: list[int | None], ids: list[str]) -> torch.Tensor | None:
        """The condition tensor for a batch of images, or ``None`` for an unconditional model.

        Args:
            labels: class label per image (from metadata.jsonl or ``--label``).
            ids: the images' ids, for error messages.

        Returns:
            Long tensor of shape ``(B,)`` for class-conditional models, else ``None``.
        """
        if self.num_classes is None:
            return None
        for label, image_id in zip(labels, ids):
            if label is None or not 0 <= label < self.num_classes:
                raise DiffattrError(
                    f"{image_id}: label {label!r} is not a class of this model (0..{self.num_classes - 1}); "
                    "give every image a `label` in metadata.jsonl, and queries --label"
                )
        return torch.tensor(labels, dtype=torch.long)

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor | None,
        *,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The network's output for a batch; ``unet`` overrides the model's own (a perturbed copy)."""
        unet = self.unet if unet is None else unet
        return unet(noisy, timesteps, class_labels=conditions).sample
