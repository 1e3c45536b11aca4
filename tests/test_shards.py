import json

import pytest
import torch

from diffattr.errors import DiffattrError
from diffattr.shards import ShardedTensor, shards_complete, write_shards


def _rows(start: int, stop: int) -> dict[str, torch.Tensor]:
    index = torch.arange(start, stop, dtype=torch.float32)
    return {"encodings": index.view(-1, 1, 1).expand(-1, 2, 3).clone(), "conditions": index.long()}


def test_sharded_tensor_reads_like_the_whole_tensor(tmp_path):
    write_shards(tmp_path, 10, _rows, shard_rows=4, stamp="s")
    tensors = ShardedTensor.open(tmp_path, stamp="s", num_rows=10)
    whole = _rows(0, 10)
    encodings = tensors["encodings"]
    assert encodings.shape == (10, 2, 3) and len(encodings) == 10 and encodings.dtype == torch.float32
    assert torch.equal(encodings.load(), whole["encodings"])
    assert torch.equal(tensors["conditions"].load(), whole["conditions"])
    rows = torch.tensor([9, 0, 5, 4, 3])  # across shards, unsorted
    assert torch.equal(encodings[rows], whole["encodings"][rows])
    assert torch.equal(encodings[2:7], whole["encodings"][2:7])
    assert torch.equal(encodings[-1], whole["encodings"][9])
    with pytest.raises(IndexError):
        encodings[10]


def test_an_interrupted_write_resumes_after_its_last_complete_shard(tmp_path):
    calls = []

    def failing(start, stop):
        calls.append(start)
        if start == 8:
            raise KeyboardInterrupt
        return _rows(start, stop)

    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path, 10, failing, shard_rows=4, stamp="s")
    assert not shards_complete(tmp_path)
    with pytest.raises(DiffattrError, match="unfinished"):
        ShardedTensor.open(tmp_path, stamp="s", num_rows=10)
    calls.clear()
    write_shards(tmp_path, 10, lambda a, b: calls.append(a) or _rows(a, b), shard_rows=4, stamp="s")
    assert calls == [8]
    encodings = ShardedTensor.open(tmp_path, stamp="s", num_rows=10)["encodings"]
    assert torch.equal(encodings.load(), _rows(0, 10)["encodings"])


def test_shards_of_another_run_are_redone_while_unfinished_and_refused_once_finished(tmp_path):
    write_shards(tmp_path / "a", 10, _rows, shard_rows=4, stamp="old")
    (tmp_path / "a" / "index.json").unlink()  # unfinished, under the old stamp
    calls = []
    write_shards(tmp_path / "a", 10, lambda a, b: calls.append(a) or _rows(a, b), shard_rows=4, stamp="new")
    assert calls == [0, 4, 8]
    ShardedTensor.open(tmp_path / "a", stamp="new", num_rows=10)
    with pytest.raises(DiffattrError, match="other settings"):
        ShardedTensor.open(tmp_path / "a", stamp="old", num_rows=10)
    with pytest.raises(DiffattrError, match="rows for 11 training images"):
        ShardedTensor.open(tmp_path / "a", stamp="new", num_rows=11)
    with pytest.raises(DiffattrError, match=r"shape \(4, 2, 3\), expected \(4, 3, 3\)"):
        ShardedTensor.open(tmp_path / "a", stamp="new", num_rows=10, row_shapes={"encodings": (3, 3)})


def test_shards_swapped_between_names_are_refused(tmp_path):  # issue 15, final probe
    write_shards(tmp_path, 10, _rows, shard_rows=4, stamp="s")
    first, second = tmp_path / "00000.safetensors", tmp_path / "00001.safetensors"
    first.rename(tmp_path / "x")
    second.rename(first)
    (tmp_path / "x").rename(second)
    with pytest.raises(DiffattrError, match="00000.safetensors"):  # opening reads shard 0
        ShardedTensor.open(tmp_path, stamp="s", num_rows=10)


def test_a_shard_deleted_after_the_folder_was_finished_is_recomputed(tmp_path):  # issue 15, final probe
    write_shards(tmp_path, 10, _rows, shard_rows=4, stamp="s")
    (tmp_path / "00001.safetensors").unlink()  # as the error of a damaged shard advises
    assert not shards_complete(tmp_path)
    calls = []
    write_shards(tmp_path, 10, lambda a, b: calls.append(a) or _rows(a, b), shard_rows=4, stamp="s")
    assert calls == [4] and shards_complete(tmp_path)
    assert torch.equal(
        ShardedTensor.open(tmp_path, stamp="s", num_rows=10)["encodings"].load(), _rows(0, 10)["encodings"]
    )


@pytest.mark.parametrize("field, value", [("num_rows", 10.0), ("shard_rows", True), ("keys", [["encodings"]])])
def test_an_index_with_a_wrong_typed_field_is_not_a_shard_index(tmp_path, field, value):  # issue 15
    write_shards(tmp_path, 10, _rows, shard_rows=4, stamp="s")
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, field: value}))
    with pytest.raises(DiffattrError, match="not a shard index"):
        ShardedTensor.open(tmp_path, stamp="s", num_rows=10)
