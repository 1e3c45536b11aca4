"""Row-sharded tensors on disk: the training set's encodings and conditions, never all in memory.

A sharded tensor is a folder of safetensors files, each holding consecutive rows under the same
keys, plus ``index.json`` (written last, so a folder without it is unfinished)::

    <folder>/00000.safetensors   {"encodings": (n0, ...), "conditions": (n0, ...)}
    <folder>/00001.safetensors   ...
    <folder>/index.json          {"num_rows": N, "shard_rows": S, "keys": [...]}

Shard j holds rows ``[j·S, (j+1)·S)``. A reader loads one shard at a time, so scoring a training
set of any size keeps one shard (plus the model) in memory; an interrupted writer resumes after
its last complete shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import DiffattrError
from .store import read_json, read_tensors, write_json, write_tensors

INDEX_FILE = "index.json"


def _shard_file(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.safetensors"


def write_shards(
    folder: Path,
    num_rows: int,
    compute: Callable[[int, int], dict[str, torch.Tensor]],
    *,
    shard_rows: int,
) -> None:
    """Writes ``compute(start, stop)`` for each shard of rows, skipping shards already on disk.

    Args:
        folder: destination folder.
        num_rows: N, the total number of rows.
        compute: returns the tensors of rows ``[start, stop)``, every key with ``stop − start`` rows.
        shard_rows: S, rows per shard file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys: list[str] | None = None
    for index, start in enumerate(range(0, num_rows, shard_rows)):
        path = _shard_file(folder, index)
        if path.is_file():
            continue
        stop = min(start + shard_rows, num_rows)
        tensors = compute(start, stop)
        for key, value in tensors.items():
            if len(value) != stop - start:
                raise ValueError(f"{key}: {len(value)} rows for shard rows [{start}, {stop})")
        keys = sorted(tensors)
        write_tensors(path, tensors)
    if keys is None:  # every shard was already there
        with safe_open(_shard_file(folder, 0), framework="pt") as handle:
            keys = sorted(handle.keys())
    write_json(folder / INDEX_FILE, {"num_rows": num_rows, "shard_rows": shard_rows, "keys": keys})


def shards_complete(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file()


class ShardedTensor:
    """One key of a sharded folder, read like an ``(N, ...)`` tensor, one shard in memory at a time.

    Supports ``len``, ``shape``, ``dtype``, indexing by an int, a slice or an index tensor (rows are
    read shard by shard, so sorted indices cost one read per shard), and :meth:`load` for all rows.
    """

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        index = read_json(self.folder / INDEX_FILE)
        if key not in index["keys"]:
            raise KeyError(key)
        self.key = key
        self.num_rows: int = index["num_rows"]
        self.shard_rows: int = index["shard_rows"]
        with safe_open(_shard_file(self.folder, 0), framework="pt") as handle:
            sliced = handle.get_slice(key)
            self._row_shape = tuple(sliced.get_shape()[1:])
            self.dtype = sliced[0:1].dtype
        self._cached: tuple[int, torch.Tensor] | None = None

    @classmethod
    def open(cls, folder: Path) -> dict[str, ShardedTensor]:
        """Every key of a complete sharded folder."""
        if not shards_complete(folder):
            raise DiffattrError(f"{folder} is unfinished (no {INDEX_FILE}); delete it to recompute")
        return {key: cls(folder, key) for key in read_json(Path(folder) / INDEX_FILE)["keys"]}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, *self._row_shape))

    def __len__(self) -> int:
        return self.num_rows

    def _shard(self, index: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, read_tensors(_shard_file(self.folder, index))[self.key])
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
