"""Training images held in a Hugging Face ``datasets`` table: a ``datasets.Dataset`` object, a
folder written by ``Dataset.save_to_disk``, or a parquet file (e.g. ``Dataset.to_parquet``).

Columns, by the names diffusers' training scripts use: the image (``--image-column``, default
``image``, or the table's only image column), the caption (``--caption-column``, default ``text``)
and the label (``--label-column``, default ``label``; a ``ClassLabel`` keeps its names and order,
strings are class names in sorted order).

An image's id is ``<row>-<hash>``: its row index, zero-padded, and the first 12 hex digits of the
BLAKE2b of its encoded bytes. A table has no file names to key by; the hash makes an id name one
image, so a reordered or edited table is refused by a run made on the old one instead of pairing
cached numbers with other images. Images are read from their encoded bytes, never decoded twice
into memory: the table is cast to ``datasets.Image(decode=False)``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from .data import Columns, ImageRecord, TrainingImages, class_indices
from .errors import DiffattrError


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DiffattrError(
            "reading a datasets table (save_to_disk folder, parquet file, Dataset) needs the datasets "
            "package: pip install 'diffattr[hf]'"
        ) from None
    return datasets


def load_table(path: Path):
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder or a parquet file."""
    datasets = _datasets()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DiffattrError(
            f"--train {path} holds the splits {', '.join(splits)}: pass one split's folder (e.g. {path / splits[0]})"
            if splits
            else f"--train {path} is a DatasetDict folder with no split"
        )
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        return datasets.Dataset.from_parquet(str(path))
    except DiffattrError:
        raise
    except Exception as error:  # datasets and pyarrow raise many types for a damaged table
        raise DiffattrError(f"--train {path}: cannot read this datasets table ({error})") from None


class DatasetImages(TrainingImages):
    """The images of a ``datasets.Dataset``, with their captions and labels.

    Args:
        dataset: the table.
        columns: the image, caption and label columns, when not the defaults.
        root: the folder or parquet file the table was read from (``None`` for an object).

    Raises:
        DiffattrError: a named column is missing (the error lists the table's columns), the image
            column holds no images, or a row has no image.
    """

    def __init__(self, dataset, columns: Columns | None = None, *, root: Path | None = None):
        datasets = _datasets()
        if isinstance(dataset, datasets.DatasetDict):
            raise DiffattrError(f"a DatasetDict of splits {', '.join(dataset)}: pass one split, e.g. dataset['train']")
        if not isinstance(dataset, datasets.Dataset):
            raise DiffattrError(f"training data must be a folder, a datasets.Dataset or a path, got {type(dataset)}")
        self.root, self.columns = root, columns or Columns()
        self.columns_found = list(dataset.column_names)
        where = f"--train {root}" if root is not None else "the training dataset"
        image = self._image_column(dataset, where)
        for flag, name in (("--caption-column", self.columns.caption), ("--label-column", self.columns.label)):
            if name is not None and name not in dataset.column_names:
                names = ", ".join(dataset.column_names)
                raise DiffattrError(f"{flag} {name}: {where} has no such column (it has {names})")
        self._images = dataset.cast_column(image, datasets.Image(decode=False))[image]
        self._digests = [self._digest(row) for row in range(len(dataset))]
        if not self._digests:
            raise DiffattrError(f"{where} holds no row")
        captions = self._captions(dataset, where)
        labels, self.class_names = self._labels(dataset, where)
        self.records = sorted(
            (
                ImageRecord(f"{row:06d}-{digest[:12]}", None, caption, label, row=row)
                for row, (digest, caption, label) in enumerate(zip(self._digests, captions, labels))
            ),
            key=lambda record: record.id,
        )

    def _image_column(self, dataset, where: str) -> str:
        datasets = _datasets()
        image_columns = [name for name, kind in dataset.features.items() if isinstance(kind, datasets.Image)]
        name = self.columns.image or ("image" if "image" in dataset.column_names or len(image_columns) != 1 else None)
        name = name or image_columns[0]
        if name not in dataset.column_names:
            raise DiffattrError(
                f"--image-column {name}: {where} has no such column (it has {', '.join(dataset.column_names)})"
            )
        if not isinstance(dataset.features[name], datasets.Image):
            raise DiffattrError(
                f"--image-column {name}: {where}'s column holds {dataset.features[name]}, not images; "
                "cast it with dataset.cast_column(name, datasets.Image())"
            )
        return name

    def _bytes(self, row: int) -> bytes:
        value = self._images[row]
        if value is None:
            raise DiffattrError(f"row {row} of the training dataset has no image; drop the row")
        if value.get("bytes") is not None:
            return value["bytes"]
        try:
            return Path(value["path"]).read_bytes()  # an image feature of file paths
        except (OSError, TypeError) as error:
            path = value.get("path")
            raise DiffattrError(f"row {row} of the training dataset: cannot read {path!r} ({error})") from None

    def _digest(self, row: int) -> str:
        return hashlib.blake2b(self._bytes(row), digest_size=16).hexdigest()

    def _captions(self, dataset, where: str) -> list[str | None]:
        name = self.columns.caption_name
        if name not in dataset.column_names:
            return [None] * len(dataset)
        captions = dataset[name]
        for row, caption in enumerate(captions):
            if caption is not None and not isinstance(caption, str):
                raise DiffattrError(f"{where}: row {row}: caption column {name!r} must hold strings, got {caption!r}")
        return captions

    def _labels(self, dataset, where: str) -> tuple[list[int | None], list[str] | None]:
        name = self.columns.label_name
        if name not in dataset.column_names:
            return [None] * len(dataset), None
        feature, labels = dataset.features[name], dataset[name]
        if isinstance(feature, _datasets().ClassLabel):  # its own names, in its own order; -1: no label
            return [None if label is None or label < 0 else label for label in labels], list(feature.names)
        for row, label in enumerate(labels):
            if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
                raise DiffattrError(f"{where}: row {row}: a label must be an integer or a class name, got {label!r}")
        return class_indices(labels, where=where)

    def source(self, record: ImageRecord):
        return io.BytesIO(self._bytes(record.row))

    def content_digest(self, record: ImageRecord) -> str:
        return self._digests[record.row]
