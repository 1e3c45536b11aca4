"""Sharding: two CPU processes under ``torchrun`` (gloo, one thread each) give the numbers of one
process, for the baseline, the calibration, a query, D-TRAK, the audit (its samples too) and AbU's
Fisher (``distributed.py``)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffattr import distributed

from .conftest import make_tiny_model, write_images

JOB = Path(__file__).with_name("sharded_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = make_tiny_model(root / "model", num_class_embeds=3)
    data = write_images(root / "data", 11)  # 11 images: the two blocks differ in size
    return model, data, data / "a/img_004.png", root


def test_two_processes_give_the_numbers_of_one(fixtures):
    model, data, query, root = fixtures
    single, sharded = root / "single", root / "sharded"
    _run([sys.executable, str(JOB), str(model), str(data), str(single), str(query)])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _run([*torchrun, "--master_port", str(_free_port()), str(JOB), str(model), str(data), str(sharded), str(query)])
    one, two = load_file(single / "numbers.safetensors"), load_file(sharded / "numbers.safetensors")
    assert one.keys() == two.keys() and one["replicas"] == 3
    for key in one:
        scale = max(one[key].abs().max().item(), 1e-12)
        # AbU's Fisher adds two blocks' float32 sums (rounding ~4e-8), which its fine-tuning carries on
        tolerance = 1e-5 if key == "abu" else 1e-6
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=tolerance * scale, msg=key)
    # a rerun of the sharded job on its own run directory resumes: everything is read back
    _run([*torchrun, "--master_port", str(_free_port()), str(JOB), str(model), str(data), str(sharded), str(query)])
    again = load_file(sharded / "numbers.safetensors")
    assert all(torch.equal(again[key], two[key]) for key in two)


def test_blocks_cover_the_rows_in_order(monkeypatch):
    for size in (1, 2, 3, 5):
        blocks = []
        for index in range(size):
            monkeypatch.setattr(distributed, "world_size", lambda size=size: size)
            monkeypatch.setattr(distributed, "rank", lambda index=index: index)
            blocks.append(distributed.block(11))
        assert [i for b in blocks for i in b] == list(range(11))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
