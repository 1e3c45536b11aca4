"""Loading a diffusers model from a local folder into a :class:`~diffattr.denoisers.Denoiser`.

Accepted layouts:
- a pipeline folder with ``model_index.json``: ``unet/`` and ``scheduler/``, and for latent
  text-to-image models (Stable-Diffusion style) ``vae/``, ``text_encoder/`` and ``tokenizer/``;
- a bare UNet folder (``config.json`` + weights) and a scheduler folder given separately, or found
  as ``scheduler/`` inside or beside the UNet folder.

The model family (what the engine calls on the model) is the registered
:class:`~diffattr.denoisers.Denoiser` whose network class matches the ``unet`` folder's: a
pixel-space ``UNet2DModel`` (unconditional or class-conditional), or a latent
``UNet2DConditionModel`` with an ``AutoencoderKL`` and a CLIP-style text encoder, optionally with a
LoRA adapter (diffusers / peft format) fused into its weights at load time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import diffusers
import torch

from .data import file_digest
from .denoisers import DENOISERS, PREDICTION_TYPES, Denoiser, LatentTextUNet, family_of
from .errors import DiffattrError

# Component folders a pipeline may hold besides the network, and the classes they may be.
TEXT_TO_IMAGE_COMPONENTS = LatentTextUNet.components
_COMPONENT_CLASSES = {"vae": ("AutoencoderKL",)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else the CPU.

    Raises:
        DiffattrError: not a device name, or a device this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DiffattrError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:1, mps, …") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DiffattrError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise DiffattrError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 … cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DiffattrError(f"--device {device}: MPS is not available here; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise DiffattrError(f"--device {device}: diffattr runs on cpu, cuda or mps")
    return resolved


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: JSON or UTF-8 decoding
        raise DiffattrError(f"{path}: cannot read this JSON file ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise DiffattrError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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
    scheduler_class = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise DiffattrError(
            f"{config_path}: _class_name {class_name!r} is not a diffusers scheduler class (e.g. DDPMScheduler)"
        )
    try:
        scheduler = scheduler_class.from_pretrained(folder)
    except Exception as error:  # diffusers raises many types for a config it cannot use
        raise DiffattrError(f"{config_path}: cannot load this scheduler ({type(error).__name__}: {error})") from None
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
        supported = _COMPONENT_CLASSES.get(name) or tuple(family.network_class for family in DENOISERS.values())
        if class_name not in supported:
            raise DiffattrError(f"{config_path}: {class_name!r} is not supported as `{name}` (supported: {supported})")
        model_class = getattr(diffusers, class_name)
    try:
        model = model_class.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    except Exception as error:  # a damaged or foreign weights file fails in many ways (pickle, safetensors, shapes)
        message = " ".join(str(error).split())[:300]
        raise DiffattrError(
            f"{name} folder {folder}: cannot load the model ({type(error).__name__}: {message})"
        ) from None
    return model.requires_grad_(False).eval()


def load_model(
    path: str | Path,
    *,
    scheduler: str | Path | None = None,
    lora: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Denoiser:
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
    network = components.pop("unet")
    family = family_of(type(network).__name__)
    if set(family.components) != set(components):
        raise DiffattrError(
            f"--model {path}: a UNet2DConditionModel needs vae/, text_encoder/ and tokenizer/ in a pipeline "
            "folder, and a UNet2DModel takes none of them"
        )
    digests = [_folder_digest(folder) for folder in (*folders.values(), scheduler_folder)]
    if lora is not None:
        digests.append(_folder_digest(Path(lora).expanduser()))
    source = str(path.resolve()) + ("" if lora is None else f" + LoRA {Path(lora).expanduser().resolve()}")
    fingerprint = hashlib.sha256("".join(digests).encode()).hexdigest()
    model = family(network, scheduler, source=source, fingerprint=fingerprint, **components)
    if lora is not None:
        with _quiet_loading():
            model.fuse_lora(Path(lora).expanduser())
    device = resolve_device(device)
    for component in (network, *components.values()):
        if isinstance(component, torch.nn.Module):
            component.to(device)
    return model


def load_pipeline(pipeline, *, device: str | torch.device | None = None) -> Denoiser:
    """A loaded diffusers pipeline (e.g. ``StableDiffusionPipeline.from_pretrained(dir)``) as a Denoiser.

    Its modules are used as they are (put in eval mode, gradients off; moved only when ``device``
    is given); its fingerprint hashes every weight and config, so a run directory still knows
    which weights its numbers came from.

    Raises:
        DiffattrError: the pipeline's denoiser is not a supported network, or a component the
            family needs is missing.
    """
    parts = dict(getattr(pipeline, "components", {}) or {})
    network, scheduler = parts.get("unet"), parts.get("scheduler")
    family = family_of(type(network).__name__) if network is not None else None
    if family is None:
        names = ", ".join(f"{name}: {type(part).__name__}" for name, part in parts.items() if part is not None)
        raise DiffattrError(
            f"{type(pipeline).__name__} ({names or 'no components'}): diffattr supports pipelines whose unet is "
            f"one of {', '.join(sorted(cls.network_class for cls in DENOISERS.values()))}"
        )
    missing = [name for name in family.components if parts.get(name) is None]
    if missing or not isinstance(scheduler, diffusers.SchedulerMixin):
        raise DiffattrError(f"{type(pipeline).__name__}: needs {', '.join(missing or ['a scheduler'])} for its unet")
    components = {name: parts[name] for name in family.components}
    digest = hashlib.sha256()
    for name, part in [("unet", network), *components.items()]:
        digest.update(name.encode())
        if isinstance(part, torch.nn.Module):
            for key, tensor in sorted(part.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
        if hasattr(part, "get_vocab"):  # a tokenizer
            digest.update(json.dumps(part.get_vocab(), sort_keys=True).encode())
        config = getattr(part, "config", None)
        if config is not None:  # diffusers' FrozenDict, or a transformers PretrainedConfig
            values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    digest.update(json.dumps(dict(scheduler.config), sort_keys=True, default=str).encode())
    source = f"{type(pipeline).__name__} object" + (
        f" ({pipeline.name_or_path})" if getattr(pipeline, "name_or_path", None) else ""
    )
    target = None if device is None else resolve_device(device)
    for part in (network, *components.values()):
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
            if target is not None:
                part.to(target)
    return family(network, scheduler, source=source, fingerprint=digest.hexdigest(), **components)
