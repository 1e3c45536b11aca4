"""Row-sharded tensors on disk: the training set's encodings and conditions, never all in memory.

A sharded tensor is a folder of safetensors files, each holding consecutive rows under the same
keys, plus ``index.json`` (written last, so a folder without it is unfinished)::

    <folder>/00000.safetensors   {"encodings": (n0, ...), "conditions": (n0, ...)}
    <folder>/00001.safetensors   ...
    <folder>/index.json          {"num_rows": N, "shard_rows": S, "keys": [...], "stamp": ...}

Shard j holds rows ``[j·S, (j+1)·S)``. A reader loads one shard at a time, so scoring a training
set of any size keeps one shard (plus the model) in memory; an interrupted writer resumes after
its last complete shard, and a shard deleted later is recomputed. Every shard carries the run's
stamp (``store.py``) with its own place, the index the run's stamp, and each shard is checked when
read (stamp and place, rows, row shape, dtype, finite values): a shard of another run, one moved
to another name or a damaged one is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import DiffattrError
from .store import (
    STAMP_KEY,
    Expected,
    check_tensor,
    present,
    read_header,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

INDEX_FILE = "index.json"


def _shard_file(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.safetensors"


def _shard_stamp(stamp: str, index: int, shard_rows: int) -> str:
    """Shard ``index``'s stamp: the run's, and its place (index and rows per shard), so that a shard
    moved to another name, or kept from a writer of another shard size, is never read as the rows
    of other images."""
    return f"{stamp}:shard{index}/{shard_rows}"


def write_shards(
    folder: Path,
    num_rows: int,
    compute: Callable[[int, int], dict[str, torch.Tensor]],
    *,
    shard_rows: int,
    stamp: str,
) -> None:
    """Writes ``compute(start, stop)`` for each shard of rows, skipping shards already on disk.

    Args:
        folder: destination folder.
        num_rows: N, the total number of rows.
        compute: returns the tensors of rows ``[start, stop)``, every key with ``stop − start`` rows.
        shard_rows: S, rows per shard file.
        stamp: the run's stamp, written into every shard; a shard already there must carry it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys: list[str] | None = None
    for index, start in enumerate(range(0, num_rows, shard_rows)):
        path = _shard_file(folder, index)
        stop = min(start + shard_rows, num_rows)
        if present(path):
            try:
                read_header(path, _shard_stamp(stamp, index, shard_rows))
                continue
            except DiffattrError:  # left by an unfinished run under other settings, or damaged: redone
                pass
        tensors = compute(start, stop)
        for key, value in tensors.items():
            if len(value) != stop - start:
                raise ValueError(f"{key}: {len(value)} rows for shard rows [{start}, {stop})")
        keys = sorted(tensors)
        write_tensors(path, tensors, {STAMP_KEY: _shard_stamp(stamp, index, shard_rows)})
    if keys is None:  # every shard was already there
        keys = sorted(read_header(_shard_file(folder, 0), _shard_stamp(stamp, 0, shard_rows)))
    index = {"num_rows": num_rows, "shard_rows": shard_rows, "keys": keys, "stamp": stamp}
    write_json(folder / INDEX_FILE, index)


def shards_complete(folder: Path) -> bool:
    """Whether the folder was finished (its index written) and still holds every shard: a shard
    deleted since (as a damaged one's error advises) is recomputed by :func:`write_shards`."""
    if not present(folder / INDEX_FILE):
        return False
    try:
        index = read_json(folder / INDEX_FILE)
        rows, shard_rows = index["num_rows"], index["shard_rows"]
    except (DiffattrError, KeyError, TypeError):
        return True  # a damaged index: opening it says so, by name
    if not all(type(n) is int for n in (rows, shard_rows)) or shard_rows < 1:
        return True
    return all(present(_shard_file(folder, j)) for j in range(-(-rows // shard_rows)))


def _read_index(folder: Path, stamp: str, num_rows: int) -> dict:
    path = Path(folder) / INDEX_FILE
    index = read_json(path)
    redo = f"delete {folder} to recompute"
    if not isinstance(index, dict) or index.get("stamp") != stamp:
        raise DiffattrError(f"{path}: written under other settings than the run directory's config.json; {redo}")
    rows, shard_rows, keys = index.get("num_rows"), index.get("shard_rows"), index.get("keys")
    if not (
        all(isinstance(n, int) and not isinstance(n, bool) for n in (rows, shard_rows))
        and shard_rows >= 1
        and isinstance(keys, list)
        and keys
        and all(isinstance(key, str) for key in keys)
    ):
        raise DiffattrError(f"{path}: not a shard index; {redo}")
    if rows != num_rows:
        raise DiffattrError(f"{path}: {rows!r} rows for {num_rows} training images; {redo}")
    return index


class ShardedTensor:
    """One key of a sharded folder, read like an ``(N, ...)`` tensor, one shard in memory at a time.

    Supports ``len``, ``shape``, ``dtype``, indexing by an int, a slice or an index tensor (rows are
    read shard by shard, so sorted indices cost one read per shard), and :meth:`load` for all rows.
    Each shard is checked when read: the run's stamp, its rows, the row shape of the first shard
    (and ``row_shape`` when given), a float or integer dtype as the first shard's, finite floats.
    """

    def __init__(self, folder: Path, key: str, index: dict, stamp: str, row_shape: tuple | None = None):
        self.folder = Path(folder)
        if key not in index["keys"]:
            raise KeyError(key)
        self.key = key
        self.stamp = stamp
        self.num_rows: int = index["num_rows"]
        self.shard_rows: int = index["shard_rows"]
        self._cached: tuple[int, torch.Tensor] | None = None
        # A key of known row shape holds float32 rows; another is held to what its first shard holds.
        self._row_shape, self._floating = row_shape, True if row_shape is not None else None
        first = self._shard(0)
        self._row_shape, self._floating, self.dtype = tuple(first.shape[1:]), first.dtype.is_floating_point, first.dtype

    @classmethod
    def open(
        cls, folder: Path, *, stamp: str, num_rows: int, row_shapes: dict[str, tuple] | None = None
    ) -> dict[str, ShardedTensor]:
        """Every key of a complete sharded folder of this run (``stamp``) with ``num_rows`` rows;
        ``row_shapes``: the row shape of the keys that must hold float32 rows of that shape."""
        if not shards_complete(folder):
            raise DiffattrError(f"{folder} is unfinished (no {INDEX_FILE}); delete it to recompute")
        index = _read_index(folder, stamp, num_rows)
        shapes = row_shapes or {}
        return {key: cls(folder, key, index, stamp, shapes.get(key)) for key in index["keys"]}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, *self._row_shape))

    def __len__(self) -> int:
        return self.num_rows

    def _shard(self, index: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != index:
            path = _shard_file(self.folder, index)
            tensor = read_tensors(path, stamp=_shard_stamp(self.stamp, index, self.shard_rows)).get(self.key)
            if tensor is None:
                raise DiffattrError(f"{path}: no tensor {self.key!r}; delete {self.folder} to recompute")
            rows = min(self.shard_rows, self.num_rows - index * self.shard_rows)
            shape = (rows, ...) if self._row_shape is None else (rows, *self._row_shape)
            floating = tensor.dtype.is_floating_point if self._floating is None else self._floating
            check_tensor(path, self.key, tensor, Expected(shape, floating))
            self._cached = (index, tensor)
        return self._cached[1]

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int):
            if not -self.num_rows <= rows < self.num_rows:
                raise IndexError(rows)
            rows %= self.num_rows
            return self._shard(rows // self.shard_rows)[rows % self.shard_rows]
        if isinstance(rows, slice):
            rows = torch.arange(self.num_rows)[rows]
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = torch.empty((len(rows), *self._row_shape), dtype=self.dtype)
        shard_of = rows // self.shard_rows
        for shard in torch.unique(shard_of).tolist():
            where = torch.nonzero(shard_of == shard).flatten()
            out[where] = self._shard(shard)[rows[where] - shard * self.shard_rows]
        return out

    def chunks(self) -> Iterator[torch.Tensor]:
        """The rows, one shard at a time."""
        for index in range((self.num_rows + self.shard_rows - 1) // self.shard_rows):
            yield self._shard(index)

    def load(self) -> torch.Tensor:
        """All rows as one tensor (for the consumers that need them together)."""
        return torch.cat(list(self.chunks()))


def row_chunks(source, chunk_rows: int | None = None) -> Iterator[torch.Tensor]:
    """The rows of a row source in chunks: a sharded or computed one (``chunks()``) a shard at a
    time, a tensor whole or, with ``chunk_rows``, that many rows at a time."""
    if hasattr(source, "chunks"):
        return source.chunks()
    if chunk_rows is None:
        return iter([source])
    return (source[start : start + chunk_rows] for start in range(0, len(source), chunk_rows))


class ComputedRows:
    """Rows computed on demand, ``compute(start, stop)`` a chunk at a time: a row source like
    :class:`ShardedTensor` (``len``, :meth:`chunks`) for values not worth storing."""

    def __init__(self, num_rows: int, chunk_rows: int, compute: Callable[[int, int], torch.Tensor]):
        self.num_rows, self.chunk_rows, self.compute = num_rows, chunk_rows, compute

    def __len__(self) -> int:
        return self.num_rows

    def chunks(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.num_rows, self.chunk_rows):
            yield self.compute(start, min(start + self.chunk_rows, self.num_rows))
