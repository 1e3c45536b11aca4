import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import ImageFolder, load_image, save_image
from diffattr.errors import DiffattrError


def test_ids_are_sorted_relative_paths_with_metadata(tiny_data):
    folder = ImageFolder(tiny_data)
    assert len(folder) == 12
    assert folder.ids == sorted(folder.ids)
    assert folder.ids[0] == "a/img_000.png"
    record = next(r for r in folder.records if r.id == "b/img_001.png")
    assert (record.text, record.label) == ("image 1", 1)


def test_fingerprint_follows_content(tmp_path, tiny_data):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    assert ImageFolder(copy).fingerprint() == ImageFolder(tiny_data).fingerprint()
    Image.new("L", (8, 8), 7).save(copy / "a" / "img_000.png")
    assert ImageFolder(copy).fingerprint() != ImageFolder(tiny_data).fingerprint()


def test_load_image_resizes_and_center_crops(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255  # a white centre band that fills the crop after resizing to 8×16
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", resolution=8, channels=3)
    assert image.shape == (3, 8, 8)
    assert image.min() >= -1 and image.max() <= 1
    assert image[:, :, 2:6].mean() > 0.9  # the centre of the crop is the white band


def test_save_then_load_round_trips(tmp_path):
    image = torch.linspace(-1, 1, 64).view(1, 8, 8)
    save_image(image, tmp_path / "x.png")
    assert torch.allclose(load_image(tmp_path / "x.png", resolution=8, channels=1), image, atol=1 / 127)


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DiffattrError, match="bad.png: cannot read this image"):
        load_image(tmp_path / "bad.png", resolution=8, channels=1)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DiffattrError, match="holds no image"):
        ImageFolder(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DiffattrError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/passwd"])
def test_metadata_cannot_escape_the_folder(tmp_path, file_name):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (8, 8)).save(data / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "outside.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": file_name}) + "\n")
    with pytest.raises(DiffattrError, match="outside the data folder"):
        ImageFolder(data)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", data / "link.png")
    with pytest.raises(DiffattrError, match="link.png is a link to a file outside"):
        ImageFolder(data)


def test_bad_metadata_lines_name_the_line(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n{oops\n')
    with pytest.raises(DiffattrError, match=r"metadata.jsonl:2: not valid JSON"):
        ImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "label": 1.5}\n')
    with pytest.raises(DiffattrError, match="a label must be an integer class index or a class name"):
        ImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n{"file_name": "./x.png"}\n')
    with pytest.raises(DiffattrError, match="metadata.jsonl:2: 'x.png' is listed twice"):
        ImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png"}\n')
    with pytest.raises(DiffattrError, match="missing.png' does not exist"):
        ImageFolder(tmp_path)
