import json
import shutil
import subprocess
import sys

from diffattr.cli import main


def test_cache_then_attribute(tmp_path, tiny_model, tiny_data, capsys):
    common = [
        "--model",
        str(tiny_model),
        "--train",
        str(tiny_data),
        "--run-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--quiet",
        "--timesteps",
        "3",
    ]
    assert main(["cache", *common]) == 0
    assert "baseline (12, 3)" in capsys.readouterr().out
    query = tiny_data / "b" / "img_001.png"
    code = main(
        [
            "attribute",
            *common,
            "--query",
            str(query),
            "--query",
            str(tiny_data / "a" / "img_000.png"),
            "--top-k",
            "3",
            "--steps",
            "2",
            "--draws-per-step",
            "8",
            "--lr",
            "0.01",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("rank") == 2 and "results in" in out
    results = sorted((tmp_path / "queries").glob("*/result.json"))
    assert len(results) == 2
    saved = json.loads(results[0].read_text())
    assert saved["config"]["attribution"]["learning_rate"] == 0.01 and len(saved["top"]) == 3


def test_bad_input_is_one_line_without_traceback(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffattr",
            "cache",
            "--model",
            str(tiny_model),
            "--train",
            str(empty),
            "--run-dir",
            str(tmp_path / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        f"diffattr: error: data folder {empty} holds no image "
        "(looked for .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"
    ]


def test_corrupt_training_image_is_named(tmp_path, tiny_model, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "b" / "img_007.png").write_bytes(b"GIF89a garbage")
    code = main(
        ["cache", "--model", str(tiny_model), "--train", str(data), "--run-dir", str(tmp_path / "run"), "--quiet"]
    )
    assert code == 2
    assert f"{data / 'b' / 'img_007.png'}: cannot read this image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "encodings.safetensors").exists()


def test_invalid_option_names_the_flag(tmp_path, tiny_model, tiny_data, capsys):
    code = main(
        [
            "attribute",
            "--model",
            str(tiny_model),
            "--train",
            str(tiny_data),
            "--run-dir",
            str(tmp_path),
            "--query",
            str(tiny_data / "a" / "img_000.png"),
            "--direction",
            "sideways",
            "--quiet",
        ]
    )
    assert code == 2
    assert "--direction 'sideways': must be one of ('descent', 'ascent')" in capsys.readouterr().err


def test_attribute_with_candidates_and_bf16(tmp_path, tiny_model, tiny_data, capsys):
    query = tiny_data / "b" / "img_001.png"
    common = ["--model", str(tiny_model), "--train", str(tiny_data), "--device", "cpu", "--quiet"]
    flags = ["--timesteps", "3", "--steps", "2", "--draws-per-step", "4", "--aggregation", "loss"]
    args = ["attribute", *common, *flags, "--query", str(query), "--candidates", "3"]
    assert main([*args, "--run-dir", str(tmp_path / "fp32")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert 3 <= len(lines) < 12 and lines[0][2] == "b/img_001.png"  # candidates only, the query itself first
    assert main([*args, "--run-dir", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "bf16"), "--dtype", "fp32"]) == 2  # another precision: refused
    assert "scoring.dtype" in capsys.readouterr().err
