"""The run directory: every artifact diffattr writes, in safetensors and JSON, written atomically.

```
<run-dir>/config.json               what shaped the numbers (checked on every reuse), versions
<run-dir>/ids.json                  training ids, in the row order of every tensor below
<run-dir>/encodings/                "encodings" (N, C, H, W) [, "conditions" (N, ...)], row shards (shards.py)
<run-dir>/baseline.safetensors      "baseline" (N, K), "timesteps" (K,)
<run-dir>/calibration.safetensors   "reference" (N,), "indices" (R,): the `calibrated` aggregation's reference
<run-dir>/queries/<query-id>/result.json       query, top-k, config, timings
<run-dir>/queries/<query-id>/scores.safetensors "scores" (N,), "deltas" (N, K), "after" (N, K)
<run-dir>/audit/                    the memorization audit (see audit.py)
```
A second run whose settings differ from the saved ones is refused with the differing fields:
numbers computed under one configuration are never silently mixed with another's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import config_differences
from .errors import DiffattrError
from .files import atomic_write

CONFIG_FILE = "config.json"
IDS_FILE = "ids.json"
ENCODINGS_DIR = "encodings"
BASELINE_FILE = "baseline.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
QUERIES_DIR = "queries"
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
    return {
        section: {key: value for key, value in config[section].items() if key not in UNCHECKED_KEYS}
        for section in CHECKED_SECTIONS
        if section in config
    }


class RunDirectory:
    """Reads and writes one run directory.

    Args:
        path: the folder (created on first write).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise DiffattrError(f"--run-dir {self.path} exists and is not a folder")

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    def load_config(self) -> dict | None:
        return read_json(self.file(CONFIG_FILE)) if self.exists(CONFIG_FILE) else None

    def check_or_write_config(self, config: dict) -> None:
        """Saves ``config``, or verifies it against the saved one.

        Sections absent from the saved config (e.g. ``attribution`` after ``cache``) are added.

        Raises:
            DiffattrError: a saved field differs; the message lists every difference.
        """
        saved = self.load_config()
        if saved is None:
            write_json(self.file(CONFIG_FILE), config)
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
            write_json(self.file(CONFIG_FILE), {**saved, **missing})

    def query_dir(self, query_id: str) -> Path:
        return self.path / QUERIES_DIR / query_id
