"""Training and query images in the Hugging Face *imagefolder* convention.

A data folder holds image files at any depth and, optionally, a ``metadata.jsonl`` at its root
whose lines are ``{"file_name": "<relative path>", "text": "<caption>", "label": <int>}``. Each
image's stable id is its path relative to the folder, with ``/`` separators: ids never depend on
the order in which files are found, so noise, caches and results stay attached to the right image.

Images reach the model as ``(C, H, W)`` float tensors in ``[-1, 1]``: converted to the model's
channels (``L`` for 1, ``RGB`` for 3, ``RGBA`` for 4 — an alpha channel is dropped, not blended),
resized so that the shorter side equals the resolution (bicubic, antialiased), then center-cropped
to a square. Values are scaled by the file's real bit depth: 8-bit modes by 255, 16-bit greyscale
(PIL ``I;16``, and ``I`` from a PNG) by 65535, 32-bit integers by 2³² − 1, floats (``F``) are taken
as ``[0, 1]``. An image of more than ``max_pixels`` pixels is refused before it is decoded.
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

from .config import MAX_IMAGE_PIXELS
from .errors import DiffattrError
from .files import atomic_write
from .names import name_problem

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# PIL's 16-bit greyscale modes (an 8-bit conversion would clip every value above 255).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


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


def check_file_name(path: Path) -> None:
    """Refuses a file name that no JSON, HTML page or terminal can carry faithfully (``names.py``)."""
    problem = name_problem(str(path))
    if problem:
        raise DiffattrError(f"{problem}; rename the file")


def _metadata_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, split on ``\n`` only: U+2028 and U+0085 may sit inside a caption."""
    if not path.is_file():
        raise DiffattrError(f"{path} is not a file; remove it or replace it with a {METADATA_FILE} file")
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def read_text(path: Path) -> str:
    """A UTF-8 text file (a metadata file, a sidecar prompt), refused by name when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DiffattrError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None


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
    if not (path.exists() or path.is_symlink()):
        return {}
    rows: dict[str, dict] = {}
    for line_number, line in enumerate(_metadata_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DiffattrError(f"{where}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise DiffattrError(f"{where}: JSON nested too deeply to be a metadata row") from None
        except ValueError as error:  # e.g. an integer of more digits than Python converts
            raise DiffattrError(f"{where}: not a usable JSON line ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DiffattrError(f'{where}: each line needs a string "file_name"')
        try:
            # The id is the path as written (a link keeps its own name, as in the folder scan); the
            # file it leads to must be inside the folder too.
            listed = Path(os.path.normpath(root / row["file_name"]))
            target = listed.resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symbolic link loop
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} is not a usable path ({error})") from None
        if not (_inside(root, listed) and _inside(root, target)):
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} points outside the data folder {root}")
        if not target.is_file():
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} does not exist in {root}")
        if target.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DiffattrError(
                f"{where}: file_name {row['file_name']!r} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        image_id = listed.relative_to(root).as_posix()
        if image_id in rows:
            raise DiffattrError(f"{where}: {image_id!r} is listed twice in {METADATA_FILE}; keep one line")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise DiffattrError(f'{where}: "text" must be a string, got {text!r}')
        if text is not None and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise DiffattrError(f'{where}: "text" holds a lone UTF-16 surrogate (not text); fix the caption')
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
        unused = sorted(set(metadata) - {record.id for record in records})
        if unused:  # its caption or label would be dropped without a word
            raise DiffattrError(
                f"{self.root / METADATA_FILE} lists {unused[0]!r}, which the folder scan skips (a hidden file or "
                "folder, or one reached through a linked folder): move the image or remove its line"
            )
        self.records: list[ImageRecord] = sorted(records, key=lambda record: record.id)

    def _image_paths(self):
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            for name in subdirectories:  # os.walk does not follow links: one leading out would be lost
                link = Path(directory) / name
                if link.is_symlink() and not _inside(self.root, link.resolve()):
                    raise DiffattrError(
                        f"{link} is a link to a folder outside the data folder {self.root}; "
                        "copy the folder into the data folder instead"
                    )
            for name in files:
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                path = Path(directory) / name
                check_file_name(path)
                try:
                    resolved = path.resolve()
                except (OSError, RuntimeError) as error:  # a symbolic link loop
                    raise DiffattrError(f"{path}: cannot follow this link ({error}); remove it") from None
                if not resolved.is_file():  # a FIFO or device would block or never end
                    raise DiffattrError(f"{path} is not a regular file; remove it from the data folder")
                if not _inside(self.root, resolved):
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


def load_image(
    path: str | os.PathLike, *, resolution: int, channels: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Reads an image file as the model sees it.

    Args:
        path: an image file.
        resolution: side of the square the model works at.
        channels: 1, 3 or 4.
        max_pixels: the largest width × height accepted (checked before decoding).

    Returns:
        Tensor of shape ``(channels, resolution, resolution)``, float32 in ``[-1, 1]``.

    Raises:
        DiffattrError: the file is missing, unreadable, not an image, or too large.
    """
    if channels not in _MODES:
        raise DiffattrError(f"models with {channels} image channels are not supported (1, 3 or 4)")
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block forever
        raise DiffattrError(f"{path} is not a regular file; give an image file")
    try:
        image = _open_unlimited(path)
        with image:
            if image.width * image.height > max_pixels:
                raise _TooLarge(
                    f"{path}: {image.width}×{image.height} pixels is more than the {max_pixels:,} accepted; "
                    "downscale it, or raise --max-image-pixels"
                )
            if max(image.size) > 64 * min(image.size):  # resized, its long side would take gigabytes
                raise _TooLarge(
                    f"{path}: {image.width}×{image.height} pixels is too elongated (more than 64:1); crop it"
                )
            image.load()
            bands = _bands(image, channels)
    except _TooLarge as error:
        raise DiffattrError(str(error)) from None
    except FileNotFoundError:
        raise DiffattrError(f"{path}: file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DiffattrError(f"{path}: cannot read this image ({error}); replace or remove the file") from None
    width, height = bands.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        bands = bands.resize(size, Image.Resampling.BICUBIC)
        left, top = (bands.width - resolution) // 2, (bands.height - resolution) // 2
        bands = bands.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(bands, dtype=np.float32).reshape(resolution, resolution, -1)
    if array.shape[-1] != channels:  # high-bit-depth greyscale, resized as one float band
        array = np.repeat(array, 3, axis=-1)
        if channels == 4:
            array = np.concatenate([array, np.full_like(array[..., :1], 255.0)], axis=-1)
    return torch.from_numpy(np.clip(array, 0.0, 255.0)).permute(2, 0, 1).div(127.5).sub(1.0)


class _TooLarge(Exception):
    """An image refused by its size, before decoding (kept apart from the decoders' errors)."""


def _open_unlimited(path) -> Image.Image:
    """``Image.open`` without PIL's own pixel limit: ``max_pixels`` (the user's) is checked instead."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _bands(image: Image.Image, channels: int) -> Image.Image:
    """The image in the model's mode; high-bit-depth greyscale as one float band on the 0–255 scale
    (a direct conversion to 8 bits would clip every value above 255)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            full_scale = 1.0
        elif image.mode in _SIXTEEN_BIT_MODES or image.format == "PNG":  # PNG holds at most 16 bits per sample
            full_scale = 65535.0
        else:
            full_scale = 65535.0 if values.max(initial=0) <= 65535 else 2.0**32 - 1
        return Image.fromarray((values * (255.0 / full_scale)).astype(np.float32), mode="F")
    if image.mode == "P":  # a palette with transparency converts cleanly only through RGBA
        image = image.convert("RGBA")
    return image.convert(_MODES[channels])


def save_image(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes a ``(C, H, W)`` tensor in ``[-1, 1]`` as an 8-bit image (atomically)."""
    array = tensor.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    array = array.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image_format = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    atomic_write(Path(path), lambda temporary: image.save(temporary, format=image_format))
