"""Training and query images in the Hugging Face *imagefolder* convention.

A data folder holds image files at any depth and, optionally, metadata files —
``metadata.jsonl``, ``metadata.csv`` or ``metadata.parquet``, at most one per folder — whose rows
name an image in ``file_name`` (its path relative to the metadata file's folder) beside its caption
(column ``text``, or ``--caption-column``) and class label (``label``, or ``--label-column``). As
in ``datasets``' imagefolder, a metadata file in a sub-folder (``train/metadata.jsonl``, one per
shard) covers the images in and below that sub-folder; an image listed by two metadata files is
refused rather than resolved by a rule the user might not expect. Each image's stable id is its path relative to the
folder, with ``/`` separators: ids never depend on the order in which files are found, so noise,
caches and results stay attached to the right image.

Labels are integers, or class names mapped to indices in sorted order (as ``datasets``'
``ClassLabel`` does; the mapping is recorded in the run's ``config.json``). When no metadata row
carries a label and every image sits in a sub-folder at one depth, the sub-folder's name is the
label (the imagefolder convention): ``3/0001.png`` is class 3, ``cat/0001.png`` a class name.

Images reach the model as ``(C, H, W)`` float tensors in ``[-1, 1]``: converted to the model's
channels (``L`` for 1, ``RGB`` for 3, ``RGBA`` for 4 — an alpha channel is dropped, not blended),
resized so that the shorter side equals the resolution (bicubic, antialiased), then center-cropped
to a square. Values are scaled by the file's real bit depth: 8-bit modes by 255, 16-bit greyscale
(PIL ``I;16``, and ``I`` from a PNG) by 65535, 32-bit integers by 2³² − 1, floats (``F``) are taken
as ``[0, 1]``. An image of more than ``max_pixels`` pixels is refused before it is decoded.
"""

from __future__ import annotations

import csv
import hashlib
import io
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
METADATA_FILES = (METADATA_FILE, "metadata.csv", "metadata.parquet")  # the formats ``datasets`` reads
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# PIL's 16-bit greyscale modes (an 8-bit conversion would clip every value above 255).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data folder.

    Attributes:
        id: path relative to the folder root, ``/``-separated; the image's identity everywhere.
        path: absolute path of the file (``None`` for an image held in a ``datasets`` table).
        text: caption from the metadata, if any.
        label: integer class index, if any.
    """

    id: str
    path: Path | None
    text: str | None = None
    label: int | None = None
    row: int | None = None  # the row of a ``datasets`` table (``path`` is then ``None``)


@dataclass(frozen=True)
class Columns:
    """Where the image, the caption and the label are, by the names diffusers' training scripts use
    (``--image-column``, ``--caption-column``; ``None``: the default). A column the user names must exist."""

    image: str | None = None  # default "image"; a folder's metadata names its files in "file_name"
    caption: str | None = None  # default "text"
    label: str | None = None  # default "label"

    @property
    def caption_name(self) -> str:
        return self.caption or "text"

    @property
    def label_name(self) -> str:
        return self.label or "label"

    def to_dict(self) -> dict[str, str]:
        """The columns the user named (recorded with the run's data settings)."""
        return {key: value for key, value in vars(self).items() if value is not None}


def _integer_text(label: str) -> bool:
    """Whether a label written as text is an integer (``"3"``, ``"-1"``), not a class name."""
    return label.strip().lstrip("-").isdecimal()


def class_indices(labels: list, *, where: str) -> tuple[list[int | None], list[str] | None]:
    """Integer labels as they are; class names mapped to their index in sorted order.

    Returns:
        the index of each label (``None`` where none), and the class names (``None`` for integers).
    """
    # Integers written as text (a CSV's) are integers, also beside a JSON file's.
    labels = [int(label) if isinstance(label, str) and _integer_text(label) else label for label in labels]
    given = [label for label in labels if label is not None]
    if all(isinstance(label, int) for label in given):
        return labels, None
    if not all(isinstance(label, str) for label in given):
        raise DiffattrError(f"{where}: labels mix integers and class names; use one or the other")
    names = sorted(set(given))
    index = {name: i for i, name in enumerate(names)}
    return [None if label is None else index[label] for label in labels], names


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def check_file_name(path: Path) -> None:
    """Refuses a file name that no JSON, HTML page or terminal can carry faithfully (``names.py``)."""
    problem = name_problem(str(path))
    if problem:
        raise DiffattrError(f"{problem}; rename the file")


def _metadata_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, split on ``\n`` only: U+2028 and U+0085 may sit inside a caption."""
    return [line.removesuffix("\r") for line in read_text(path).removeprefix("\ufeff").split("\n")]


def read_text(path: Path) -> str:
    """A UTF-8 text file (a metadata file, a sidecar prompt), refused by name when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DiffattrError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None


def _parse_label(value, *, where: str) -> int | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DiffattrError(f"{where}: a label must be an integer class index or a class name, got {value!r}")
    return value


def _metadata_rows(path: Path):
    """``(where, row)`` for each row of a metadata file (JSON lines, CSV or parquet)."""
    if not path.is_file():
        raise DiffattrError(f"{path} is not a file; remove it or replace it with a {path.name} file")
    if path.suffix == ".jsonl":
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
            yield where, row
    elif path.suffix == ".csv":
        # A byte-order mark (a spreadsheet's UTF-8 export) is not part of the first column's name.
        reader = csv.DictReader(io.StringIO(read_text(path).removeprefix("\ufeff"), newline=""))
        try:
            header = reader.fieldnames or []
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:  # DictReader would keep the last such column, pandas and datasets the first
                raise DiffattrError(f"{path}: the column {repeated[0]!r} is named twice in the header; rename one")
            for row in reader:  # every value a string; an empty cell is no value
                yield f"{path}:{reader.line_num}", {key: value or None for key, value in row.items() if key is not None}
        except csv.Error as error:
            raise DiffattrError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None
    else:
        try:
            import pyarrow.parquet
        except ImportError:
            raise DiffattrError(f"{path}: reading parquet needs pyarrow: pip install 'diffattr[hf]'") from None
        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's own error types
            raise DiffattrError(f"{path}: cannot read this parquet file ({error})") from None
        for number, row in enumerate(rows):
            yield f"{path}: row {number}", row


def _metadata_file(folder: Path, names) -> Path | None:
    """The metadata file among ``names`` (a folder's entries), refused when there are several."""
    found = [folder / name for name in METADATA_FILES if name in names]
    if len(found) > 1:
        raise DiffattrError(f"folder {folder} holds {' and '.join(p.name for p in found)}: keep one metadata file")
    return found[0] if found else None


def _read_metadata(path: Path, root: Path, columns: Columns) -> tuple[dict[str, dict], list[str]]:
    """Maps image id (relative to ``root``) → ``{"text", "label"}`` (the label as written), and the
    columns found; every ``file_name`` must name an image in or below the metadata file's folder."""
    rows: dict[str, dict] = {}
    found: dict[str, None] = {}
    for where, row in _metadata_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DiffattrError(f'{where}: each row needs a string "file_name"')
        found.update(dict.fromkeys(row))
        try:
            # The id is the path as written (a link keeps its own name, as in the folder scan); the
            # file it leads to must be inside the folder too.
            listed = Path(os.path.normpath(path.parent / row["file_name"]))
            target = listed.resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symbolic link loop
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} is not a usable path ({error})") from None
        if not (_inside(root, listed) and _inside(root, target)):
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} points outside the data folder {root}")
        if not _inside(path.parent, listed):
            raise DiffattrError(
                f"{where}: file_name {row['file_name']!r} is outside the folder of its metadata file; "
                "list it in the metadata file of a folder above it"
            )
        if not target.is_file():
            raise DiffattrError(f"{where}: file_name {row['file_name']!r} does not exist in {root}")
        if target.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DiffattrError(
                f"{where}: file_name {row['file_name']!r} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        image_id = listed.relative_to(root).as_posix()
        if image_id in rows:
            raise DiffattrError(f"{where}: {image_id!r} is listed twice in {path.name}; keep one row")
        text = row.get(columns.caption_name)
        if text is not None and not isinstance(text, str):
            raise DiffattrError(f"{where}: caption column {columns.caption_name!r} must hold strings, got {text!r}")
        if text is not None and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise DiffattrError(f"{where}: the caption holds a lone UTF-16 surrogate (not text); fix the caption")
        rows[image_id] = {"text": text, "label": _parse_label(row.get(columns.label_name), where=where)}
    for flag, name in (("--caption-column", columns.caption), ("--label-column", columns.label)):
        if name is not None and name not in found:
            raise DiffattrError(f"{flag} {name}: {path} has no such column (it has {', '.join(found)})")
    return rows, list(found)


def _folder_labels(ids: list[str]) -> list[str] | None:
    """Each image's sub-folder name, when every image sits in a sub-folder at one depth, else ``None``."""
    depths = {id_.count("/") for id_ in ids}
    if len(depths) != 1 or 0 in depths:
        return None
    return [id_.rsplit("/", 2)[-2] for id_ in ids]


class TrainingImages:
    """What every training set gives the engine: its records sorted by id, where to read each image
    (:meth:`source`), a content fingerprint and the settings that shaped its labels and captions.

    Attributes:
        records: one :class:`ImageRecord` per image, sorted by id.
        root: the folder (or ``datasets`` folder / parquet file) it was read from; ``None`` for a
            ``datasets.Dataset`` given as an object.
        columns: the columns the user named.
        class_names: the label names, index order, when labels were class names (else ``None``).
        columns_found: the metadata's columns (named in errors); empty when there is no metadata.
    """

    records: list[ImageRecord]
    root: Path | None
    columns: Columns
    class_names: list[str] | None = None
    columns_found: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    @property
    def ids(self) -> list[str]:
        return [record.id for record in self.records]

    def source(self, record: ImageRecord):
        """The image of ``record`` as :func:`load_image` reads it: a path, or a file-like object."""
        return record.path

    def content_digest(self, record: ImageRecord) -> str:
        return file_digest(record.path)

    def name(self, record: ImageRecord) -> str:
        """What errors call the image of ``record``."""
        return str(record.path) if record.path is not None else f"training image {record.id} (row {record.row})"

    def fingerprint(self) -> str:
        """Content hash of every image and its caption and label, independent of the scan order."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(json.dumps([record.id, record.text, record.label]).encode())
            digest.update(self.content_digest(record).encode())
        return digest.hexdigest()

    def settings(self) -> dict:
        """What, beside the content, shaped the records (for the run's ``data`` section): only the
        columns the user named and the class names, so that a plain folder's settings stay ``{}``."""
        settings = {}
        if self.columns.to_dict():
            settings["columns"] = self.columns.to_dict()
        if self.class_names is not None:
            settings["class_names"] = self.class_names
        return settings

    def class_index(self, label: int | str | None) -> int | None:
        """A query's ``--label``: an integer, or one of this set's class names."""
        if label is None or (isinstance(label, int) and not isinstance(label, bool)):
            return label
        if not isinstance(label, str):
            raise DiffattrError(f"--label {label!r}: a label is an integer class index or a class name")
        if _integer_text(label):
            return int(label)
        if self.class_names is None or label not in self.class_names:
            known = f"one of {', '.join(self.class_names)}" if self.class_names else "an integer"
            raise DiffattrError(f"--label {label!r}: not a class of the training set (give {known})")
        return self.class_names.index(label)


class ImageFolder(TrainingImages):
    """The images of a folder, sorted by id, with their captions and labels.

    Args:
        root: the folder. Hidden files and folders (names starting with ``.``) are skipped;
            symbolic links that lead outside the folder are refused.
        columns: the metadata's caption and label columns, when not ``text`` and ``label``.

    Raises:
        DiffattrError: the folder is missing or holds no image, its metadata is invalid, or a
            column named in ``columns`` is not in it.
    """

    def __init__(self, root: str | os.PathLike, columns: Columns | None = None):
        self.root = Path(root).expanduser().resolve()
        self.columns = columns or Columns()
        if not self.root.is_dir():
            raise DiffattrError(f"data folder {root} does not exist or is not a folder")
        if self.columns.image not in (None, "image"):  # the column `datasets` makes of a folder
            raise DiffattrError(
                f"--image-column {self.columns.image}: a data folder's metadata names its images in file_name; "
                "--image-column is for a datasets folder or a parquet file"
            )
        paths, metadata_files = self._scan()
        paths.sort(key=lambda path: path.relative_to(self.root).as_posix())
        metadata, listed_in, found = {}, {}, {}
        for metadata_file in metadata_files:
            rows, columns_found = _read_metadata(metadata_file, self.root, self.columns)
            for image_id in rows.keys() & listed_in.keys():
                raise DiffattrError(
                    f"{image_id!r} is listed in both {listed_in[image_id]} and {metadata_file}; keep one row"
                )
            metadata.update(rows)
            listed_in.update(dict.fromkeys(rows, metadata_file))
            found.update(dict.fromkeys(columns_found))
        self.columns_found = list(found)
        if not metadata_files and (self.columns.caption or self.columns.label):
            raise DiffattrError(
                f"--caption-column/--label-column given, but {self.root} has no metadata file "
                f"({', '.join(METADATA_FILES)})"
            )
        if not paths:
            raise DiffattrError(
                f"data folder {self.root} holds no image (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        ids = [path.relative_to(self.root).as_posix() for path in paths]
        unused = sorted(set(metadata) - set(ids))
        if unused:  # its caption or label would be dropped without a word
            raise DiffattrError(
                f"{listed_in[unused[0]]} lists {unused[0]!r}, which the folder scan skips (a hidden file or "
                "folder, or one reached through a linked folder): move the image or remove its row"
            )
        rows = [metadata.get(image_id, {}) for image_id in ids]
        labels = [row.get("label") for row in rows]
        if all(label is None for label in labels) and self.columns.label is None:
            labels = _folder_labels(ids) or labels  # class sub-folders
        indices, self.class_names = class_indices(labels, where=", ".join(map(str, metadata_files)) or str(self.root))
        self.records = [
            ImageRecord(image_id, path, row.get("text"), label)
            for image_id, path, row, label in zip(ids, paths, rows, indices)
        ]

    def _scan(self) -> tuple[list[Path], list[Path]]:
        """The image files and the metadata files of the folder, hidden ones skipped."""
        images, metadata_files = [], []
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories.sort()  # metadata files read in a fixed order: errors name the same file
            # A metadata file that is a folder, or a link, is named here rather than ignored.
            metadata_file = _metadata_file(Path(directory), set(files) | set(subdirectories))
            if metadata_file is not None:
                metadata_files.append(metadata_file)
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
                images.append(path)
        return images, metadata_files


def is_dataset_table(path: Path) -> bool:
    """Whether ``path`` is a ``datasets`` table rather than an image folder: a parquet file, or a
    folder written by ``save_to_disk`` (a Dataset's ``state.json``, a DatasetDict's ``dataset_dict.json``)."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_training_images(train, columns: Columns | None = None) -> TrainingImages:
    """A training set from what the user gave: itself, a ``datasets.Dataset``, a ``save_to_disk``
    folder or parquet file, or an image folder."""
    if isinstance(train, TrainingImages):
        return train
    if not isinstance(train, (str, os.PathLike)):
        from .hf_datasets import DatasetImages

        return DatasetImages(train, columns)
    path = Path(train).expanduser()
    if is_dataset_table(path):
        from .hf_datasets import DatasetImages, load_table

        root = path.resolve()
        return DatasetImages(load_table(root), columns, root=root)
    return ImageFolder(path, columns)


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(
    path, *, resolution: int, channels: int, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
) -> torch.Tensor:
    """Reads an image file as the model sees it.

    Args:
        path: an image file, or a file-like object holding one (an image of a ``datasets`` table).
        resolution: side of the square the model works at.
        channels: 1, 3 or 4.
        max_pixels: the largest width × height accepted (checked before decoding).
        name: what errors call the image (default: ``path``).

    Returns:
        Tensor of shape ``(channels, resolution, resolution)``, float32 in ``[-1, 1]``.

    Raises:
        DiffattrError: the file is missing, unreadable, not an image, or too large.
    """
    if channels not in _MODES:
        raise DiffattrError(f"models with {channels} image channels are not supported (1, 3 or 4)")
    where = name or path
    if isinstance(path, (str, os.PathLike)) and Path(path).exists() and not Path(path).is_file():
        raise DiffattrError(f"{path} is not a regular file; give an image file")  # a FIFO would block forever
    try:
        image = _open_unlimited(path)
        with image:
            if image.width * image.height > max_pixels:
                raise _TooLarge(
                    f"{where}: {image.width}×{image.height} pixels is more than the {max_pixels:,} accepted; "
                    "downscale it, or raise --max-image-pixels"
                )
            if max(image.size) > 64 * min(image.size):  # resized, its long side would take gigabytes
                raise _TooLarge(
                    f"{where}: {image.width}×{image.height} pixels is too elongated (more than 64:1); crop it"
                )
            image.load()
            bands = _bands(image, channels)
    except _TooLarge as error:
        raise DiffattrError(str(error)) from None
    except FileNotFoundError:
        raise DiffattrError(f"{where}: file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DiffattrError(f"{where}: cannot read this image ({error}); replace or remove the file") from None
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


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A ``(C, H, W)`` tensor in ``[-1, 1]`` as an 8-bit image (C = 1, 3 or 4)."""
    if tensor.ndim != 3 or tensor.shape[0] not in _MODES:
        shape = tuple(tensor.shape)
        raise DiffattrError(f"an image tensor must be (C, H, W) with C = 1, 3 or 4 in [-1, 1], got {shape}")
    array = tensor.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


# Modes PNG holds as they are; a query object in another mode is kept as TIFF (I, F, CMYK, YCbCr,
# LAB: read back by the file rules of ``load_image``) or converted to RGB (HSV, which neither holds).
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
_TIFF_MODES = frozenset({"I", "F", "CMYK", "YCbCr", "LAB"})


def image_file_bytes(image) -> tuple[bytes, str]:
    """A PIL image, or a ``(C, H, W)`` tensor in ``[-1, 1]``, encoded as an image file: its bytes
    and suffix (``.png``, or ``.tif`` for modes PNG cannot hold; a tensor is rounded to 8 bits)."""
    if isinstance(image, torch.Tensor):
        if image.device.type == "meta" or image.is_complex():
            raise DiffattrError(
                f"a query tensor must hold real pixel values, got a {image.dtype} tensor on {image.device}"
            )
        if image.numel() and not torch.isfinite(image).all():
            raise DiffattrError("a query tensor holds NaN or infinite values")
        if image.numel() and (image.min() < -1.001 or image.max() > 1.001):  # e.g. 0..255 or 0..1 pixels
            low, high = float(image.min()), float(image.max())
            raise DiffattrError(
                f"a query tensor must hold values in [-1, 1], got {low:g} … {high:g}: scale 0–255 pixels by "
                "x / 127.5 - 1 (or 0–1 ones by 2x - 1)"
            )
        image = to_pil(image)
    if not isinstance(image, Image.Image):
        kind = type(image).__name__
        raise DiffattrError(f"a query must be an image path, a PIL image or a (C, H, W) tensor, got {kind}")
    if image.width == 0 or image.height == 0:
        raise DiffattrError(f"a query image of {image.width}×{image.height} pixels holds nothing to attribute")
    kind = "TIFF" if image.mode in _TIFF_MODES else "PNG"
    try:
        if image.mode in _SIXTEEN_BIT_MODES and image.mode != "I;16":  # another byte order: the same values
            image = Image.fromarray(np.asarray(image).astype(np.uint16))
        elif image.mode not in _PNG_MODES | _TIFF_MODES:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
    except (ValueError, OSError) as error:  # e.g. a closed image
        raise DiffattrError(f"a query image could not be encoded ({error})") from None
    return buffer.getvalue(), ".tif" if kind == "TIFF" else ".png"


def save_image(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes a ``(C, H, W)`` tensor in ``[-1, 1]`` as an 8-bit image (atomically)."""
    image = to_pil(tensor)
    image_format = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    atomic_write(Path(path), lambda temporary: image.save(temporary, format=image_format))
