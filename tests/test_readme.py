"""The README's commands and examples are the ones that run."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys, link_toy_run):
    example = re.findall(r"```python\n(.+?)```", README, flags=re.S)[0]  # the first: the toy, end to end
    monkeypatch.chdir(tmp_path)
    link_toy_run(tmp_path / "runs" / "toy")  # its baseline and calibration: computed once per session
    exec(compile(example, "README.md", "exec"), {})
    assert "digits/3/0013.png" in capsys.readouterr().out.splitlines()[3]  # ranks itself first
    assert (tmp_path / "runs" / "toy" / "baseline.safetensors").is_file()


def test_readme_pipeline_object_example_runs(tmp_path, monkeypatch, capsys):
    example = re.findall(r"```python\n(.+?)```", README, flags=re.S)[1]
    assert "pipe(prompt" in example and "Attributor(pipe" in example
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert sum("sks_" in line for line in lines) == 3  # the top-3 of the 4 exemplars
    (saved,) = (tmp_path / "runs" / "sd" / "inputs").glob("image-*.png")
    (result,) = (tmp_path / "runs" / "sd" / "queries").glob("*/result.json")
    assert Path(json.loads(result.read_text())["query"]).resolve() == saved.resolve()  # attributed as saved
