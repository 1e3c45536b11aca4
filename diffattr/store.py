"""The run directory: every artifact diffattr writes, in safetensors and JSON, written atomically.

```
<run-dir>/config.json               what shaped the numbers (checked on every reuse), versions
<run-dir>/ids.json                  training ids, in the row order of every tensor below
<run-dir>/encodings/                "encodings" (N, C, H, W) [, "conditions" (N, ...)], row shards (shards.py)
<run-dir>/baseline.safetensors      "baseline" (N, K), "timesteps" (K,)
<run-dir>/calibration.safetensors   "reference" (N,), "indices" (R,): the `calibrated` aggregation's reference,
                                    with the attribution settings it holds for in its metadata
<run-dir>/null_loss.json            {"null_loss": L_null}: an untrained network's mean loss (--null-stop only)
<run-dir>/fisher-<hash>.safetensors  {parameter name: F}: AbU's diagonal Fisher (--ewc-weight only), per
                                    (moved parameters, images), with those settings in its metadata
<run-dir>/methods/<method>-<hash>.safetensors  "features": a baseline's training features, per setting
<run-dir>/queries/<query-id>/result.json       query, top-k, config, timings
<run-dir>/queries/<query-id>/scores.safetensors "scores" (N,), "deltas" (N, K), "after" (N, K)
<run-dir>/queries/<query-id>/query.png          the query as the model saw it (its digest and the
                                                folder's name are in the stamp of the two files above)
<run-dir>/inputs/<hash>.png         query images given as objects (PIL images, tensors), as 8-bit PNGs
<run-dir>/audit/                    the memorization audit (see audit.py)
```
:class:`RunDirectory` is the only code that knows this layout; everything else asks it. A second
run whose settings differ from the saved ones is refused with the differing fields: numbers
computed under one configuration are never silently mixed with another's.

Every cached artifact also carries the run's *stamp* (a hash of the checked model, data and scoring
sections: safetensors metadata ``diffattr.stamp``, a ``"stamp"`` field of JSON objects) and is
checked against it when read, with its tensors' keys, shapes, dtypes and finiteness: a file left
from another run (``config.json`` deleted or replaced by hand) or damaged on disk is refused by
name, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed
from .config import AttributionConfig, ScoringConfig, config_differences, with_defaults
from .errors import DiffattrError
from .files import atomic_write

CONFIG_FILE = "config.json"
IDS_FILE = "ids.json"
ENCODINGS_DIR = "encodings"
BASELINE_FILE = "baseline.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
NULL_LOSS_FILE = "null_loss.json"
QUERIES_DIR = "queries"
METHODS_DIR = "methods"
FISHER_PREFIX = "fisher"
RESULT_FILE = "result.json"
SCORES_FILE = "scores.safetensors"
QUERY_IMAGE_FILE = "query.png"
INPUTS_DIR = "inputs"
# The memorization audit (audit.py): a folder of the run directory, and its files relative to it.
AUDIT_DIR = "audit"
AUDIT_CONFIG_FILE = "config.json"
AUDIT_REPORT_FILE = "report.json"
AUDIT_SCORES_FILE = "scores.safetensors"
AUDIT_NEIGHBOURS_FILE = "neighbours.safetensors"
AUDIT_SAMPLES_FILE = "samples.safetensors"
AUDIT_REPLICAS_FILE = "replicas.json"
AUDIT_REPLICAS_DIR = "replicas"
AUDIT_LEAKAGE_FILE = "leakage.json"
AUDIT_MISLABELED_FILE = "mislabeled.json"
AUDIT_MISLABELED_LOSSES_FILE = "mislabeled.safetensors"
# Sections of config.json whose values shape the numbers; the rest (paths, versions) is information.
CHECKED_SECTIONS = ("model", "data", "scoring", "attribution")
UNCHECKED_KEYS = {"source", "root"}
STAMP_KEY = "diffattr.stamp"  # safetensors metadata key of an artifact's run stamp
LOCK_FILE = ".lock"


def write_json(path: Path, value) -> None:
    """Strict JSON (no bare NaN or Infinity: any other reader must parse it), written atomically."""
    try:
        text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    except ValueError as error:
        raise DiffattrError(f"{path}: refusing to write a non-finite number ({error})") from None
    atomic_write(Path(path), lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_json(path: Path, *, advice: str = "delete it to recompute"):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: JSON or UTF-8 decoding
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise DiffattrError(f"{path}: cannot read this JSON file ({reason}); {advice}") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    atomic_write(Path(path), lambda p: save_file(tensors, p, metadata=metadata))


@dataclass(frozen=True)
class Expected:
    """What a cached tensor must look like: its shape (``None`` for any size, a trailing ``...``
    for any further dimensions), whether it holds float32 (what diffattr writes) or integers, and
    whether the floats must be finite (``finite=False``: ±inf allowed as padding, never NaN)."""

    shape: tuple
    floating: bool = True
    finite: bool = True
    nan: bool = False  # NaN allowed (a placeholder for rows still to compute)


def check_tensor(path: Path, key: str, tensor: torch.Tensor, expected: Expected) -> None:
    shape = expected.shape
    free = bool(shape) and shape[-1] is Ellipsis
    fixed = shape[:-1] if free else shape
    fits = (len(tensor.shape) >= len(fixed) if free else len(tensor.shape) == len(fixed)) and all(
        size is None or size == actual for size, actual in zip(fixed, tensor.shape)
    )
    problem = None
    if not fits:
        wanted = "(" + ", ".join("any" if s is None else "…" if s is Ellipsis else str(s) for s in shape) + ")"
        problem = f"{key!r} has shape {tuple(tensor.shape)}, expected {wanted}"
    elif not (tensor.dtype == torch.float32 if expected.floating else not tensor.dtype.is_floating_point):
        problem = f"{key!r} has dtype {tensor.dtype}, expected {'float32' if expected.floating else 'integers'}"
    elif expected.floating and expected.finite and not torch.isfinite(tensor).all():
        problem = f"{key!r} holds NaN or infinite values"
    elif expected.floating and not expected.nan and torch.isnan(tensor).any():
        problem = f"{key!r} holds NaN values"
    if problem:
        raise DiffattrError(f"{path}: {problem}; delete it to recompute")


def read_tensors(
    path: Path, expected: dict[str, Expected] | None = None, *, stamp: str | None = None
) -> dict[str, torch.Tensor]:
    """A safetensors file, checked: its run ``stamp`` (when given) and the tensors of ``expected``.

    Raises:
        DiffattrError: naming the file: unreadable or truncated, written under another stamp, a key
            missing, or a tensor of another shape or dtype, or holding NaN or infinite values.
    """
    with _opened(path, stamp) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, wanted in (expected or {}).items():
        if key not in tensors:
            raise DiffattrError(f"{path}: no tensor {key!r} (holds {sorted(tensors)}); delete it to recompute")
        check_tensor(path, key, tensors[key], wanted)
    return tensors


def read_header(path: Path, stamp: str) -> list[str]:
    """The tensor names of a safetensors file that carries ``stamp``, read from its header alone.

    Raises:
        DiffattrError: naming the file: unreadable or truncated, or written under another stamp.
    """
    with _opened(path, stamp) as handle:
        return list(handle.keys())


@contextlib.contextmanager
def _opened(path: Path, stamp: str | None):
    """A safetensors file opened for reading, its ``stamp`` checked (when given); any failure while
    it is open, the reader's own included, is one error naming the file."""
    try:
        with safe_open(path, framework="pt") as handle:
            if stamp is not None:
                _check_stamp(path, (handle.metadata() or {}).get(STAMP_KEY), stamp)
            yield handle
    except DiffattrError:
        raise
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise DiffattrError(f"{path}: cannot read this safetensors file ({error}); delete it to recompute") from None


def present(path: Path) -> bool:
    """Whether an artifact has been written: ``True`` for a file, ``False`` when nothing is there.

    Raises:
        DiffattrError: something else (a folder, a dangling link) stands in the artifact's place.
    """
    if path.is_file():
        return True
    if path.exists() or path.is_symlink():
        raise DiffattrError(f"{path} is not a file (a folder or a broken link in an artifact's place): remove it")
    return False


def _check_stamp(path: Path, found: str | None, stamp: str) -> None:
    if found != stamp:
        raise DiffattrError(
            f"{path} was computed under other settings than the run directory's {CONFIG_FILE} (another model, "
            "data set or scoring grid, or an older diffattr), or edited since: delete it to recompute, or use a "
            "new --run-dir"
        )


def _unstamped(path: Path, value, stamp: str) -> dict:
    """A JSON artifact's object without its stamp, refused unless it is an object with ``stamp``."""
    if not isinstance(value, dict):
        raise DiffattrError(f"{path}: expected a JSON object; delete it to recompute")
    _check_stamp(path, value.get("stamp"), stamp)
    return {key: item for key, item in value.items() if key != "stamp"}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors' names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}/{tensor.dtype}/{tuple(tensor.shape)}/".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def ids_digest(ids: list[str]) -> str:
    """The hash of the training ids in row order (``config.json``'s ``data.ids_digest``)."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def run_stamp(config: dict, *, with_attribution: bool = False) -> str:
    """The hash of what shaped every cached number: the checked model, data and scoring sections
    (and the attribution section, for what a perturbation produced: Forward-INF's query results)."""
    sections = ("model", "data", "scoring", "attribution") if with_attribution else ("model", "data", "scoring")
    core = _checked({section: config[section] for section in sections if section in config})
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def _checked(config: dict) -> dict:
    checked = {
        section: {key: value for key, value in config[section].items() if key not in UNCHECKED_KEYS}
        for section in CHECKED_SECTIONS
        if section in config
    }
    if "attribution" in checked:
        checked["attribution"] = with_defaults(AttributionConfig, checked["attribution"])
    if "scoring" in checked:  # the fingerprint's fields only: a run made before --dtype was fp32
        checked["scoring"] = {**ScoringConfig().fingerprint(), **checked["scoring"]}
    return checked


def _settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class RunDirectory:
    """Reads and writes one run directory; owns its layout, the one settings check and the stamps.

    Args:
        path: the folder (created on first write).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise DiffattrError(f"--run-dir {self.path} exists and is not a folder")
        self._config: dict | None = None  # config.json as last read or written by this object
        self.wrote_settings = False  # whether this object wrote config.json into a directory that had none

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return present(self.file(name))

    # -- config.json and ids.json: what shaped the numbers ---------------------------------------

    def load_config(self) -> dict | None:
        """The saved ``config.json`` (read once per object), or ``None`` before the first write."""
        path = self.file(CONFIG_FILE)
        if self._config is None and (path.exists() or path.is_symlink()):
            redo = "delete the run directory to recompute, or use a new --run-dir"
            if not path.is_file():
                raise DiffattrError(f"{path} is not a file; {redo}")
            config = read_json(path, advice=redo)
            if not isinstance(config, dict):
                raise DiffattrError(f"{path}: expected a JSON object; {redo}")
            if not all(section in config for section in ("model", "data", "scoring")):
                # e.g. a model folder's own config.json: adding a run's sections to it would change the model
                raise DiffattrError(
                    f"{path} is not a diffattr run's config.json (no model, data and scoring sections): "
                    f"--run-dir {self.path} is another program's folder; use a new --run-dir"
                )
            for section in (*CHECKED_SECTIONS, "versions"):
                if section in config and not isinstance(config[section], dict):
                    raise DiffattrError(f"{path}: section {section!r} is not a JSON object; {redo}")
            self._config = config
        return self._config

    @property
    def stamp(self) -> str:
        """The run stamp every cached artifact of this directory carries (after the settings check)."""
        return self.stamp_of(with_attribution=False)

    def stamp_of(self, *, with_attribution: bool) -> str:
        """:attr:`stamp`, or the stamp of what also depends on the attribution settings."""
        config = self.load_config()
        if config is None:
            raise RuntimeError("the run directory's settings are checked before any artifact is read or written")
        return run_stamp(config, with_attribution=with_attribution)

    @contextlib.contextmanager
    def _locked(self):
        """Holds the run directory's lock file: two processes checking and writing config.json at
        once cannot both believe their settings are the saved ones."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the check is then racy between processes)
            yield
            return
        if not distributed.is_main():  # rank 0 checks for all (the others would wait on it in a barrier)
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(LOCK_FILE), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_or_write_config(self, config: dict) -> None:
        """Saves ``config``, or verifies it against the saved one.

        Sections absent from the saved config (e.g. ``attribution`` after ``cache``) are added.

        Raises:
            DiffattrError: a saved field differs; the message lists every difference.
        """
        with self._locked():
            self._config = None  # another process may have written it since this object read it
            saved = self.load_config()
            if saved is None:
                self._write_config(config)
                self.wrote_settings = True
                return
            shared = {s: config[s] for s in CHECKED_SECTIONS if s in config and s in saved}
            differences = config_differences(_checked({s: saved[s] for s in shared}), _checked(shared))
            if differences:
                raise DiffattrError(
                    f"--run-dir {self.path} was made with other settings ({'; '.join(differences)}): "
                    "use a new --run-dir, or rerun with the saved settings"
                )
            missing = {section: config[section] for section in config if section not in saved}
            if missing:
                self._write_config({**saved, **missing})

    def forget_section(self, section: str) -> None:
        """Removes one section of ``config.json`` that a failed run added before anything was
        computed under it (the attribution settings of a perturbation that diverged)."""
        with self._locked():
            self._config = None
            saved = self.load_config()
            if saved is not None and section in saved:
                self._write_config({key: value for key, value in saved.items() if key != section})

    def forget_settings(self) -> None:
        """Removes ``config.json`` and ``ids.json``: a first run that failed before computing
        anything (a bad training image) leaves no settings behind to refuse the fixed rerun.
        Only the settings this object wrote: those of a run started beside it are not its to remove."""
        if self.wrote_settings and distributed.is_main():
            for name in (CONFIG_FILE, IDS_FILE):
                self.file(name).unlink(missing_ok=True)
        distributed.barrier()
        self._config = None
        self.wrote_settings = False

    def _write_config(self, config: dict) -> None:
        write_json(self.file(CONFIG_FILE), config)
        self._config = config

    def read_ids(self) -> list[str] | None:
        if not self.exists(IDS_FILE):
            return None
        ids = read_json(self.file(IDS_FILE))
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise DiffattrError(f"{self.file(IDS_FILE)}: expected a list of training ids; delete it to recompute")
        return ids

    def check_or_write_ids(self, ids: list[str]) -> None:
        """Saves the training ids (the row order of every tensor), or refuses other ones."""
        saved = self.read_ids()
        if saved is None:
            write_json(self.file(IDS_FILE), ids)
        elif saved != ids:
            raise DiffattrError(f"{self.file(IDS_FILE)} lists other images; use a new --run-dir")

    # -- stamped artifacts -----------------------------------------------------------------------

    def save_tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, *, stamp: str | None = None
    ) -> None:
        """Writes a safetensors artifact with this run's stamp (or ``stamp``)."""
        write_tensors(path, tensors, {**(metadata or {}), STAMP_KEY: stamp or self.stamp})

    def load_tensors(
        self, path: Path, expected: dict[str, Expected] | None = None, *, stamp: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Reads a safetensors artifact, refused unless it carries this run's stamp (or ``stamp``)
        and fits ``expected``."""
        return read_tensors(path, expected, stamp=stamp or self.stamp)

    def save_json(self, path: Path, value: dict, *, stamp: str | None = None) -> None:
        """Writes a JSON-object artifact with this run's stamp (or ``stamp``)."""
        write_json(path, {**value, "stamp": stamp or self.stamp})

    def load_json(self, path: Path, *, stamp: str | None = None) -> dict:
        """Reads a JSON-object artifact of :meth:`save_json`, refused unless it carries this run's
        stamp (or ``stamp``)."""
        return _unstamped(path, read_json(path), stamp or self.stamp)

    # -- cached tensors --------------------------------------------------------------------------

    @property
    def encodings_dir(self) -> Path:
        return self.file(ENCODINGS_DIR)

    def read_baseline(self, timesteps: torch.Tensor, num_images: int) -> torch.Tensor | None:
        """B ``(N, K)``, checked against the run's grid ``timesteps`` ``(K,)``, or ``None`` before it exists."""
        if not self.exists(BASELINE_FILE):
            return None
        path = self.file(BASELINE_FILE)
        expected = {"baseline": Expected((num_images, len(timesteps))), "timesteps": Expected((len(timesteps),), False)}
        saved = self.load_tensors(path, expected)
        if not torch.equal(saved["timesteps"], timesteps.to(saved["timesteps"].dtype)):
            raise DiffattrError(f"{path}: computed on another timestep grid; delete it to recompute")
        return saved["baseline"]

    def read_timesteps(self) -> torch.Tensor | None:
        """The grid of the saved baseline, ``(K,)``, or ``None`` before it exists."""
        if not self.exists(BASELINE_FILE):
            return None
        return self.load_tensors(self.file(BASELINE_FILE), {"timesteps": Expected((None,), False)})["timesteps"]

    def write_baseline(self, baseline: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.save_tensors(self.file(BASELINE_FILE), {"baseline": baseline, "timesteps": timesteps})

    def read_calibration(self, settings: dict, num_images: int) -> torch.Tensor | None:
        """The calibration reference computed under exactly these attribution ``settings``, else ``None``."""
        if not self.exists(CALIBRATION_FILE):
            return None
        path = self.file(CALIBRATION_FILE)
        try:
            with safe_open(path, framework="pt") as handle:
                saved = (handle.metadata() or {}).get("attribution")
        except Exception as error:  # safetensors raises its own types for truncated or foreign files
            raise DiffattrError(
                f"{path}: cannot read this safetensors file ({error}); delete it to recompute"
            ) from None
        try:
            saved = None if saved is None else json.loads(saved)
        except json.JSONDecodeError:
            saved = None  # unreadable settings: recompute rather than trust the numbers
        if not isinstance(saved, dict) or with_defaults(AttributionConfig, saved) != settings:
            return None
        expected = {"reference": Expected((num_images,)), "indices": Expected((None,), False)}
        return self.load_tensors(path, expected)["reference"]

    def write_calibration(self, reference: torch.Tensor, indices: torch.Tensor, settings: dict) -> None:
        """Saves the calibration with the attribution settings it was computed under."""
        metadata = {"attribution": json.dumps(settings, sort_keys=True)}
        self.save_tensors(self.file(CALIBRATION_FILE), {"reference": reference, "indices": indices}, metadata)

    def read_null_loss(self) -> float | None:
        if not self.exists(NULL_LOSS_FILE):
            return None
        number = self.load_json(self.file(NULL_LOSS_FILE)).get("null_loss")
        if not (
            isinstance(number, (int, float)) and not isinstance(number, bool) and 0 < number < 3e38  # float32
        ):
            raise DiffattrError(
                f'{self.file(NULL_LOSS_FILE)}: expected {{"null_loss": <number>}}; delete it to recompute'
            )
        return float(number)

    def write_null_loss(self, value: float) -> None:
        self.save_json(self.file(NULL_LOSS_FILE), {"null_loss": value})

    def _per_setting_file(self, stem: str, settings: dict) -> Path:
        """``<stem>-<hash of the settings>.safetensors``: one file per setting, never another's."""
        return self.file(f"{stem}-{_settings_digest(settings)[:12]}.safetensors")

    def features_dir(self, method: str, settings: dict) -> tuple[Path, str]:
        """Where a baseline's ``(N, ...)`` training features under these settings are sharded
        (``methods/<method>-<hash of the settings>/``, see ``shards.py``), and the stamp its shards
        carry: the run's with the settings, so features of another run or setting are refused."""
        digest = _settings_digest(settings)
        stamp = hashlib.sha256(f"{self.stamp}:{method}:{digest}".encode()).hexdigest()
        return self.file(f"{METHODS_DIR}/{method}-{digest[:12]}"), stamp

    def read_fisher(self, settings: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
        """AbU's Fisher saved under exactly these settings (moved parameters, images), else ``None``;
        ``shapes``: the moved parameters' names and shapes, the tensors the file must hold."""
        path = self._per_setting_file(FISHER_PREFIX, settings)
        if not present(path):
            return None
        fisher = self.load_tensors(path, {name: Expected(tuple(shape)) for name, shape in shapes.items()})
        negative = [name for name in shapes if (fisher[name] < 0).any()]
        if negative:  # a sum of squared gradients: a negative entry would reward moving that weight
            raise DiffattrError(f"{path}: {negative[0]!r} holds negative values; delete it to recompute")
        return {name: fisher[name] for name in shapes}

    def write_fisher(self, settings: dict, fisher: dict[str, torch.Tensor]) -> None:
        self.save_tensors(self._per_setting_file(FISHER_PREFIX, settings), fisher, {"settings": json.dumps(settings)})

    # -- per-query results -----------------------------------------------------------------------

    def query_dir(self, query_id: str) -> Path:
        return self.path / QUERIES_DIR / query_id

    def save_result(self, query_id: str, record: dict, tensors: dict[str, torch.Tensor], query_image) -> None:
        """Writes one query's ``scores.safetensors``, ``query.png`` and ``result.json`` (last: done).

        Args:
            query_image: ``(C, H, W)`` pixels in ``[-1, 1]``, the query as the model saw it.
        """
        from .data import save_image

        folder = self.query_dir(query_id)
        save_image(query_image, folder / QUERY_IMAGE_FILE)  # first: the stamp holds its digest
        record = {**record, "tensors_sha256": tensors_digest(tensors)}  # the stamp covers the record, so these too
        stamp = self._result_stamp(record, folder)
        self.save_tensors(folder / SCORES_FILE, tensors, stamp=stamp)
        self.save_json(folder / RESULT_FILE, record, stamp=stamp)

    def _result_stamp(self, record: dict, folder: Path) -> str:
        """The stamp of one query's files: the run's (with the attribution settings for a
        Forward-INF result; a baseline's does not depend on them), the query folder's name, the
        digest of its ``query.png`` and that of the record itself (its ranking, prompt, label), so
        that files moved between query folders, and edited results, are refused."""
        image = folder / QUERY_IMAGE_FILE
        if not present(image):
            raise DiffattrError(f"{image} is missing; delete the folder {folder} to recompute the query")
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        unstamped = {key: value for key, value in record.items() if key != "stamp"}
        content = hashlib.sha256(json.dumps(unstamped, sort_keys=True).encode()).hexdigest()
        run = self.stamp_of(with_attribution=record.get("method") == "forward-inf")
        return hashlib.sha256(f"{run}/{folder.name}/{digest}/{content}".encode()).hexdigest()[:16]

    def save_input(self, content: bytes, suffix: str = ".png") -> Path:
        """Keeps a query given as an object as an image file named by its content (once per content)."""
        path = self.path / INPUTS_DIR / f"image-{hashlib.sha256(content).hexdigest()[:16]}{suffix}"
        if not present(path):
            atomic_write(path, lambda temporary: Path(temporary).write_bytes(content))
        return path

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is, or could become, a file of this run directory (a report written
        there would overwrite or join it): anything in its folders, and its own file names."""
        try:
            relative = Path(path).expanduser().resolve().relative_to(self.path.resolve())
        except ValueError:
            return False
        own = {CONFIG_FILE, IDS_FILE, BASELINE_FILE, CALIBRATION_FILE, NULL_LOSS_FILE, LOCK_FILE}
        return len(relative.parts) != 1 or relative.name in own or relative.name.startswith(FISHER_PREFIX)

    def query_folders(self) -> list[Path]:
        """The folders of every finished query, sorted by name."""
        folder = self.path / QUERIES_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if (p / RESULT_FILE).is_file())

    def load_result(self, folder: Path, num_images: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
        """A query folder's ``result.json`` and its tensors, refused unless both were computed
        under this run's settings (and neither was edited); ``scores`` is ``(N,)``."""
        source = folder / RESULT_FILE
        value = read_json(source)  # once: which stamp it must carry depends on its method
        if not isinstance(value, dict):
            raise DiffattrError(f"{source}: expected a JSON object; delete it to recompute")
        stamp = self._result_stamp(value, folder)
        result = _unstamped(source, value, stamp)
        scores = folder / SCORES_FILE
        # −inf: an image a --candidates query left out
        expected = {"scores": Expected((num_images,), finite=False)}
        if not present(scores):  # the ranking of result.json alone would stand unchecked beside other queries'
            raise DiffattrError(f"{scores} is missing; delete the folder {folder} to recompute the query")
        tensors = self.load_tensors(scores, expected, stamp=stamp)
        if result.get("tensors_sha256") != tensors_digest(tensors):
            _check_stamp(scores, None, stamp)  # its numbers were edited, its stamp kept
        if (tensors["scores"] == float("inf")).any():
            raise DiffattrError(f"{scores}: 'scores' holds +inf; delete the folder to recompute")
        return result, tensors

    @staticmethod
    def query_image(folder: Path) -> Path:
        return folder / QUERY_IMAGE_FILE

    @staticmethod
    def result_file(folder: Path) -> Path:
        return folder / RESULT_FILE

    # -- the audit -------------------------------------------------------------------------------

    @property
    def audit_dir(self) -> Path:
        return self.file(AUDIT_DIR)

    def audit_file(self, name: str) -> Path:
        """A file of the audit folder, by its ``AUDIT_*`` name."""
        return self.audit_dir / name
