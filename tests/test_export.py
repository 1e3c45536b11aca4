"""``diffattr export``: one row per query × rank, ranked as the stamped scores rank, and the (Q × N) matrix."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors import safe_open

from diffattr.cli import main
from diffattr.export import results_frame

FAST = ["--quiet", "--device", "cpu", "--timesteps", "3", "--aggregation", "loss", "--steps", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, tiny_data):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    queries = [tiny_data / "a" / "img_000.png", tiny_data / "b" / "img_001.png"]
    args = ["attribute", "--model", tiny_model, "--train", tiny_data, "--run-dir", run_dir, *FAST, "--top-k", "4"]
    assert main([str(a) for a in [*args, *(x for q in queries for x in ("--query", q))]]) == 0
    return run_dir


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_rows_follow_the_scores_in_every_format(run, tmp_path, fmt):
    out = tmp_path / f"results.{fmt}"
    assert main(["export", "--run-dir", str(run), "--format", fmt, "--out", str(out), "--quiet"]) == 0
    if fmt == "csv":
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet

        rows = pyarrow.parquet.read_table(out).to_pylist()
    assert len(rows) == 2 * 4 and {row["query_id"] for row in rows} == {f.name for f in (run / "queries").iterdir()}
    with safe_open(str(tmp_path / "results-scores.safetensors"), framework="pt") as handle:
        scores, metadata = handle.get_tensor("scores"), handle.metadata()
    ids, queries = json.loads(metadata["ids"]), json.loads(metadata["queries"])
    assert scores.shape == (2, len(ids)) and ids == json.loads((run / "ids.json").read_text())
    for q, query_id in enumerate(queries):
        mine = [row for row in rows if row["query_id"] == query_id]
        order = scores[q].argsort(descending=True)[:4].tolist()
        assert [row["id"] for row in mine] == [ids[i] for i in order]
        assert [int(row["rank"]) for row in mine] == [1, 2, 3, 4]
        assert all(row["caption"] == f"image {int(row['id'][-7:-4])}" for row in mine)  # the metadata's captions
        result = json.loads((run / "queries" / query_id / "result.json").read_text())
        assert [row["id"] for row in mine] == [entry["id"] for entry in result["top"]]


def test_a_dataframe_from_python_and_a_wider_top_k(run):
    frame = results_frame(run, top_k=6)
    assert list(frame.columns)[:3] == ["query", "query_id", "method"] and len(frame) == 2 * 6
    assert (frame.groupby("query_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()


def test_bad_export_flags_are_one_line(run, tmp_path, capsys):
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", "--run-dir", str(tmp_path / "none"), "--quiet"]) == 2
