"""Hostile input, replayed: every case of the hardening probe gets a clear one-line error (or, where
the input is valid, the right result), never a traceback, a half-written run directory or a number
computed under other settings.

Each test names the probe's case (issue 15) it replays. The CLI runs in-process (``main``) with
``--quiet``, so stderr holds only what a user would read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from diffattr.attributor import _sidecar_prompt
from diffattr.cli import main
from diffattr.data import ImageFolder, load_image
from diffattr.demo import assets_dir
from diffattr.errors import DiffattrError
from diffattr.store import write_json

from .conftest import make_tiny_model, write_images

FAST = ["--quiet", "--device", "cpu", "--timesteps", "3", "--aggregation", "loss"]
PERTURB = ["--steps", "2", "--draws-per-step", "4", "--lr", "1e-3"]


def cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of ``diffattr *args``; argparse's own refusals exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line_error(capsys, *args, match: str) -> str:
    code, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")]
    assert code == 2, err
    assert len(lines) == 1 and match in lines[0], err
    return lines[0]


@pytest.fixture
def data(tmp_path, tiny_data) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    return folder


def common(model, train, run_dir, *extra):
    return ["--model", model, "--train", train, "--run-dir", run_dir, *FAST, *extra]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model, tiny_data) -> Path:
    """A run directory whose cache is computed once (seed 0); tests tamper with copies of it."""
    run_dir = tmp_path_factory.mktemp("cached") / "run"
    assert main(["cache", *map(str, common(tiny_model, tiny_data, run_dir))]) == 0
    return run_dir


@pytest.fixture
def run_dir(tmp_path, cached) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(cached, copy)
    return copy


# -- 1. a cached artifact is used only under the settings it was computed under -------------------


def test_1_deleting_config_then_changing_the_seed_does_not_reuse_the_old_cache(capsys, run_dir, tiny_model, tiny_data):
    (run_dir / "config.json").write_text("{broken")
    advice = one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir), match="config.json")
    assert "delete the run directory" in advice  # not "delete it": that would orphan the cache
    (run_dir / "config.json").unlink()  # what a user may still do
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir, "--seed", "1"), match="other settings than")


def test_1_another_model_is_refused_by_the_artifacts_too(capsys, tmp_path, run_dir, tiny_data):
    (run_dir / "config.json").unlink()
    other = make_tiny_model(tmp_path / "other_model", seed=1)
    one_line_error(capsys, "cache", *common(other, tiny_data, run_dir), match="other settings than")


def test_1_the_same_settings_after_deleting_config_reuse_the_cache(capsys, run_dir, tiny_model, tiny_data):
    before = (run_dir / "baseline.safetensors").read_bytes()
    (run_dir / "config.json").unlink()
    code, err = cli(capsys, "cache", *common(tiny_model, tiny_data, run_dir))
    assert code == 0, err
    assert (run_dir / "baseline.safetensors").read_bytes() == before


def test_1_a_baseline_of_another_run_is_refused_by_name(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    other = tmp_path / "other"
    assert cli(capsys, "cache", *common(tiny_model, tiny_data, other, "--seed", "1"))[0] == 0
    shutil.copy(other / "baseline.safetensors", run_dir / "baseline.safetensors")
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir), match="baseline.safetensors")


def test_1_a_query_result_of_another_run_is_refused_by_the_gallery(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    other = tmp_path / "other"
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, other, "--seed", "1", *PERTURB, "--query", query)
    assert cli(capsys, "attribute", *args)[0] == 0
    shutil.copytree(other / "queries", run_dir / "queries")
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="result.json")


def test_1_an_audit_without_its_settings_is_refused(capsys, run_dir, tiny_model, tiny_data):
    args = common(tiny_model, tiny_data, run_dir)
    assert cli(capsys, "audit", *args)[0] == 0
    (run_dir / "audit" / "config.json").unlink()
    one_line_error(capsys, "audit", *args, match="holds an audit's files but not its config.json")


# -- 2. images by their real bit depth and mode ---------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_rgb16(path: Path, values: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL writes none), from ``(H, W, 3)`` uint16 values."""
    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_2_sixteen_bit_greyscale_is_scaled_not_binarised(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    expected = torch.from_numpy(ramp / 65535.0).float() * 2 - 1
    for channels in (1, 3, 4):
        loaded = load_image(tmp_path / "grey16.png", resolution=8, channels=channels)
        assert torch.allclose(loaded[0], expected, atol=1e-5)  # was +1.0 for every non-zero pixel
        assert torch.allclose(loaded[:3], loaded[:1].expand(min(channels, 3), -1, -1))
        if channels == 4:
            assert torch.all(loaded[3] == 1.0)
    resized = load_image(tmp_path / "grey16.png", resolution=4, channels=1)
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "grey8.png")
    assert torch.allclose(
        resized, load_image(tmp_path / "grey8.png", resolution=4, channels=1), atol=4 / 255
    )  # 8-bit rounding


def test_2_sixteen_bit_rgb_and_every_eight_bit_mode_read_alike(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _png_rgb16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    reference = Image.fromarray(rgb, mode="RGB")
    for mode in ("RGB", "RGBA", "CMYK"):
        reference.convert(mode).save(tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}")
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    for name in ("rgb16.png", "RGB.png", "RGBA.png", "CMYK.tif"):
        assert torch.allclose(load_image(tmp_path / name, resolution=8, channels=3), expected, atol=1e-5), name
    grey = reference.convert("L")
    grey.save(tmp_path / "L.png")
    grey.convert("LA").save(tmp_path / "LA.png")
    grey.convert("P").save(tmp_path / "P.png")
    expected = torch.from_numpy(np.array(grey)).float()[None] / 127.5 - 1
    for name in ("L.png", "LA.png", "P.png"):
        assert torch.allclose(load_image(tmp_path / name, resolution=8, channels=1), expected, atol=1e-5), name


# -- 3. non-finite numbers are errors, JSON is strict ---------------------------------------------


def test_3_an_infinite_learning_rate_is_refused(capsys, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, run_dir, "--query", query, "--steps", "2", "--lr", "inf")
    one_line_error(capsys, "attribute", *args, match="--lr inf: must be a finite number")


def test_3_a_diverging_perturbation_is_an_error_naming_the_flag(capsys, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, run_dir, "--query", query, "--steps", "3", "--draws-per-step", "4")
    line = one_line_error(capsys, "attribute", *args, "--lr", "1e30", "--optimizer", "sgd", match="--lr")
    assert "diverged" in line or "NaN" in line
    assert not list((run_dir / "queries").glob("*/result.json"))
    code, err = cli(capsys, "attribute", *args, "--lr", "1e-3")  # the advice, followed: not refused
    assert code == 0, err


def test_3_a_model_with_nan_weights_fails_at_the_baseline(capsys, tmp_path, tiny_data):
    from diffusers import UNet2DModel

    model = make_tiny_model(tmp_path / "nan_model")
    unet = UNet2DModel.from_pretrained(model / "unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(model / "unet")
    one_line_error(capsys, "cache", *common(model, tiny_data, tmp_path / "run"), match="the baseline losses hold")
    assert not (tmp_path / "run" / "baseline.safetensors").exists()


def test_3_json_is_always_strict(tmp_path):
    with pytest.raises(DiffattrError, match="non-finite"):
        write_json(tmp_path / "x.json", {"score": float("nan")})
    assert not (tmp_path / "x.json").exists()


# -- 4. one bad training image: fix it and rerun ------------------------------------------------


def test_4_removing_a_bad_training_image_lets_the_rerun_through(capsys, tmp_path, tiny_model, data):
    bad = data / "b" / "img_007.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    one_line_error(capsys, "cache", *common(tiny_model, data, run), match=f"{bad}: cannot read this image")
    bad.unlink()  # as the message says, with its metadata line
    lines = (data / "metadata.jsonl").read_text().splitlines(keepends=True)
    (data / "metadata.jsonl").write_text("".join(line for line in lines if "img_007" not in line))
    code, err = cli(capsys, "cache", *common(tiny_model, data, run))
    assert code == 0, err
    assert len(json.loads((run / "ids.json").read_text())) == 11


# -- 5. no traceback reaches the user ----------------------------------------------------------


def test_5_non_utf8_metadata_and_sidecars_are_named(capsys, tmp_path, tiny_model, data):
    (data / "metadata.jsonl").write_bytes(b'{"file_name": "a/img_000.png", "text": "caf\xe9"}\n')
    one_line_error(capsys, "cache", *common(tiny_model, data, tmp_path / "run"), match="not UTF-8 text")
    query = tmp_path / "q.png"
    Image.new("L", (8, 8)).save(query)
    query.with_suffix(".txt").write_bytes(b"caf\xe9")
    with pytest.raises(DiffattrError, match="q.txt: not UTF-8 text"):
        _sidecar_prompt(query)


def test_5_a_non_utf8_file_name_in_the_data_is_named(capsys, tmp_path, tiny_model, data):
    name = os.fsdecode(b"a/bad\xff.png")
    shutil.copy(data / "a" / "img_000.png", data / name)
    one_line_error(capsys, "cache", *common(tiny_model, data, tmp_path / "run"), match="not valid UTF-8")


@pytest.mark.parametrize(
    "query", ["nul\0byte.png", os.fsdecode(b"bad\xff.png"), "x" * 300 + ".png"], ids=["nul", "utf8", "long"]
)
def test_5_query_names_no_file_could_have_are_refused_by_argparse(capsys, tmp_path, tiny_model, tiny_data, query):
    code, err = cli(capsys, "attribute", *common(tiny_model, tiny_data, tmp_path / "run"), "--query", query)
    assert code == 2 and err.count("\n") == 1 and err.startswith("diffattr: error: attribute: argument --query")
    assert not (tmp_path / "run").exists()


def test_5_a_pathological_json_line_is_named(capsys, tmp_path, tiny_model, data):
    (data / "metadata.jsonl").write_text("[" * 100_000 + "\n")
    one_line_error(capsys, "cache", *common(tiny_model, data, tmp_path / "run"), match="metadata.jsonl:1")


@pytest.mark.parametrize("device", ["bogus", "cuda:7", "cuda"])
def test_5_a_device_this_machine_lacks_is_named(capsys, tmp_path, tiny_model, tiny_data, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [a for a in common(tiny_model, tiny_data, tmp_path / "run") if a not in ("--device", "cpu")]
    one_line_error(capsys, "cache", *args, "--device", device, match=f"--device {device}")


def test_5_a_scheduler_folder_naming_another_class_is_named(capsys, tmp_path, tiny_data):
    model = make_tiny_model(tmp_path / "model")
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet2DModel"}))
    one_line_error(
        capsys, "cache", *common(model, tiny_data, tmp_path / "run"), match="is not a diffusers scheduler class"
    )


def test_5_an_unloadable_text_encoder_is_named(tmp_path):
    from transformers import CLIPTextConfig

    from diffattr.models import _load_component

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["CLIPTextModel"]
    config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(DiffattrError, match="text_encoder folder .*cannot load the model"):
        _load_component("text_encoder", folder)


def test_5_pickled_weights_with_code_are_refused_and_never_run(capsys, tmp_path, tiny_data):
    model = make_tiny_model(tmp_path / "model")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    weights = model / "unet"
    for path in weights.glob("diffusion_pytorch_model*"):
        path.unlink()
    torch.save({"conv_in.weight": Payload()}, weights / "diffusion_pytorch_model.bin")
    one_line_error(capsys, "cache", *common(model, tiny_data, tmp_path / "run"), match="cannot load the model")
    assert not marker.exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"model": [1]}', "dir"], ids=["list", "section", "directory"])
def test_5_a_config_json_of_the_wrong_shape_is_named(capsys, tmp_path, tiny_model, tiny_data, content):
    run = tmp_path / "run"
    run.mkdir()
    if content == "dir":
        (run / "config.json").mkdir()
    else:
        (run / "config.json").write_text(content)
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run), match="config.json")


def test_5_ctrl_c_and_unexpected_errors_are_one_line(capsys, monkeypatch, tmp_path, tiny_model, tiny_data):
    import diffattr.cli

    args = ["cache", *common(tiny_model, tiny_data, tmp_path / "run")]

    def interrupted(arguments):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffattr.cli, "run", interrupted)
    code, err = cli(capsys, *args)
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err

    def broken(arguments):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(diffattr.cli, "run", broken)
    code, err = cli(capsys, *args)
    assert code == 1 and err.count("\n") == 1 and "something unforeseen" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main([str(a) for a in [*args, "--debug"]])


# -- 6. cached tensors are checked when read ----------------------------------------------------


def _rewrite(path: Path, change) -> None:
    """Rewrites a safetensors file through ``change(tensors)``, keeping its metadata (and stamp)."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file({key: value.contiguous() for key, value in change(tensors).items()}, path, metadata=metadata)


@pytest.mark.parametrize(
    "file, change, match",
    [
        ("baseline.safetensors", lambda t: {**t, "baseline": t["baseline"].clone().fill_(float("nan"))}, "NaN"),
        ("baseline.safetensors", lambda t: {**t, "baseline": t["baseline"].long()}, "dtype"),
        ("baseline.safetensors", lambda t: {**t, "baseline": t["baseline"][:5]}, "shape"),
        ("baseline.safetensors", lambda t: {"timesteps": t["timesteps"]}, "no tensor 'baseline'"),
        ("encodings/00000.safetensors", lambda t: {**t, "encodings": t["encodings"][:, :, :4]}, "shape"),
        ("encodings/00000.safetensors", lambda t: {**t, "encodings": t["encodings"] * float("inf")}, "NaN"),
        ("encodings/00000.safetensors", lambda t: {**t, "encodings": t["encodings"].long()}, "dtype"),
        ("baseline.safetensors", lambda t: {**t, "baseline": t["baseline"].bfloat16()}, "dtype"),
    ],
    ids=[
        "baseline-nan",
        "baseline-int",
        "baseline-shape",
        "baseline-key",
        "encodings-shape",
        "encodings-inf",
        "encodings-int",
        "baseline-bf16",
    ],
)
def test_6_a_damaged_cache_is_named(capsys, run_dir, tiny_model, tiny_data, file, change, match):
    _rewrite(run_dir / file, change)
    line = one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir), match=file.split("/")[-1])
    assert match in line


def test_6_a_truncated_shard_is_named_and_once_deleted_recomputed(capsys, run_dir, tiny_model, tiny_data):
    shard = run_dir / "encodings" / "00000.safetensors"
    before = shard.read_bytes()
    shard.write_bytes(before[:100])
    line = one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir), match="00000.safetensors")
    assert "delete it to recompute" in line
    shard.unlink()  # as the message says: the shard is recomputed, the same bytes
    assert cli(capsys, "cache", *common(tiny_model, tiny_data, run_dir))[0] == 0
    assert shard.read_bytes() == before


# -- 7. JSONL splits on newlines only ----------------------------------------------------------


def test_7_captions_with_unicode_line_separators_are_kept(data):
    captions = {"a/img_000.png": "one\u2028two", "b/img_001.png": "three\x85four", "a/img_002.png": "crlf"}
    lines = [json.dumps({"file_name": name, "text": text}, ensure_ascii=False) for name, text in captions.items()]
    (data / "metadata.jsonl").write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    texts = {record.id: record.text for record in ImageFolder(data).records}
    assert {name: texts[name] for name in captions} == captions


# -- 8. the minor cases -------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width × height`` pixels: the size check must refuse it before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b""))


def test_8_an_image_over_the_pixel_limit_is_refused_undecoded(capsys, tmp_path, tiny_model, data):
    _png_header_only(data / "a" / "huge.png", 12_000, 12_000)  # 144 Mpixels
    with pytest.raises(DiffattrError, match="more than the 100,000,000 accepted"):
        load_image(data / "a" / "huge.png", resolution=8, channels=1)
    (data / "a" / "huge.png").unlink()
    args = common(tiny_model, data, tmp_path / "run", "--max-image-pixels", "50")  # the 8x8 images: 64
    one_line_error(capsys, "cache", *args, match="raise --max-image-pixels")


def test_8_a_linked_folder_leading_outside_is_refused(tmp_path, data):
    outside = tmp_path / "outside"
    write_images(outside, 2)
    (data / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DiffattrError, match="link to a folder outside"):
        ImageFolder(data)


def test_8_metadata_naming_a_non_image_or_being_a_folder_is_refused(data):
    (data / "notes.txt").write_text("hello")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "notes.txt", "text": "x"}) + "\n")
    with pytest.raises(DiffattrError, match="is not an image"):
        ImageFolder(data)
    (data / "metadata.jsonl").unlink()
    (data / "metadata.jsonl").mkdir()
    with pytest.raises(DiffattrError, match="metadata.jsonl is not a file"):
        ImageFolder(data)


def test_8_an_empty_sidecar_prompt_is_an_error(tmp_path):
    query = tmp_path / "q.png"
    Image.new("L", (8, 8)).save(query)
    query.with_suffix(".txt").write_text("  \n")
    with pytest.raises(DiffattrError, match="q.txt is empty"):
        _sidecar_prompt(query)


def test_8_the_gallery_forbids_everything_it_does_not_load(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    assert cli(capsys, "gallery", "--run-dir", run_dir, "--quiet")[0] == 0
    page = (run_dir / "gallery" / "index.html").read_text()
    assert "default-src 'none'" in page and "script-src" not in page


# -- what held already, kept holding ------------------------------------------------------------


def test_scores_are_bit_identical_across_runs_and_nothing_is_written_outside(capsys, tmp_path, tiny_model, data):
    query = data / "a" / "img_000.png"
    before = sorted(p for p in tmp_path.rglob("*") if "run" not in p.parts)
    scores = []
    for name in ("run1", "run2"):
        code, err = cli(capsys, "attribute", *common(tiny_model, data, tmp_path / name, *PERTURB, "--query", query))
        assert code == 0, err
        (result,) = (tmp_path / name / "queries").glob("*/scores.safetensors")
        with safe_open(result, framework="pt") as handle:
            scores.append(handle.get_tensor("scores"))
    assert torch.equal(scores[0], scores[1])
    after = sorted(p for p in tmp_path.rglob("*") if not ({"run1", "run2"} & set(p.parts)))
    assert [p for p in after if p not in before] == []


def test_two_processes_with_different_settings_on_one_run_directory(capsys, tmp_path, tiny_model, tiny_data):
    """Started together on a fresh run directory: the lock lets one write its settings, the other is refused."""
    run = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "diffattr", "cache", *map(str, common(tiny_model, tiny_data, run)), "--seed", seed],
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for seed in ("0", "1")
    ]
    outcomes = sorted((process.wait(timeout=300), process.stderr.read()) for process in processes)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "was made with other settings" in outcomes[1][1] and "Traceback" not in outcomes[1][1]
    winner = json.loads((run / "config.json").read_text())["scoring"]["seed"]
    code, err = cli(capsys, "cache", *common(tiny_model, tiny_data, run), "--seed", winner)
    assert code == 0, err  # the cache on disk is the winner's, stamps and all


def test_a_refused_run_leaves_the_settings_of_the_run_that_wrote_them(tmp_path, tiny_model, tiny_data):
    """The race above, interleaved by hand: the loser saw no settings when it began, the winner
    wrote its own before the loser's check, and the loser's refusal must not delete them (it
    did, so the winner's cache lost its config.json while the winner went on)."""
    from diffattr import Attributor, ScoringConfig
    from diffattr.store import RunDirectory

    run = tmp_path / "run"
    winner = Attributor(tiny_model, tiny_data, run, scoring=ScoringConfig(num_timesteps=3, seed=0), progress=False)
    loser = Attributor(tiny_model, tiny_data, run, scoring=ScoringConfig(num_timesteps=3, seed=1), progress=False)
    check = loser.run.check_or_write_config

    def winner_writes_first(config):
        RunDirectory(run).check_or_write_config(winner.run_config(with_attribution=False))
        check(config)

    loser.run.check_or_write_config = winner_writes_first
    with pytest.raises(DiffattrError, match="was made with other settings"):
        loser.cache()
    assert json.loads((run / "config.json").read_text())["scoring"]["seed"] == 0
    winner.cache()  # the saved settings are the winner's


# -- found by the final probe -------------------------------------------------------------------


def test_probe_a_fifo_never_blocks(tmp_path, data):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DiffattrError, match="not a regular file"):
        load_image(tmp_path / "fifo.png", resolution=8, channels=1)
    os.mkfifo(data / "a" / "fifo.png")
    with pytest.raises(DiffattrError, match="not a regular file"):
        ImageFolder(data)


@pytest.mark.parametrize(
    "row, match",
    [
        ('{"file_name": "a/img_000.png", "text": "\\ud800"}', "surrogate"),
        ('{"file_name": "a/img_000.png", "label": 1' + "0" * 5000 + "}", "not a usable JSON line"),
        ('{"file_name": "a/img\\u0000.png"}', "not a usable path"),
    ],
    ids=["surrogate", "huge-int", "nul"],
)
def test_probe_metadata_that_python_cannot_take_is_named(data, row, match):
    (data / "metadata.jsonl").write_text(row + "\n")
    with pytest.raises(DiffattrError, match=match):
        ImageFolder(data)


def test_probe_links_that_loop_and_names_with_control_characters_are_named(data):
    (data / "a" / "loop.png").symlink_to("loop.png")
    with pytest.raises(DiffattrError, match="cannot follow this link"):
        ImageFolder(data)
    (data / "a" / "loop.png").unlink()
    shutil.copy(data / "a" / "img_000.png", data / "a" / "red\x1b[31m.png")
    with pytest.raises(DiffattrError, match="control characters"):
        ImageFolder(data)


def test_probe_the_pixel_flag_governs_and_elongated_images_are_refused(capsys, tmp_path, tiny_model, tiny_data):
    _png_header_only(tmp_path / "big.png", 20_000, 20_000)  # beyond PIL's own limit
    with pytest.raises(DiffattrError) as error:
        load_image(tmp_path / "big.png", resolution=8, channels=1, max_pixels=10**9)
    assert "decompression bomb" not in str(error.value)
    _png_header_only(tmp_path / "long.png", 1, 10_000_000)
    with pytest.raises(DiffattrError, match="too elongated"):
        load_image(tmp_path / "long.png", resolution=8, channels=1)
    args = common(tiny_model, tiny_data, tmp_path / "run", "--max-image-pixels", "0")
    one_line_error(capsys, "cache", *args, match="--max-image-pixels 0: must be at least 1")


def test_probe_the_gallery_shows_candidates_and_reads_no_linked_query(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query, "--candidates", "2")
    assert cli(capsys, "attribute", *args)[0] == 0
    code, err = cli(capsys, "gallery", "--run-dir", run_dir, "--quiet")
    assert code == 0, err
    (folder,) = (run_dir / "queries").iterdir()
    (folder / "query.png").unlink()
    (folder / "query.png").symlink_to(query)
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="is a link")


def test_probe_a_result_with_fields_of_the_wrong_type_is_no_traceback(capsys, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    (result,) = (run_dir / "queries").glob("*/result.json")
    record = json.loads(result.read_text())
    result.write_text(json.dumps({**record, "config": 5, "timings": [1]}))
    # An edited result is refused (the stamp covers its fields), in one line.
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="computed under other settings")


def test_probe_replicas_of_another_run_are_refused(capsys, tmp_path, tiny_model, tiny_data):
    audit = ["--samples", "2", "--sampling-steps", "3", "--alpha", "100", *PERTURB]
    runs = [tmp_path / "seed0", tmp_path / "seed1"]
    for seed, run in zip("01", runs):
        code, err = cli(capsys, "audit", *common(tiny_model, tiny_data, run, "--seed", seed, *audit))
        assert code == 0, err
    shutil.copy(runs[1] / "audit" / "replicas.json", runs[0] / "audit" / "replicas.json")
    one_line_error(
        capsys, "audit", *common(tiny_model, tiny_data, runs[0], "--seed", "0", *audit), match="replicas.json"
    )


def test_probe_a_null_loss_beyond_float32_is_refused(run_dir):
    from diffattr.store import RunDirectory

    run = RunDirectory(run_dir)
    run.save_json(run.file("null_loss.json"), {"null_loss": 1e300})
    with pytest.raises(DiffattrError, match="null_loss.json"):
        run.read_null_loss()


def test_probe_a_forward_inf_result_of_other_attribution_settings_is_refused(
    capsys, tmp_path, run_dir, tiny_model, tiny_data
):
    query = tiny_data / "a" / "img_000.png"
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for run, lr in ((run_dir, "1e-3"), (other, "1e-2")):
        args = common(tiny_model, tiny_data, run, "--steps", "2", "--draws-per-step", "4", "--lr", lr, "--query", query)
        assert cli(capsys, "attribute", *args)[0] == 0
    shutil.rmtree(run_dir / "queries")
    shutil.copytree(other / "queries", run_dir / "queries")  # same model, data and grid; another --lr
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="result.json")


def test_probe_the_gallery_refuses_changed_training_images_and_reordered_ids(capsys, tmp_path, tiny_model, data):
    run = tmp_path / "run"
    query = data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, data, run, *PERTURB, "--query", query))[0] == 0
    ids = json.loads((run / "ids.json").read_text())
    (run / "ids.json").write_text(json.dumps(ids[::-1]))
    one_line_error(capsys, "gallery", "--run-dir", run, "--quiet", match="ids.json")
    (run / "ids.json").write_text(json.dumps(ids))
    Image.new("L", (8, 8), 255).save(data / "a" / "img_002.png")
    one_line_error(capsys, "gallery", "--run-dir", run, "--quiet", match="has changed since the run")
    assert oct((run / "config.json").stat().st_mode & 0o777) != "0o600"


def test_reprobe_replicas_attributed_under_another_lr_are_refused(capsys, tmp_path, tiny_model, tiny_data):
    audit = ["--samples", "2", "--sampling-steps", "3", "--alpha", "100", "--steps", "2", "--draws-per-step", "4"]
    runs = [tmp_path / "lr4", tmp_path / "lr1"]
    for lr, run in zip(("1e-4", "1e-1"), runs):
        code, err = cli(capsys, "audit", *common(tiny_model, tiny_data, run, *audit, "--lr", lr))
        assert code == 0, err
    shutil.copy(runs[1] / "audit" / "replicas.json", runs[0] / "audit" / "replicas.json")
    (runs[0] / "audit" / "report.json").unlink()
    one_line_error(
        capsys, "audit", *common(tiny_model, tiny_data, runs[0], *audit, "--lr", "1e-4"), match="replicas.json"
    )


def test_reprobe_a_result_whose_top_is_not_a_list_is_no_traceback(capsys, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    (result,) = (run_dir / "queries").glob("*/result.json")
    result.write_text(json.dumps({**json.loads(result.read_text()), "top": 5}))
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="computed under other settings")


def test_reprobe_a_flag_of_the_wrong_type_is_one_line(capsys, tmp_path, tiny_model, tiny_data):
    code, err = cli(capsys, "cache", *common(tiny_model, tiny_data, tmp_path / "run"), "--max-image-pixels", "1e9")
    assert code == 2 and err == "diffattr: error: cache: argument --max-image-pixels: invalid int value: '1e9'\n"


def test_last_probe_the_gallery_ranks_by_the_stamped_scores(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    (result,) = (run_dir / "queries").glob("*/result.json")
    record = json.loads(result.read_text())
    truth = [entry["id"] for entry in record["top"]]
    out = tmp_path / "site"
    code, err = cli(capsys, "gallery", "--run-dir", run_dir, "--out", out, "--quiet")
    assert code == 0, err
    (page,) = out.glob("query-*.html")
    html = page.read_text().split("</dl>", 1)[1]  # the ranked images, after the query's facts
    positions = [html.index(image_id) for image_id in truth]
    assert positions == sorted(positions)
    edited = [{**entry, "text": "edited"} for entry in record["top"][::-1]]  # the stamp is left in place
    result.write_text(json.dumps({**record, "top": edited}))
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--out", out, "--quiet", match="other settings")


def test_last_probe_a_folder_in_an_artifacts_place_is_named(capsys, run_dir, tiny_model, tiny_data):
    (run_dir / "baseline.safetensors").unlink()
    (run_dir / "baseline.safetensors").mkdir()
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run_dir), match="baseline.safetensors is not a file")


def test_last_probe_a_negative_fisher_is_refused(run_dir):
    from diffattr.store import RunDirectory

    run = RunDirectory(run_dir)
    settings = {"images": 4, "params": "all"}
    run.write_fisher(settings, {"w": torch.tensor([1.0, -0.5])})
    with pytest.raises(DiffattrError, match="negative"):
        run.read_fisher(settings, {"w": (2,)})


def test_last_probe_a_linked_image_keeps_its_own_caption(data):
    (data / "a" / "twin.png").symlink_to(data / "a" / "img_000.png")
    rows = [{"file_name": "a/img_000.png", "text": "original"}, {"file_name": "a/twin.png", "text": "twin"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    captions = {record.id: record.text for record in ImageFolder(data)}
    assert captions["a/img_000.png"] == "original" and captions["a/twin.png"] == "twin"


def test_last_probe_metadata_naming_an_image_the_scan_skips_is_refused(data):
    shutil.copy(data / "a" / "img_000.png", data / "a" / ".hidden.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a/.hidden.png", "text": "lost"}) + "\n")
    with pytest.raises(DiffattrError, match="which the folder scan skips"):
        ImageFolder(data)


def test_final_probe_a_run_or_gallery_inside_the_training_folder_is_refused(capsys, tmp_path, tiny_model, data):
    query = data / "a" / "img_000.png"
    args = common(tiny_model, data, data / "run", *PERTURB, "--query", query)
    one_line_error(capsys, "attribute", *args, match="is inside the training folder")
    assert not (data / "run").exists()
    run = tmp_path / "run"
    assert cli(capsys, "attribute", *common(tiny_model, data, run, *PERTURB, "--query", query))[0] == 0
    one_line_error(capsys, "gallery", "--run-dir", run, "--out", data / "site", "--quiet", match="inside the training")
    assert not (data / "site").exists()


def test_final_probe_samples_of_other_seeds_are_refused(capsys, tmp_path, tiny_model, tiny_data):
    audit = ["--samples", "2", "--sampling-steps", "3", "--alpha", "100", *PERTURB]
    runs = {seed: tmp_path / f"seed{seed}" for seed in ("0", "5")}
    for seed, run in runs.items():
        code, err = cli(capsys, "audit", *common(tiny_model, tiny_data, run, *audit, "--sample-seed", seed))
        assert code == 0, err
    for name in ("report.json", "replicas.json"):
        (runs["5"] / "audit" / name).unlink(missing_ok=True)
    shutil.copy(runs["0"] / "audit" / "samples.safetensors", runs["5"] / "audit" / "samples.safetensors")
    args = common(tiny_model, tiny_data, runs["5"], *audit, "--sample-seed", "5")
    one_line_error(capsys, "audit", *args, match="samples.safetensors holds the samples of seeds [0, 1]")


def test_final_probe_files_moved_between_query_folders_are_refused(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    queries = [tiny_data / "a" / "img_000.png", tiny_data / "b" / "img_001.png"]
    args = common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", queries[0], "--query", queries[1])
    assert cli(capsys, "attribute", *args)[0] == 0
    first, second = sorted((run_dir / "queries").iterdir())
    for name, match in (("scores.safetensors", "scores.safetensors"), ("query.png", "result.json")):
        shutil.copy(first / name, tmp_path / name)
        shutil.copy(second / name, first / name)  # the other query's file, under this query's name
        one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match=f"{first.name}/{match}")
        shutil.copy(tmp_path / name, first / name)
    assert cli(capsys, "gallery", "--run-dir", run_dir, "--quiet")[0] == 0


def test_final_probe_samples_of_other_sampling_steps_are_refused(capsys, tmp_path, tiny_model, tiny_data):
    runs = {steps: tmp_path / f"steps{steps}" for steps in ("3", "4")}
    for steps, run in runs.items():
        audit = ["--samples", "2", "--sampling-steps", steps, "--alpha", "100", *PERTURB]
        code, err = cli(capsys, "audit", *common(tiny_model, tiny_data, run, *audit))
        assert code == 0, err
    for name in ("report.json", "replicas.json"):
        (runs["4"] / "audit" / name).unlink(missing_ok=True)
    shutil.copy(runs["3"] / "audit" / "samples.safetensors", runs["4"] / "audit" / "samples.safetensors")
    audit = ["--samples", "2", "--sampling-steps", "4", "--alpha", "100", *PERTURB]
    one_line_error(
        capsys, "audit", *common(tiny_model, tiny_data, runs["4"], *audit), match="samples of --sampling-steps 3, not 4"
    )


def test_final_probe_rankings_in_which_every_image_ties_are_refused(capsys, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, run_dir, "--draws-per-step", "4", "--query", query)
    one_line_error(capsys, "attribute", *args, "--steps", "0", match="took no optimizer step")
    dtrak = [*args, "--method", "dtrak", "--projection-dim", "8"]
    one_line_error(capsys, "attribute", *dtrak, "--damping", "1e300", match="--damping 1e+300 is too large")
    assert cli(capsys, "attribute", *dtrak, "--damping", "1e3")[0] == 0
    assert [p.name for p in (run_dir / "queries").iterdir()] == [p.name for p in (run_dir / "queries").glob("*dtrak*")]


def test_final_probe_unreadable_files_and_folders_in_a_files_place_are_one_line(
    capsys, tmp_path, run_dir, tiny_model, tiny_data
):
    query = tiny_data / "a" / "img_000.png"
    args = common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query)
    assert cli(capsys, "attribute", *args)[0] == 0
    truncated = tmp_path / "clip.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    clip = ["--clip-model", str(Path(__file__).parent / "data" / "diffattr-tiny-clip.json"), "--clip-weights"]
    gallery = ["gallery", "--run-dir", run_dir, "--quiet", "--device", "cpu"]
    one_line_error(capsys, *gallery, *clip, truncated, match=f"--clip-weights {truncated}: cannot load it")
    (run_dir / ".lock").unlink(missing_ok=True)
    (run_dir / ".lock").mkdir()
    one_line_error(capsys, "attribute", *args, match=".lock: Is a directory")
    (run_dir / ".lock").rmdir()
    shutil.rmtree(run_dir / "queries")
    (run_dir / "queries").write_text("")
    one_line_error(capsys, "attribute", *args, match="queries")
    (tmp_path / "demo-out").write_text("")
    one_line_error(capsys, "demo", "--out", tmp_path / "demo-out", "--quiet", match="demo-out")


def test_final_probe_the_same_image_under_another_name_scores_the_same(
    capsys, tmp_path, run_dir, tiny_model, tiny_data
):
    # A query's noise is keyed by its content and condition, not by its file name.
    original = tiny_data / "a" / "img_000.png"
    renamed = tmp_path / "renamed.png"
    shutil.copy(original, renamed)
    for extra in ([], ["--method", "dtrak", "--projection-dim", "8"]):
        args = common(tiny_model, tiny_data, run_dir, *PERTURB, *extra, "--query", original, "--query", renamed)
        assert cli(capsys, "attribute", *args)[0] == 0
    for method in ("forward-inf", "dtrak"):
        scores = []
        for stem in ("img_000", "renamed"):
            (folder,) = [
                p for p in (run_dir / "queries").glob(f"{stem}-*") if ("dtrak" in p.name) == (method == "dtrak")
            ]
            with safe_open(folder / "scores.safetensors", "pt") as handle:
                scores.append(handle.get_tensor("scores"))
        assert torch.equal(*scores), method


def test_final_probe_the_gallery_shows_queries_per_pass_as_a_count(capsys, tmp_path, run_dir, tiny_model, tiny_data):
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    out = tmp_path / "site"
    assert cli(capsys, "gallery", "--run-dir", run_dir, "--out", out, "--quiet")[0] == 0
    (page,) = out.glob("query-*.html")
    assert "<dt>queries per pass</dt><dd>1</dd>" in page.read_text() and "per pass time" not in page.read_text()


# -- the second independent probe (stop 24) -------------------------------------------------------


@pytest.fixture
def attributed(capsys, run_dir, tiny_model, tiny_data) -> tuple[Path, Path]:
    """A run directory with one Forward-INF query, and that query's folder."""
    query = tiny_data / "a" / "img_000.png"
    assert cli(capsys, "attribute", *common(tiny_model, tiny_data, run_dir, *PERTURB, "--query", query))[0] == 0
    (folder,) = (run_dir / "queries").iterdir()
    return run_dir, folder


@pytest.mark.parametrize("field", ["top", "prompt", "label", "query"])
def test_second_probe_an_edited_result_is_refused_by_export_and_gallery(capsys, tmp_path, attributed, field):
    run_dir, folder = attributed
    record = json.loads((folder / "result.json").read_text())
    edited = {"top": [{**record["top"][0], "score": 12345.0}], "prompt": "EDITED", "label": 7, "query": "/etc/passwd"}
    write_json(folder / "result.json", {**record, field: edited[field]})
    for verb in (["export", "--out", tmp_path / "rows.csv"], ["gallery", "--out", tmp_path / "site", "--quiet"]):
        one_line_error(capsys, verb[0], "--run-dir", run_dir, *verb[1:], match="computed under other settings")
    assert not (tmp_path / "rows.csv").exists()


def test_second_probe_a_missing_scores_file_or_ids_json_is_refused(capsys, tmp_path, attributed):
    run_dir, folder = attributed
    ids = (run_dir / "ids.json").read_bytes()
    (run_dir / "ids.json").unlink()
    one_line_error(capsys, "export", "--run-dir", run_dir, "--out", tmp_path / "a.csv", match="ids.json is missing")
    (run_dir / "ids.json").write_bytes(ids)
    (folder / "scores.safetensors").unlink()
    one_line_error(
        capsys, "export", "--run-dir", run_dir, "--out", tmp_path / "b.csv", match="scores.safetensors is missing"
    )
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="scores.safetensors is missing")


@pytest.mark.parametrize("target", ["config.json", "ids.json", "queries/x.csv", "encodings/rows.csv", "audit.csv"])
def test_second_probe_export_never_writes_over_the_run_directorys_files(capsys, attributed, target):
    run_dir, folder = attributed
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    out = run_dir / target if target != "audit.csv" else folder / "result.csv"
    one_line_error(capsys, "export", "--run-dir", run_dir, "--out", out, match="is a file of the run directory")
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert cli(capsys, "export", "--run-dir", run_dir, "--out", run_dir / "rows.csv")[0] == 0  # beside them: fine


def test_second_probe_a_folder_with_another_programs_config_json_is_not_a_run_directory(
    capsys, tmp_path, tiny_model, tiny_data
):
    unet = tmp_path / "unet"  # a model's own folder (inside the model folder it is refused as such)
    shutil.copytree(tiny_model / "unet", unet)
    unet_config = (unet / "config.json").read_bytes()
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, unet), match="is not a diffattr run's config.json")
    assert (unet / "config.json").read_bytes() == unet_config
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"my": "settings"}')
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, tmp_path / "other"), match="another program's")
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {"my": "settings"}


def test_second_probe_class_folders_mixing_integers_and_names_are_refused(capsys, tmp_path, tiny_model):
    for folder in ("2", "cat"):
        for i in range(2):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "data" / folder / f"{i}.png")
    one_line_error(
        capsys, "cache", *common(tiny_model, tmp_path / "data", tmp_path / "run"), match="labels mix integers"
    )


def test_second_probe_csv_headers_named_twice_are_refused_and_a_byte_order_mark_is_read(tmp_path, tiny_data):
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    body = "".join(f"{row['file_name']},{row['label']},{(row['label'] + 1) % 3}\n" for row in rows)
    (folder / "metadata.csv").write_text("file_name,label,label\n" + body)
    with pytest.raises(DiffattrError, match="'label' is named twice"):
        ImageFolder(folder)
    (folder / "metadata.csv").write_text(
        "\ufefffile_name,label\n" + "".join(line.rsplit(",", 1)[0] + "\n" for line in body.splitlines())
    )
    assert [record.label for record in ImageFolder(folder).records] == [
        row["label"] for row in sorted(rows, key=lambda r: r["file_name"])
    ]


def test_second_probe_python_api_values_of_the_wrong_type_are_one_clear_error(tmp_path, tiny_model, tiny_data):
    from diffattr import AttributionConfig, Attributor, ScoringConfig

    with pytest.raises(DiffattrError, match="--steps 2.5: must be an integer"):
        AttributionConfig(steps=2.5)  # it never equalled the step count: the perturbation looped forever
    with pytest.raises(DiffattrError, match="--timesteps 3.5: must be an integer"):
        ScoringConfig(num_timesteps=3.5)
    with pytest.raises(DiffattrError, match="--lr 'x': must be a number"):
        AttributionConfig(learning_rate="x")
    assert AttributionConfig(learning_rate=1).to_dict() == AttributionConfig(learning_rate=1.0).to_dict()
    with pytest.raises(DiffattrError, match="run_dir must be a folder path"):
        Attributor(tiny_model, tiny_data, None)
    attributor = Attributor(
        tiny_model, tiny_data, tmp_path / "run", scoring={"num_timesteps": 3}, device="cpu", progress=False
    )
    assert attributor.scoring == ScoringConfig(num_timesteps=3)
    query = tiny_data / "a" / "img_000.png"
    for kwargs, match in [
        ({"top_k": 2.5}, "--top-k 2.5: must be an integer"),
        ({"candidates": 2.5}, "--candidates 2.5: must be an integer"),
        ({"labels": 1.5}, "--label 1.5: a label is an integer"),
    ]:
        with pytest.raises(DiffattrError, match=match):
            attributor.attribute(query, **kwargs)
    pixels = torch.zeros(1, 8, 8)
    for bad, match in [
        (pixels.clone().fill_(float("nan")), "NaN or infinite"),
        (pixels.clone().fill_(255.0), r"values in \[-1, 1\], got 255"),
        (Image.new("L", (0, 0)), "0×0 pixels"),
    ]:
        with pytest.raises(DiffattrError, match=match):
            attributor.attribute(bad)
    assert not (tmp_path / "run" / "baseline.safetensors").exists()  # all refused before the long pass


@pytest.mark.parametrize("mode", ["I", "F", "CMYK", "YCbCr", "LAB", "HSV"])
def test_second_probe_a_query_object_in_any_pil_mode_is_kept_and_read(tmp_path, mode):
    from diffattr.data import image_file_bytes

    ramp = np.stack([*np.meshgrid(np.arange(8) * 30, np.arange(8) * 20), np.full((8, 8), 90)], -1).astype(np.uint8)
    image = Image.fromarray(ramp, mode="RGB")
    converted = image.convert("L").convert(mode) if mode in ("I", "F") else image.convert(mode)
    content, suffix = image_file_bytes(converted)  # PNG cannot hold these modes: raised OSError before
    assert suffix == (".png" if mode == "HSV" else ".tif")
    path = tmp_path / f"query{suffix}"
    path.write_bytes(content)
    pixels = load_image(path, channels=3, resolution=8)
    assert pixels.shape == (3, 8, 8) and torch.isfinite(pixels).all()
    assert mode in ("I", "F") or pixels.std() > 0.1  # colour modes keep their picture


def test_second_probe_control_characters_of_captions_and_prompts_are_shown_not_written(
    capsys, tmp_path, tiny_model, tiny_data
):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = "nul\x00bell\x07esc\x1b[31m rtl\u202eabc"
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = common(tiny_model, data, tmp_path / "captions", *PERTURB, "--query", data / rows[0]["file_name"])
    code, err = cli(capsys, "attribute", *args)
    assert code == 0, err
    assert cli(capsys, "gallery", "--run-dir", tmp_path / "captions", "--quiet")[0] == 0
    html = "".join(page.read_text() for page in (tmp_path / "captions" / "gallery").glob("*.html"))
    assert "nul\\u0000bell\\u0007esc\\u001b[31m rtl\\u202eabc" in html
    assert not any(character in html for character in "\x00\x07\x1b\u202e")


# -- the re-probe of the second probe's fixes -----------------------------------------------------


def test_reprobe_edited_scores_with_their_stamp_kept_are_refused(capsys, tmp_path, attributed):
    from safetensors.torch import save_file as save

    run_dir, folder = attributed
    path = folder / "scores.safetensors"
    with safe_open(path, "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["scores"][3] = 99.0
    save(tensors, path, metadata=metadata)
    one_line_error(capsys, "export", "--run-dir", run_dir, "--out", tmp_path / "x.csv", match="or edited since")
    one_line_error(capsys, "gallery", "--run-dir", run_dir, "--quiet", match="scores.safetensors was computed")


def test_reprobe_a_run_directory_inside_the_model_folder_is_refused(capsys, tmp_path, tiny_model, tiny_data):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for run in (model / "scheduler", model):
        one_line_error(capsys, "cache", *common(model, tiny_data, run), match="is inside the model folder")
    assert sorted(p.name for p in (model / "scheduler").iterdir()) == ["scheduler_config.json"]


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_reprobe_a_sixteen_bit_query_object_of_either_byte_order_keeps_its_values(tmp_path, mode):
    from diffattr.data import image_file_bytes

    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    image = Image.frombytes(mode, (8, 8), values.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    content, suffix = image_file_bytes(image)
    (tmp_path / f"q{suffix}").write_bytes(content)
    pixels = load_image(tmp_path / f"q{suffix}", channels=1, resolution=8)
    torch.testing.assert_close(pixels[0], torch.from_numpy(values / 65535.0 * 2 - 1).float(), atol=1e-4, rtol=0)


def test_reprobe_odd_query_objects_are_one_clear_error(tmp_path):
    from diffattr.data import image_file_bytes

    closed = Image.new("L", (8, 8))
    closed.close()
    for bad, match in [
        (torch.zeros(3, 8, 8, dtype=torch.complex64), "real pixel values"),
        (torch.empty(3, 8, 8, device="meta"), "real pixel values"),
        (closed, "could not be encoded"),
    ]:
        with pytest.raises(DiffattrError, match=match):
            image_file_bytes(bad)


# -- the last probe: shards in their places, settings of a first failed run, flags named ----------


def test_last_probe_shards_swapped_between_names_are_refused(capsys, monkeypatch, tmp_path, tiny_model, tiny_data):
    monkeypatch.setattr("diffattr.attributor.ENCODING_SHARD_ROWS", 5)  # 12 images: 3 shards
    run = tmp_path / "run"
    assert cli(capsys, "cache", *common(tiny_model, tiny_data, run))[0] == 0
    first, second = run / "encodings" / "00000.safetensors", run / "encodings" / "00001.safetensors"
    first.rename(run / "x")
    second.rename(first)
    (run / "x").rename(second)
    one_line_error(capsys, "cache", *common(tiny_model, tiny_data, run), match="encodings/0000")


def test_last_probe_a_pixel_baseline_of_a_latent_model_leaves_no_settings_after_a_bad_image(capsys, tmp_path):
    data = tmp_path / "concept"
    shutil.copytree(assets_dir() / "tiny-sd" / "concept", data)
    good = (data / "sks_2.png").read_bytes()
    (data / "sks_2.png").write_bytes(good[:60])
    args = ["--model", assets_dir() / "tiny-sd" / "model", "--train", data, "--run-dir", tmp_path / "run"]
    args += ["--quiet", "--timesteps", "2", "--query", data / "sks_0.png", "--prompt", "x", "--method", "pixel"]
    one_line_error(capsys, "attribute", *args, match="sks_2.png: cannot read this image")
    (data / "sks_2.png").write_bytes(good)  # fixed: the rerun is not refused as another data set's
    code, err = cli(capsys, "attribute", *args)
    assert code == 0, err


def test_last_probe_a_bad_gradient_params_regex_is_named_before_anything_is_written(
    capsys, tmp_path, tiny_model, tiny_data
):
    run = tmp_path / "run"
    args = common(tiny_model, tiny_data, run, "--query", tiny_data / "a/img_000.png", "--method", "tracin")
    one_line_error(capsys, "attribute", *args, "--gradient-params", "[", match="--gradient-params '['")
    assert not run.exists()


def test_last_probe_a_damping_that_overflows_is_named_and_leaves_no_query_folder(
    capsys, tmp_path, tiny_model, tiny_data
):
    run = tmp_path / "run"
    args = common(tiny_model, tiny_data, run, "--query", tiny_data / "a/img_000.png", "--method", "dtrak")
    args += ["--projection-dim", "64", "--damping", "1e-300"]
    one_line_error(capsys, "attribute", *args, match="--damping")
    assert not any((run / "queries").glob("*")) if (run / "queries").exists() else True


def test_last_probe_safetensors_artifacts_follow_the_umask(tmp_path):
    from diffattr.store import write_tensors

    mask = os.umask(0o022)
    try:
        write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(mask)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
