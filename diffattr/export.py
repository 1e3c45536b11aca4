"""``diffattr export``: a run directory's attributions as a table, and its score matrix.

Rows (``csv``, ``jsonl`` or ``parquet``): one per query × rank — ``query``, ``query_id``,
``method``, ``prompt``, ``label``, ``rank``, ``id``, ``score``, ``caption`` (the training image's)
— for the top-k of each query (default: as many as its ``result.json`` lists), ranked from its
stamped scores exactly as the gallery ranks them. The matrix (``<out stem>-scores.safetensors``):
``scores`` ``(Q, N)`` in the row order of the run's ``ids.json``, with the ids and the query ids in
its metadata (JSON lists); a ``--candidates`` query's unscored images are −inf.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch

from .errors import DiffattrError
from .files import atomic_write
from .gallery import open_run, ranked_entries
from .store import RunDirectory, write_tensors

FORMATS = ("csv", "jsonl", "parquet")
COLUMNS = ("query", "query_id", "method", "prompt", "label", "rank", "id", "score", "caption")


def result_rows(run_dir: str | os.PathLike, *, top_k: int | None = None, train=None) -> tuple[list[dict], dict]:
    """The rows of every query, and the ``(Q, N)`` score matrix with its ids (``{"scores", "ids", "queries"}``)."""
    if top_k is not None and top_k < 1:
        raise DiffattrError(f"--top-k {top_k}: must be at least 1")
    run = open_run(Path(run_dir).expanduser(), train)
    rows, matrix, query_ids = [], [], []
    for folder in run.store.query_folders():
        result, scores = run.store.load_result(folder, None if run.ids is None else len(run.ids))
        query_id = folder.name
        for entry in ranked_entries(run, result, scores, top_k):
            rows.append(
                {
                    "query": result.get("query"),
                    "query_id": query_id,
                    "method": result.get("method"),
                    "prompt": result.get("prompt"),
                    "label": result.get("label"),
                    "rank": entry.get("rank"),
                    "id": entry.get("id"),
                    "score": entry.get("score"),
                    "caption": entry.get("text"),
                }
            )
        matrix.append(scores["scores"])
        query_ids.append(query_id)
    stacked = torch.stack(matrix) if matrix else torch.zeros(0, len(run.ids or []))
    return rows, {"scores": stacked, "ids": run.ids or [], "queries": query_ids}


def results_frame(run_dir: str | os.PathLike, *, top_k: int | None = None, train=None):
    """The rows as a pandas DataFrame (needs pandas)."""
    try:
        import pandas
    except ImportError:
        raise DiffattrError("results_frame needs pandas: pip install pandas") from None
    rows, _ = result_rows(run_dir, top_k=top_k, train=train)
    return pandas.DataFrame(rows, columns=list(COLUMNS))


def export(
    run_dir: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "csv", top_k: int | None = None, train=None
) -> tuple[Path, Path]:
    """Writes the rows to ``out`` and the matrix beside it; returns both paths."""
    if fmt not in FORMATS:
        raise DiffattrError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise DiffattrError(f"--out {out} is a folder; give a file name, e.g. {out / ('results.' + fmt)}")
    matrix_path = out.with_name(out.stem + "-scores.safetensors")
    store = RunDirectory(Path(run_dir).expanduser())
    for path in (out, matrix_path):
        if store.owns(path):
            raise DiffattrError(
                f"--out {out}: {path} is a file of the run directory, or inside one of its folders; "
                f"write the export elsewhere, or directly in {run_dir} under another name"
            )
    rows, matrix = result_rows(run_dir, top_k=top_k, train=train)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out, lambda temporary: Path(temporary).write_text(buffer.getvalue(), encoding="utf-8", newline=""))
    elif fmt == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
        atomic_write(out, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    else:
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError:
            raise DiffattrError("--format parquet needs pyarrow: pip install 'diffattr[hf]'") from None
        table = pyarrow.Table.from_pylist(rows) if rows else pyarrow.table({name: [] for name in COLUMNS})
        atomic_write(out, lambda temporary: pyarrow.parquet.write_table(table, temporary))
    metadata = {"ids": json.dumps(matrix["ids"]), "queries": json.dumps(matrix["queries"])}
    write_tensors(matrix_path, {"scores": matrix["scores"].contiguous()}, metadata)
    return out, matrix_path
