"""Hugging Face data layouts: metadata as JSON lines, CSV or parquet, the caption/label column flags,
labels from class sub-folders and class names, and ``datasets`` tables (a ``Dataset`` object, a
``save_to_disk`` folder, a parquet file) as the training set.

Rankings are checked on ground truth: a training image used as its own query must come out first,
whichever layout it was read from.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffattr import AttributionConfig, Attributor, DiffusionModel, ScoringConfig
from diffattr.cli import main
from diffattr.data import Columns, ImageFolder, open_training_images
from diffattr.demo import assets_dir, toy_paths
from diffattr.errors import DiffattrError

from .conftest import make_tiny_model

datasets = pytest.importorskip("datasets")

TINY_SD = assets_dir() / "tiny-sd" / "model"
FAST = AttributionConfig(aggregation="loss")
SCORING = ScoringConfig(num_timesteps=5)


def toy_rows(per_label: int) -> list[dict]:
    """The first ``per_label`` digits of each class of the bundled toy set (file_name, label, text)."""
    rows, counts = [], {}
    for line in (toy_paths()["train"] / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["file_name"].startswith("digits/") and counts.get(row["label"], 0) < per_label:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
            rows.append(row)
    return rows


def copy_toy(folder: Path, rows: list[dict]) -> Path:
    for row in rows:
        (folder / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_paths()["train"] / row["file_name"], folder / row["file_name"])
    return folder


@pytest.fixture(scope="module")
def toy_model():
    return DiffusionModel.from_pretrained(toy_paths()["model"], device="cpu")


@pytest.fixture(scope="module")
def sd_model():
    return DiffusionModel.from_pretrained(TINY_SD, device="cpu")


# -- metadata files and column flags --------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_caption_column_under_another_name_is_an_error_until_named(tmp_path, sd_model):
    rows = toy_rows(3)
    data = copy_toy(tmp_path / "data", rows)
    write_csv(data / "metadata.csv", [{"file_name": r["file_name"], "caption": r["text"]} for r in rows])
    with pytest.raises(DiffattrError, match=r"30 of 30 training images have no caption.*file_name, caption.*"):
        Attributor(sd_model, data, tmp_path / "run", progress=False)
    attributor = Attributor(
        sd_model, data, tmp_path / "run", columns=Columns(caption="caption"), scoring=SCORING, attribution=FAST
    )
    assert [r.text for r in attributor.data.records] == [r["text"] for r in sorted(rows, key=lambda r: r["file_name"])]
    record = attributor.data.records[7]
    (result,) = attributor.attribute(record.path, prompts=record.text, top_k=3)
    assert result.top_ids[0] == record.id
    with pytest.raises(DiffattrError, match="--caption-column prompt: .*has no such column .*file_name, caption"):
        ImageFolder(data, Columns(caption="prompt"))
    # the empty prompt only when asked for
    (data / "metadata.csv").unlink()
    run = Attributor(sd_model, data, tmp_path / "run2", allow_empty_captions=True, progress=False)
    assert all(r.text is None for r in run.data.records)


def test_the_cli_names_the_columns_of_a_captionless_set(tmp_path, capsys):
    rows = toy_rows(1)
    data = copy_toy(tmp_path / "data", rows)
    (data / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["file_name"], "prompt": r["text"]}) + "\n" for r in rows)
    )
    args = ["cache", "--model", TINY_SD, "--train", data, "--run-dir", tmp_path / "run", "--quiet", "--device", "cpu"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "no caption in column 'text'" in err and "file_name, prompt" in err and "--caption-column" in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_metadata_as_jsonl_csv_and_parquet_read_alike(tmp_path):
    rows = toy_rows(2)
    folders = {}
    for kind in ("jsonl", "csv", "parquet"):
        folder = copy_toy(tmp_path / kind, rows)
        table = [{"file_name": r["file_name"], "caption": r["text"], "class": r["label"]} for r in rows]
        if kind == "jsonl":
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
        elif kind == "csv":
            write_csv(folder / "metadata.csv", table)
        else:
            datasets.Dataset.from_list(table).to_parquet(str(folder / "metadata.parquet"))
        folders[kind] = ImageFolder(folder, Columns(caption="caption", label="class"))
    records = {kind: [(r.id, r.text, r.label) for r in folder.records] for kind, folder in folders.items()}
    assert records["jsonl"] == records["csv"] == records["parquet"]
    assert sorted(records["csv"]) == sorted((r["file_name"], r["text"], r["label"]) for r in rows)
    (tmp_path / "csv" / "metadata.jsonl").write_text("")
    with pytest.raises(DiffattrError, match="keep one metadata file"):
        ImageFolder(tmp_path / "csv")


def test_metadata_files_in_sub_folders_cover_their_own_images(tmp_path):
    rows = toy_rows(2)  # file names "digits/<name>.png"
    root_listed = copy_toy(tmp_path / "root", rows)
    (root_listed / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sharded = copy_toy(tmp_path / "sharded", rows)
    # One shard's metadata in the digits/ folder (names relative to it), the rest in the root.
    inner = [dict(r, file_name=r["file_name"].removeprefix("digits/")) for r in rows[:10]]
    write_csv(sharded / "digits" / "metadata.csv", inner)
    (sharded / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    as_records = lambda folder: [(r.id, r.text, r.label) for r in ImageFolder(folder).records]  # noqa: E731
    assert as_records(sharded) == as_records(root_listed)
    assert {r.text for r in ImageFolder(sharded).records} == {r["text"] for r in rows}

    (sharded / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[9:]))
    with pytest.raises(DiffattrError, match=r"listed in both .*metadata.* keep one row"):
        ImageFolder(sharded)
    outside = dict(rows[0], file_name="../" + rows[0]["file_name"])
    (sharded / "metadata.jsonl").unlink()
    (sharded / "other").mkdir()
    shutil.copy(sharded / rows[0]["file_name"], sharded / "other" / "x.png")
    (sharded / "other" / "metadata.jsonl").write_text(json.dumps(outside) + "\n")
    with pytest.raises(DiffattrError, match="outside the folder of its metadata file"):
        ImageFolder(sharded)


# -- labels ---------------------------------------------------------------------------------------


def test_labels_come_from_class_folders_and_class_names_map_in_sorted_order(tmp_path):
    rows = toy_rows(2)
    numbered = copy_toy(tmp_path / "numbered", rows)  # digits/<label>/xxxx.png, no metadata
    folder = ImageFolder(numbered)
    assert [r.label for r in folder.records] == [int(r.id.split("/")[1]) for r in folder.records]
    assert folder.class_names is None and folder.settings() == {}
    named = tmp_path / "named"
    for name in ("zebra", "cat", "dog"):
        (named / name).mkdir(parents=True)
        Image.new("L", (8, 8), 7).save(named / name / "x.png")
    folder = ImageFolder(named)
    assert folder.class_names == ["cat", "dog", "zebra"]
    assert {r.id: r.label for r in folder.records} == {"cat/x.png": 0, "dog/x.png": 1, "zebra/x.png": 2}
    assert folder.settings() == {"class_names": ["cat", "dog", "zebra"]}
    assert folder.class_index("dog") == 1 and folder.class_index("2") == 2
    with pytest.raises(DiffattrError, match="--label 'cow': not a class of the training set"):
        folder.class_index("cow")
    # a metadata label wins over the folder; mixed kinds are refused
    (named / "metadata.jsonl").write_text(
        '{"file_name": "cat/x.png", "label": 4}\n{"file_name": "dog/x.png", "label": "b"}\n'
    )
    with pytest.raises(DiffattrError, match="mix integers and class names"):
        ImageFolder(named)


def test_class_folders_condition_a_class_conditional_model(tmp_path):
    """Class folders named 0..9 give the model's own class indices, and ``--label`` may name a class."""
    model = make_tiny_model(tmp_path / "model", num_class_embeds=3)
    data = tmp_path / "data"
    for name in ("two", "zero", "one"):  # sorted: one → 0, two → 1, zero → 2
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(data / name / f"{i}.png")
    attributor = Attributor(model, data, tmp_path / "run", scoring=SCORING, attribution=FAST, progress=False)
    _, conditions = attributor.training_encodings()
    assert conditions.load().tolist() == [0, 0, 1, 1, 2, 2]  # one/0, one/1, two/0, ...
    attributor.attribute(data / "zero" / "1.png", labels="zero", top_k=2)
    (saved,) = (tmp_path / "run" / "queries").glob("*/result.json")
    assert json.loads(saved.read_text())["label"] == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["class_names"] == ["one", "two", "zero"]


# -- datasets tables ------------------------------------------------------------------------------


def toy_dataset(rows: list[dict]):
    """A ``datasets.Dataset`` of toy digits with a ClassLabel and captions, as a user would make one."""
    images = [Image.open(toy_paths()["train"] / r["file_name"]).copy() for r in rows]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    table = {"image": images, "text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}
    return datasets.Dataset.from_dict(table, features=features)


@pytest.mark.parametrize("layout", ["object", "save_to_disk", "parquet"])
def test_a_datasets_table_is_a_training_set(tmp_path, toy_model, layout):
    rows = toy_rows(3)
    dataset = toy_dataset(rows)
    if layout == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "table"))
        train = tmp_path / "table"
    elif layout == "parquet":
        dataset.to_parquet(str(tmp_path / "table.parquet"))
        train = tmp_path / "table.parquet"
    else:
        train = dataset
    attributor = Attributor(toy_model, train, tmp_path / "run", scoring=SCORING, attribution=FAST, progress=False)
    data = attributor.data
    assert len(data) == len(rows) and data.class_names == [str(i) for i in range(10)]
    assert data.ids[0].startswith("000000-") and len(data.ids[0]) == 19  # row index and content hash
    # the same pixels as the image files
    folder = Attributor(toy_model, copy_toy(tmp_path / "folder", rows), tmp_path / "folder-run", scoring=SCORING)
    by_row = {r.row: r for r in data.records}
    files = {r.id: r for r in folder.data.records}
    pixels = torch.stack([attributor.load_image(data.source(by_row[i])) for i in range(len(rows))])
    expected = torch.stack([folder.load_image(files[r["file_name"]].path) for r in rows])
    assert torch.equal(pixels, expected)
    assert [by_row[i].label for i in range(len(rows))] == [r["label"] for r in rows]
    # a training row as its own query ranks first
    query = tmp_path / "query.png"
    Image.open(data.source(by_row[13])).save(query)
    (result,) = attributor.attribute(query, top_k=3)  # the toy model is unconditional
    assert result.top_ids[0] == by_row[13].id
    if layout != "object":
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["data"]["root"] == str(Path(train).resolve())
    # The gallery shows the table's images and captions, also for an object (no path in the run).
    html = next(attributor.gallery().parent.glob("query-*.html")).read_text()
    assert html.count('src="img/') == 1 + 3 and by_row[13].text in html


def test_the_gallery_and_export_of_a_dataset_object_take_the_object(tmp_path, toy_model):
    from diffattr.export import result_rows
    from diffattr.gallery import write_gallery

    rows = toy_rows(2)
    dataset = toy_dataset(rows)
    attributor = Attributor(toy_model, dataset, tmp_path / "run", scoring=SCORING, attribution=FAST, progress=False)
    query = tmp_path / "query.png"
    dataset[5]["image"].save(query)
    attributor.attribute(query, top_k=4)
    bare = write_gallery(tmp_path / "run", tmp_path / "bare", progress=False)  # no path recorded: no thumbnails
    assert next(bare.parent.glob("query-*.html")).read_text().count('src="img/') == 1
    index = write_gallery(tmp_path / "run", tmp_path / "shown", train=dataset, progress=False)
    assert next(index.parent.glob("query-*.html")).read_text().count('src="img/') == 1 + 4
    (top, *_), _ = result_rows(tmp_path / "run", train=dataset)
    assert top["rank"] == 1 and top["caption"] == rows[5]["text"]
    with pytest.raises(DiffattrError, match="given as an object.*changed since the run"):
        write_gallery(tmp_path / "run", tmp_path / "other", train=dataset.select(range(len(rows) - 1)), progress=False)


def test_a_reordered_table_is_refused_by_its_run(tmp_path, toy_model):
    rows = toy_rows(2)
    dataset = toy_dataset(rows)
    attributor = Attributor(toy_model, dataset, tmp_path / "run", scoring=SCORING, attribution=FAST, progress=False)
    attributor.baseline()
    shuffled = dataset.select(list(range(len(rows)))[::-1])
    with pytest.raises(DiffattrError, match="data"):
        Attributor(toy_model, shuffled, tmp_path / "run", scoring=SCORING, attribution=FAST, progress=False).baseline()


def test_table_errors_name_the_columns(tmp_path):
    rows = toy_rows(1)
    dataset = toy_dataset(rows)
    with pytest.raises(DiffattrError, match=r"--image-column picture: .* \(it has image, text, label\)"):
        open_training_images(dataset, Columns(image="picture"))
    with pytest.raises(DiffattrError, match="--image-column text: .*not images"):
        open_training_images(dataset, Columns(image="text"))
    with pytest.raises(DiffattrError, match="--caption-column prompt: .*it has image, text, label"):
        open_training_images(dataset, Columns(caption="prompt"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DiffattrError, match="holds the splits train: pass one split's folder"):
        open_training_images(tmp_path / "splits")
    renamed = dataset.rename_column("image", "png")  # the only image column is found by its type
    assert len(open_training_images(renamed)) == len(rows)


def test_the_cli_takes_a_parquet_file_and_the_gallery_shows_its_images(tmp_path, capsys):
    rows = toy_rows(2)
    toy_dataset(rows).to_parquet(str(tmp_path / "train.parquet"))
    query = tmp_path / "query.png"
    shutil.copy(toy_paths()["train"] / rows[4]["file_name"], query)
    common = ["--model", toy_paths()["model"], "--train", tmp_path / "train.parquet", "--run-dir", tmp_path / "run"]
    fast = ["--quiet", "--device", "cpu", "--timesteps", "5", "--aggregation", "loss"]
    assert main([str(a) for a in ["attribute", *common, *fast, "--query", query]]) == 0
    assert main(["gallery", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    (page,) = (tmp_path / "run" / "gallery").glob("query-*.html")
    html = page.read_text()
    assert html.count('src="img/') >= 1 + 10  # the query and every ranked table image
    assert rows[4]["text"] in html


# -- Python API objects ---------------------------------------------------------------------------


def test_a_loaded_pipeline_and_pil_queries_score_as_their_folders_and_files(tmp_path):
    from diffusers import StableDiffusionPipeline

    concept = assets_dir() / "tiny-sd" / "concept"
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD)
    by_object = Attributor(pipe, concept, tmp_path / "object", scoring=SCORING, attribution=FAST, progress=False)
    by_folder = Attributor(TINY_SD, concept, tmp_path / "folder", scoring=SCORING, attribution=FAST, progress=False)
    assert torch.equal(by_object.baseline(), by_folder.baseline())
    query = concept / "sks_2.png"
    (from_file,) = by_folder.attribute(query, prompts="a handwritten digit in sks style", top_k=4)
    (from_pil,) = by_object.attribute([Image.open(query)], prompts=["a handwritten digit in sks style"], top_k=4)
    assert from_file.top_ids[0] == "sks_2.png" and from_pil.top_ids == from_file.top_ids
    # the PIL image is attributed as the pixels of its file (its query id, so its perturbation seed, differs)
    assert torch.equal(by_object.load_image(Path(from_pil.query)), by_folder.load_image(query))
    # the fingerprint covers the weights: a changed weight is another model to the run directory
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1e-3)
    with pytest.raises(DiffattrError, match="model"):
        Attributor(pipe, concept, tmp_path / "object", scoring=SCORING, attribution=FAST, progress=False).baseline()
    with pytest.raises(DiffattrError, match="supports pipelines whose unet or transformer is one of"):
        Attributor(object(), concept, tmp_path / "bad")
