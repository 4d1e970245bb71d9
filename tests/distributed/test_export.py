"""Single-process pieces of the scale-out: the streamed safetensors writer, the merged-checkpoint
threshold, the evaluation shards and the collective timeout default."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from visionmoe.distributed.evaluate import eval_plan, padded
from visionmoe.distributed.export import wants_merged, write_safetensors_streamed
from visionmoe.distributed.groups import DEFAULT_TIMEOUT_S
from visionmoe.distributed.train import parse_args
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set


def test_streamed_safetensors_bytes_and_round_trip(tmp_path):
    tensors = {
        "b": torch.tensor([1.0, -2.0], dtype=torch.float32),
        "a": torch.tensor(7, dtype=torch.int64),  # 0-d, like Adam's step
        "c": torch.tensor([[0.5]], dtype=torch.bfloat16),
    }
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    reads = []
    path = tmp_path / "x.safetensors"
    write_safetensors_streamed(path, specs, lambda k: reads.append(k) or tensors[k])
    assert reads == ["a", "b", "c"]  # one at a time, in offset order
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    # Offsets by hand: a = 1 int64 (8 bytes), b = 2 float32 (8 bytes), c = 1 bfloat16 (2 bytes).
    assert header["a"] == {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}
    assert header["b"] == {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    assert header["c"] == {"dtype": "BF16", "shape": [1, 1], "data_offsets": [16, 18]}
    data = raw[8 + n :]
    assert data[:8] == (7).to_bytes(8, "little")
    assert data[8:16] == struct.pack("<2f", 1.0, -2.0)
    assert data[16:18] == bytes([0x00, 0x3F])  # bfloat16 0.5 = 0x3F00, little-endian
    loaded = load_file(str(path))  # the reference reader agrees
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key


def test_streamed_writer_refuses_a_tensor_that_is_not_as_announced(tmp_path):
    from visionmoe.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="expected"):
        write_safetensors_streamed(
            tmp_path / "x.safetensors",
            {"w": (torch.float32, (3,))},
            lambda k: torch.zeros(4),
        )


def test_merged_checkpoint_default_depends_on_the_state_size():
    config = get_recipe("digits_vmoe")  # AdamW: weights + 2 moments, 12 bytes per parameter
    assert wants_merged(config, 1000)
    tight = apply_set(config, ["parallel.merged_checkpoint_max_gb=0.00001"])  # 10737 bytes
    assert wants_merged(tight, 894)  # 10728 bytes
    assert not wants_merged(tight, 895)  # 10740 bytes
    assert wants_merged(apply_set(tight, ["parallel.merged_checkpoint=true"]), 10**9)
    assert not wants_merged(apply_set(config, ["parallel.merged_checkpoint=false"]), 1)
    with pytest.raises(ValueError, match="parallel.dense must be 'ddp' or 'fsdp', got 'zero'"):
        apply_set(config, ["parallel.dense=zero"])


def test_evaluation_plan_and_padding_give_every_rank_equal_forwards():
    # n = 10 over W = 4: blocks cut at floor(r * 10 / 4) = 0, 2, 5, 7, 10 (sizes 2, 3, 2, 3);
    # a global batch of 5 is ceil(5 / 4) = 2 images per rank, so the largest block needs 2.
    assert eval_plan(10, 5, 4) == (2, 2)
    assert eval_plan(10, 256, 4) == (64, 1)
    assert eval_plan(1, 8, 2) == (4, 1)  # rank 0's block is empty, rank 1's holds the image
    x = torch.arange(3.0)[:, None]  # a block of 3 images in batches of 2, padded to 3 batches
    batches = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([2]))]
    out = list(padded(batches, 2, 3))
    assert [b[0][:, 0].tolist() for b in out] == [[0, 1], [2, 2], [2, 2]]
    assert [b[1].tolist() for b in out] == [[0, 1], [2, 2], [2, 2]]
    assert [b[2].tolist() for b in out] == [[True, True], [True, False], [False, False]]
    # An empty block runs padding batches made of the blank example.
    blank = (torch.tensor([[7.0]]), torch.tensor([4]))
    (only,) = padded([], 3, 1, blank)
    assert only[0][:, 0].tolist() == [7.0] * 3 and only[2].tolist() == [False] * 3
    with pytest.raises(RuntimeError, match="read 2 evaluation batches, expected 1"):
        list(padded(batches, 2, 1))


def test_collective_timeout_default_is_generous():
    assert DEFAULT_TIMEOUT_S == 30 * 60
    assert parse_args([]).timeout == 30 * 60
    assert parse_args(["--timeout", "10"]).timeout == 10


def test_export_command_reports_a_missing_run_in_one_line(tmp_path, capsys):
    from visionmoe.distributed.export import main

    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visionmoe export: error: no sharded checkpoint at") and "\n" not in err
