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
<run-dir>/queries/<query-id>/query.png          the query as the model saw it
<run-dir>/audit/                    the memorization audit (see audit.py)
```
:class:`RunDirectory` is the only code that knows this layout; everything else asks it. A second
run whose settings differ from the saved ones is refused with the differing fields: numbers
computed under one configuration are never silently mixed with another's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def write_json(path: Path, value) -> None:
    atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DiffattrError(f"{path}: cannot read this JSON file ({error}); delete it to recompute") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    atomic_write(Path(path), lambda p: save_file(tensors, p, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise DiffattrError(f"{path}: cannot read this safetensors file ({error}); delete it to recompute") from None


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


class RunDirectory:
    """Reads and writes one run directory; owns its layout and the one settings check.

    Args:
        path: the folder (created on first write).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise DiffattrError(f"--run-dir {self.path} exists and is not a folder")
        self._config: dict | None = None  # config.json as last read or written by this object

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    # -- config.json and ids.json: what shaped the numbers ---------------------------------------

    def load_config(self) -> dict | None:
        """The saved ``config.json`` (read once per object), or ``None`` before the first write."""
        if self._config is None and self.exists(CONFIG_FILE):
            config = read_json(self.file(CONFIG_FILE))
            if not isinstance(config, dict):
                raise DiffattrError(
                    f"{self.file(CONFIG_FILE)}: expected a JSON object; delete the run directory to recompute"
                )
            self._config = config
        return self._config

    def check_or_write_config(self, config: dict) -> None:
        """Saves ``config``, or verifies it against the saved one.

        Sections absent from the saved config (e.g. ``attribution`` after ``cache``) are added.

        Raises:
            DiffattrError: a saved field differs; the message lists every difference.
        """
        saved = self.load_config()
        if saved is None:
            self._write_config(config)
            return
        shared = {section: config[section] for section in CHECKED_SECTIONS if section in config and section in saved}
        differences = config_differences(_checked({section: saved[section] for section in shared}), _checked(shared))
        if differences:
            raise DiffattrError(
                f"--run-dir {self.path} was made with other settings ({'; '.join(differences)}): "
                "use a new --run-dir, or rerun with the saved settings"
            )
        missing = {section: config[section] for section in config if section not in saved}
        if missing:
            self._write_config({**saved, **missing})

    def _write_config(self, config: dict) -> None:
        write_json(self.file(CONFIG_FILE), config)
        self._config = config

    def read_ids(self) -> list[str] | None:
        if not self.exists(IDS_FILE):
            return None
        ids = read_json(self.file(IDS_FILE))
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise DiffattrError(f"{self.file(IDS_FILE)}: expected a list of training ids")
        return ids

    def check_or_write_ids(self, ids: list[str]) -> None:
        """Saves the training ids (the row order of every tensor), or refuses other ones."""
        saved = self.read_ids()
        if saved is None:
            write_json(self.file(IDS_FILE), ids)
        elif saved != ids:
            raise DiffattrError(f"{self.file(IDS_FILE)} lists other images; use a new --run-dir")

    # -- cached tensors --------------------------------------------------------------------------

    @property
    def encodings_dir(self) -> Path:
        return self.file(ENCODINGS_DIR)

    def read_baseline(self) -> torch.Tensor | None:
        return read_tensors(self.file(BASELINE_FILE))["baseline"] if self.exists(BASELINE_FILE) else None

    def read_timesteps(self) -> torch.Tensor | None:
        return read_tensors(self.file(BASELINE_FILE)).get("timesteps") if self.exists(BASELINE_FILE) else None

    def write_baseline(self, baseline: torch.Tensor, timesteps: torch.Tensor) -> None:
        write_tensors(self.file(BASELINE_FILE), {"baseline": baseline, "timesteps": timesteps})

    def read_calibration(self, settings: dict) -> torch.Tensor | None:
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
        return read_tensors(path)["reference"]

    def write_calibration(self, reference: torch.Tensor, indices: torch.Tensor, settings: dict) -> None:
        """Saves the calibration with the attribution settings it was computed under."""
        metadata = {"attribution": json.dumps(settings, sort_keys=True)}
        write_tensors(self.file(CALIBRATION_FILE), {"reference": reference, "indices": indices}, metadata=metadata)

    def read_null_loss(self) -> float | None:
        if not self.exists(NULL_LOSS_FILE):
            return None
        value = read_json(self.file(NULL_LOSS_FILE))
        number = value.get("null_loss") if isinstance(value, dict) else None
        if not (
            isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) and number > 0
        ):
            raise DiffattrError(
                f'{self.file(NULL_LOSS_FILE)}: expected {{"null_loss": <number>}}; delete it to recompute'
            )
        return float(number)

    def write_null_loss(self, value: float) -> None:
        write_json(self.file(NULL_LOSS_FILE), {"null_loss": value})

    def _per_setting_file(self, stem: str, settings: dict) -> Path:
        """``<stem>-<hash of the settings>.safetensors``: one file per setting, never another's."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return self.file(f"{stem}-{digest}.safetensors")

    def read_features(self, method: str, settings: dict) -> torch.Tensor | None:
        """A baseline's training features saved under exactly these settings, else ``None``."""
        path = self._per_setting_file(f"{METHODS_DIR}/{method}", settings)
        return read_tensors(path)["features"] if path.is_file() else None

    def write_features(self, method: str, settings: dict, features: torch.Tensor) -> None:
        metadata = {"settings": json.dumps(settings)}
        path = self._per_setting_file(f"{METHODS_DIR}/{method}", settings)
        write_tensors(path, {"features": features}, metadata=metadata)

    def read_fisher(self, settings: dict) -> dict[str, torch.Tensor] | None:
        """AbU's Fisher saved under exactly these settings (moved parameters, images), else ``None``."""
        path = self._per_setting_file(FISHER_PREFIX, settings)
        return read_tensors(path) if path.is_file() else None

    def write_fisher(self, settings: dict, fisher: dict[str, torch.Tensor]) -> None:
        write_tensors(self._per_setting_file(FISHER_PREFIX, settings), fisher, {"settings": json.dumps(settings)})

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
        write_tensors(folder / SCORES_FILE, tensors)
        save_image(query_image, folder / QUERY_IMAGE_FILE)
        write_json(folder / RESULT_FILE, record)

    def query_folders(self) -> list[Path]:
        """The folders of every finished query, sorted by name."""
        folder = self.path / QUERIES_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if (p / RESULT_FILE).is_file())

    @staticmethod
    def load_result(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        """A query folder's ``result.json`` and its tensors (empty when there are none)."""
        source = folder / RESULT_FILE
        result = read_json(source)
        if not isinstance(result, dict):
            raise DiffattrError(f"{source}: expected a JSON object; delete the folder to recompute")
        tensors = read_tensors(folder / SCORES_FILE) if (folder / SCORES_FILE).is_file() else {}
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
