"""Training and query images in the Hugging Face *imagefolder* convention.

A data folder holds image files at any depth and, optionally, a ``metadata.jsonl`` at its root
whose lines are ``{"file_name": "<relative path>", "text": "<caption>", "label": <int>}``. Each
image's stable id is its path relative to the folder, with ``/`` separators: ids never depend on
the order in which files are found, so noise, caches and results stay attached to the right image.

Images reach the model as ``(C, H, W)`` float tensors in ``[-1, 1]``: converted to the model's
channels (``L`` for 1, ``RGB`` for 3, ``RGBA`` for 4 — an alpha channel is dropped, not blended),
resized so that the shorter side equals the resolution (bicubic, antialiased), then center-cropped
to a square.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DiffattrError
from .files import atomic_write

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data folder.

    Attributes:
        id: path relative to the folder root, ``/``-separated; the image's identity everywhere.
        path: absolute path of the file.
        text: caption from ``metadata.jsonl``, if any.
        label: integer class label from ``metadata.jsonl``, if any.
    """

    id: str
    path: Path
    text: str | None = None
    label: int | None = None


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _parse_label(value, *, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DiffattrError(f"{where}: `label` must be an integer class index, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise DiffattrError(f"{where}: `label` must be an integer class index, got {value!r}") from None


def _read_metadata(root: Path) -> dict[str, dict]:
    """Maps image id → metadata row; every ``file_name`` must name a file inside ``root``."""
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    rows: dict[str, dict] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DiffattrError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DiffattrError(f'{where}: each line needs a string "file_name"')
        target = (root / row["file_name"]).resolve()
        if not _inside(root, target):
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} points outside the data folder {root}")
        if not target.is_file():
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} does not exist in {root}")
        image_id = target.relative_to(root).as_posix()
        if image_id in rows:
            raise DiffattrError(f"{where}: {image_id!r} is listed twice in {METADATA_FILE}; keep one line")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise DiffattrError(f'{where}: "text" must be a string, got {text!r}')
        rows[image_id] = {"text": text, "label": _parse_label(row.get("label"), where=where)}
    return rows


class ImageFolder:
    """The images of a folder, sorted by id, with their captions and labels.

    Args:
        root: the folder. Hidden files and folders (names starting with ``.``) are skipped;
            symbolic links that lead outside the folder are refused.

    Raises:
        DiffattrError: the folder is missing or holds no image, or ``metadata.jsonl`` is invalid.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DiffattrError(f"data folder {root} does not exist or is not a folder")
        metadata = _read_metadata(self.root)
        records = []
        for path in self._image_paths():
            image_id = path.relative_to(self.root).as_posix()
            row = metadata.get(image_id, {})
            records.append(ImageRecord(image_id, path, row.get("text"), row.get("label")))
        if not records:
            raise DiffattrError(
                f"data folder {self.root} holds no image (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.records: list[ImageRecord] = sorted(records, key=lambda record: record.id)

    def _image_paths(self):
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            for name in files:
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                path = Path(directory) / name
                if not _inside(self.root, path.resolve()):
                    raise DiffattrError(
                        f"{path} is a link to a file outside the data folder {self.root}; "
                        "copy the file into the folder instead"
                    )
                yield path

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    @property
    def ids(self) -> list[str]:
        return [record.id for record in self.records]

    def fingerprint(self) -> str:
        """Content hash of every image file and its metadata, independent of the scan order."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(json.dumps([record.id, record.text, record.label]).encode())
            digest.update(file_digest(record.path).encode())
        return digest.hexdigest()


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(path: str | os.PathLike, *, resolution: int, channels: int) -> torch.Tensor:
    """Reads an image file as the model sees it.

    Args:
        path: an image file.
        resolution: side of the square the model works at.
        channels: 1, 3 or 4.

    Returns:
        Tensor of shape ``(channels, resolution, resolution)``, float32 in ``[-1, 1]``.

    Raises:
        DiffattrError: the file is missing, unreadable or not an image.
    """
    if channels not in _MODES:
        raise DiffattrError(f"models with {channels} image channels are not supported (1, 3 or 4)")
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert(_MODES[channels])
    except FileNotFoundError:
        raise DiffattrError(f"{path}: file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DiffattrError(f"{path}: cannot read this image ({error}); replace or remove the file") from None
    width, height = image.size
    scale = resolution / min(width, height)
    if (width, height) != (resolution, resolution):
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def save_image(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes a ``(C, H, W)`` tensor in ``[-1, 1]`` as an 8-bit image (atomically)."""
    array = tensor.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    array = array.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image_format = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    atomic_write(Path(path), lambda temporary: image.save(temporary, format=image_format))
