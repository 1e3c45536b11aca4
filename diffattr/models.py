"""Loading a diffusers model from a local folder into a :class:`~diffattr.denoisers.Denoiser`.

Accepted layouts:
- a pipeline folder with ``model_index.json``: the denoiser (``unet/`` or ``transformer/``),
  ``scheduler/`` and the components its family needs (``vae/``, ``text_encoder/``,
  ``text_encoder_2/``, ``tokenizer/``, …), each loaded by diffusers' or transformers'
  ``from_pretrained(folder, local_files_only=True)`` (``variant``: e.g. the fp16 weight files);
- a bare UNet folder (``config.json`` + weights) and a scheduler folder given separately, or found
  as ``scheduler/`` inside or beside the UNet folder.

The model family (what the engine calls on the model) is the registered
:class:`~diffattr.denoisers.Denoiser` of the denoiser's class and config (``denoisers.family_for``):
DDPM-style ``UNet2DModel``, Stable Diffusion 1/2, SDXL, DiT, PixArt and SD3; a LoRA adapter
(diffusers / peft / kohya format) is fused into the weights at load time through the pipeline's own
``load_lora_weights``. The training loss follows the scheduler: ε, v or x₀ (``prediction_type``)
for DDPM-family schedulers, the flow-matching velocity for ``FlowMatch*`` schedulers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import diffusers
import torch

from .data import file_digest
from .denoisers import DENOISERS, PREDICTION_TYPES, Denoiser, family_for, is_flow_matching, supported_networks
from .errors import DiffattrError

NETWORK_COMPONENTS = ("unet", "transformer")  # where a pipeline keeps its denoiser
# Component folders a pipeline may hold besides the network, and the classes they may be.
KNOWN_COMPONENTS = tuple(
    sorted({name for cls in DENOISERS.values() for name in (*cls.components, *cls.optional_components)})
)
_COMPONENT_CLASSES = {"vae": ("AutoencoderKL",)}
# Parts of a pipeline that play no role in its training loss.
_IGNORED_COMPONENTS = ("scheduler", "safety_checker", "feature_extractor", "image_encoder")
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
    """Returns the component folders (the denoiser as ``network``, and the others by their
    pipeline names) and the scheduler folder of a model path."""
    if not path.is_dir():
        raise DiffattrError(f"--model {path}: no such folder (expected a local diffusers model folder)")
    if (path / "model_index.json").is_file():
        index_file = path / "model_index.json"
        index = _read_json(index_file)
        listed = {name for name, value in index.items() if not name.startswith("_") and _is_component(value)}
        network = next((name for name in NETWORK_COMPONENTS if name in listed), None)
        if network is None:
            raise DiffattrError(
                f"{index_file}: this pipeline has no `unet` or `transformer` component "
                f"(it lists {sorted(listed) or 'none'})"
            )
        unknown = sorted(listed - {network, *KNOWN_COMPONENTS, *_IGNORED_COMPONENTS})
        if unknown:
            raise DiffattrError(
                f"{index_file}: components {unknown} are not supported (diffattr knows {list(KNOWN_COMPONENTS)})"
            )
        components = {"network": path / network}
        components.update({name: path / name for name in KNOWN_COMPONENTS if name in listed})
        for folder in components.values():
            if not folder.is_dir():
                raise DiffattrError(f"{index_file} lists `{folder.name}` but there is no {folder.name}/ folder")
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
        return {"network": path}, scheduler_path
    raise DiffattrError(f"--model {path}: neither a pipeline folder (model_index.json) nor a UNet folder (config.json)")


def _is_component(value) -> bool:
    """A ``model_index.json`` entry naming a component: ``[library, class]`` with a class."""
    return isinstance(value, list) and len(value) == 2 and value[1] is not None


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
    if is_flow_matching(scheduler):
        if scheduler.config.get("use_dynamic_shifting"):
            raise DiffattrError(
                f"{config_path}: use_dynamic_shifting (Flux-style, σ shifted by resolution) is not supported; "
                "SD3-style flow matching with a fixed `shift` is"
            )
        return scheduler
    if not hasattr(scheduler, "alphas_cumprod"):
        raise DiffattrError(
            f"{config_path}: {class_name} has no `alphas_cumprod`; use a DDPM-family or FlowMatch scheduler config"
        )
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


def _load_component(name: str, folder: Path, variant: str | None = None):
    """Loads the denoiser (``network``), ``vae``, a text encoder or a tokenizer from its folder, in float32."""
    if name.startswith("tokenizer"):
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise DiffattrError(f"tokenizer folder {folder}: cannot load the tokenizer ({error})") from None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DiffattrError(f"{folder.name} folder {folder} has no config.json")
    config = _read_json(config_path)
    if name.startswith("text_encoder"):
        import transformers

        architectures = config.get("architectures") or ["CLIPTextModel"]
        model_class = getattr(transformers, architectures[0], None) if isinstance(architectures[0], str) else None
        if model_class is None:
            raise DiffattrError(f"{config_path}: unknown text encoder class {architectures[0]!r}")
    else:
        class_name = config.get("_class_name")
        supported = _COMPONENT_CLASSES.get(name) or tuple(supported_networks())
        if class_name not in supported:
            raise DiffattrError(
                f"{config_path}: {class_name!r} is not supported as `{folder.name}` (supported: {', '.join(supported)})"
            )
        model_class = getattr(diffusers, class_name)
    try:
        model = model_class.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True, variant=variant)
    except Exception as error:  # a damaged or foreign weights file fails in many ways (pickle, safetensors, shapes)
        message = " ".join(str(error).split())[:300]
        raise DiffattrError(
            f"{folder.name} folder {folder}: cannot load the model ({type(error).__name__}: {message})"
        ) from None
    return model.requires_grad_(False).eval()


def _family_components(family: type[Denoiser], available: set[str], where: str) -> list[str]:
    """The components of ``available`` the family uses, refused when it lacks one it needs or
    when the pipeline holds one it would leave out (SDXL's ``text_encoder_2`` must not be dropped)."""
    missing = sorted(set(family.components) - available)
    if missing:
        raise DiffattrError(f"{where}: a {family.network_class} ({family.family}) also needs {missing}")
    unused = sorted(available - set(family.components) - set(family.optional_components))
    if unused:
        raise DiffattrError(
            f"{where}: a {family.network_class} ({family.family}) does not use {unused}; "
            f"it takes {list(family.components) or 'no other components'}"
        )
    return [name for name in (*family.components, *family.optional_components) if name in available]


def _family(network: torch.nn.Module, where: str) -> type[Denoiser]:
    family = family_for(network)
    if family is None:
        raise DiffattrError(
            f"{where}: a {type(network).__name__} is not supported (supported: {', '.join(supported_networks())})"
        )
    return family


def load_model(
    path: str | Path,
    *,
    scheduler: str | Path | None = None,
    lora: str | Path | None = None,
    variant: str | None = None,
    device: str | torch.device | None = None,
) -> Denoiser:
    """Loads a local model folder (see the module docstring for the layouts).

    Args:
        path: pipeline folder or bare UNet folder.
        scheduler: scheduler folder, for a bare UNet folder.
        lora: a LoRA adapter folder, fused into the weights (SD, SDXL and SD3 pipelines).
        variant: the weight files' variant (``fp16``: ``*.fp16.safetensors``); loaded in float32.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available).

    Raises:
        DiffattrError: the folder is missing, incomplete, or holds an unsupported model.
    """
    path = Path(path).expanduser()
    folders, scheduler_folder = _locate(path, Path(scheduler) if scheduler else None)
    scheduler = _load_scheduler(scheduler_folder)
    network_folder = folders.pop("network")
    with _quiet_loading():
        network = _load_component("network", network_folder, variant)
        family = _family(network, f"--model {path}")
        used = _family_components(family, set(folders), f"--model {path}")
        components = {name: _load_component(name, folders[name], variant) for name in used}
    digests = [_folder_digest(folder) for folder in (network_folder, *(folders[n] for n in used), scheduler_folder)]
    if lora is not None:
        digests.append(_folder_digest(Path(lora).expanduser()))
    if variant is not None:  # the folders hold every variant's files; which one was loaded matters
        digests.append(f"variant:{variant}")
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
    parts = {name: part for name, part in dict(getattr(pipeline, "components", {}) or {}).items() if part is not None}
    network_name = next((name for name in NETWORK_COMPONENTS if name in parts), None)
    network = parts.get(network_name)
    scheduler = parts.get("scheduler")
    where = type(pipeline).__name__
    if network is None:
        names = ", ".join(f"{name}: {type(part).__name__}" for name, part in parts.items())
        raise DiffattrError(
            f"{where} ({names or 'no components'}): diffattr supports pipelines whose unet or transformer is one of "
            f"{', '.join(supported_networks())}"
        )
    family = _family(network, where)
    used = _family_components(family, set(parts) & set(KNOWN_COMPONENTS), where)
    if not isinstance(scheduler, diffusers.SchedulerMixin):
        raise DiffattrError(f"{where}: needs a scheduler for its {type(network).__name__}")
    components = {name: parts[name] for name in used}
    digest = hashlib.sha256()
    for name, part in [(network_name, network), *components.items()]:
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
