"""The vmoe checkpoint reader: round trips, hand-built files, and refusal of broken files."""

from __future__ import annotations

import ml_dtypes
import msgpack
import numpy as np
import pytest

from visionmoe.convert import VmoeFormatError, read_vmoe_checkpoint, write_vmoe_checkpoint

# --- hand-built encoding, independent of the library's writer --------------------------------


def _ext(code: int, obj) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(obj))


def _nd(array: np.ndarray) -> msgpack.ExtType:
    return _ext(1, (list(array.shape), array.dtype.name, array.tobytes()))


def _slices(*bounds: tuple[int, int]) -> msgpack.ExtType:
    return _ext(6, [_ext(5, (lo, hi, 1)) for lo, hi in bounds])


def _info(shape, dtype: str, slices: list, shards: list[int]) -> msgpack.ExtType:
    return _ext(8, (_ext(4, (list(shape), dtype, False, {})), slices, shards))


def _handmade(tmp_path, versioned: bool = True):
    """Two leaves: ``zeta`` (2x3 float32, rows split over 2 shards) and ``alpha/w`` (bf16)."""
    zeta = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    alpha = np.array([1.5, -2.0, 0.25, 8.0], dtype=ml_dtypes.bfloat16)
    # Insertion order puts zeta first; with a version the ids follow sorted keys (alpha = 0).
    ids = {"alpha": 0, "zeta": 1} if versioned else {"zeta": 0, "alpha": 1}
    index = {
        "zeta": _info(
            (2, 3), "float32", [_slices((0, 1), (0, 3)), _slices((1, 2), (0, 3))], [0, 1]
        ),
        "alpha": {"w": _info((4,), "bfloat16", [_slices((0, 4))], [1])},
    }
    header = {"shard_count": 2, "index": index}
    if versioned:
        header["version"] = "20220622"
    prefix = tmp_path / "hand"
    (tmp_path / "hand.index").write_bytes(msgpack.packb(header))
    shard0 = {
        "__msgpack_array_chunk_a87ca2__": True,
        str(ids["zeta"]): [[[_nd(zeta[0])], _slices((0, 1), (0, 3))]],
    }
    shard1 = {
        "__msgpack_array_chunk_a87ca2__": True,
        # Two subchunks concatenated make one chunk.
        str(ids["zeta"]): [[[_nd(zeta[1, :1]), _nd(zeta[1, 1:])], _slices((1, 2), (0, 3))]],
        str(ids["alpha"]): [[[_nd(alpha)], _slices((0, 4))]],
    }
    (tmp_path / "hand.data-00000-of-00002").write_bytes(msgpack.packb(shard0))
    (tmp_path / "hand.data-00001-of-00002").write_bytes(msgpack.packb(shard1))
    return prefix, zeta, alpha


@pytest.mark.parametrize("versioned", [True, False])
def test_reads_handmade_checkpoint(tmp_path, versioned):
    prefix, zeta, alpha = _handmade(tmp_path, versioned)
    tree = read_vmoe_checkpoint(prefix)
    assert set(tree) == {"zeta", "alpha"}
    np.testing.assert_array_equal(tree["zeta"], zeta)
    assert tree["zeta"].dtype == np.float32
    assert tree["alpha"]["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tree["alpha"]["w"].astype(np.float32), alpha.astype(np.float32))


def _sample_tree(rng):
    return {
        "Encoder": {
            "encoderblock_0": {
                "Moe": {"kernel": rng.standard_normal((4, 6, 5)).astype(np.float32)},
                "scale": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
            },
            "big": rng.standard_normal((33, 17)).astype(np.float32),
        },
        "cls": rng.standard_normal((1, 1, 6)).astype(np.float32),
        "step": np.array(12, dtype=np.int32),
        "bf": rng.standard_normal((9, 2, 3)).astype(ml_dtypes.bfloat16),
    }


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("version", ["20220622", None])
def test_writer_reader_round_trip_over_shards(tmp_path, version):
    tree = _sample_tree(np.random.default_rng(0))
    paths = write_vmoe_checkpoint(
        tmp_path / "ckpt", tree, num_shards=3, max_chunk_bytes=100, max_subchunk_bytes=24,
        version=version,
    )  # fmt: skip
    assert [p.name for p in paths] == [
        "ckpt.index",
        "ckpt.data-00000-of-00003",
        "ckpt.data-00001-of-00003",
        "ckpt.data-00002-of-00003",
    ]
    # The large leaf is cut into slices that land in every shard.
    names = [name for name, _ in _leaves(tree)]
    big_id = (sorted(names) if version else names).index("Encoder/big")
    for path in paths[1:]:
        assert str(big_id) in msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    out = read_vmoe_checkpoint(tmp_path / "ckpt")
    expected, got = dict(_leaves(tree)), dict(_leaves(out))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name].astype(np.float64), value.astype(np.float64))


def test_truncated_data_file_names_the_file(tmp_path):
    write_vmoe_checkpoint(tmp_path / "c", _sample_tree(np.random.default_rng(1)), num_shards=2)
    shard = tmp_path / "c.data-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(VmoeFormatError, match="c.data-00001-of-00002"):
        read_vmoe_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("victim", ["index", "data-00000-of-00001"])
def test_garbage_files_are_refused(tmp_path, victim):
    write_vmoe_checkpoint(tmp_path / "c", _sample_tree(np.random.default_rng(2)))
    (tmp_path / f"c.{victim}").write_bytes(b"\x89PNG\r\n\x1a\n not a checkpoint at all")
    with pytest.raises(VmoeFormatError, match=f"c.{victim}"):
        read_vmoe_checkpoint(tmp_path / "c")


def test_wrong_structure_is_refused(tmp_path):
    write_vmoe_checkpoint(tmp_path / "c", _sample_tree(np.random.default_rng(2)))
    (tmp_path / "c.data-00000-of-00001").write_bytes(msgpack.packb([1, 2, 3]))
    with pytest.raises(VmoeFormatError, match="not a vmoe data shard"):
        read_vmoe_checkpoint(tmp_path / "c")
    (tmp_path / "c.index").write_bytes(msgpack.packb({"hello": "world"}))
    with pytest.raises(VmoeFormatError, match=r"c\.index"):
        read_vmoe_checkpoint(tmp_path / "c")


def _corrupt_shard(tmp_path, chunk):
    """The hand-made checkpoint with alpha's chunk in shard 1 replaced by ``chunk``."""
    prefix, _, _ = _handmade(tmp_path)
    path = tmp_path / "hand.data-00001-of-00002"
    content = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    content["0"] = [chunk]
    path.write_bytes(msgpack.packb(content))
    return prefix


@pytest.mark.parametrize(
    "chunk, message",
    [
        # 3 values for a 4-value slice
        ([[_nd(np.zeros(3, ml_dtypes.bfloat16))], _slices((0, 4))], "needs 4"),
        # float32 data in a bfloat16 leaf
        ([[_nd(np.zeros(4, np.float32))], _slices((0, 4))], "dtype"),
        # a slice the index does not list
        ([[_nd(np.zeros(2, ml_dtypes.bfloat16))], _slices((0, 2))], "not a slice the index"),
        # not [subchunks, SliceNd]
        ([_nd(np.zeros(4, ml_dtypes.bfloat16))], "malformed chunk"),
    ],
)
def test_chunks_that_do_not_fit_are_refused(tmp_path, chunk, message):
    prefix = _corrupt_shard(tmp_path, chunk)
    with pytest.raises(VmoeFormatError, match=message) as err:
        read_vmoe_checkpoint(prefix)
    assert "hand.data-00001-of-00002" in str(err.value)


def test_slice_outside_the_leaf_is_refused(tmp_path):
    prefix, _, _ = _handmade(tmp_path)
    header = msgpack.unpackb((tmp_path / "hand.index").read_bytes(), strict_map_key=False)
    header["index"]["alpha"]["w"] = _info((4,), "bfloat16", [_slices((0, 9))], [1])
    (tmp_path / "hand.index").write_bytes(msgpack.packb(header))
    with pytest.raises(VmoeFormatError, match=r"hand\.index: leaf alpha/w"):
        read_vmoe_checkpoint(prefix)


def test_missing_chunk_and_missing_shard(tmp_path):
    prefix, _, _ = _handmade(tmp_path)
    path = tmp_path / "hand.data-00000-of-00002"
    content = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    del content["1"]
    path.write_bytes(msgpack.packb(content))
    with pytest.raises(VmoeFormatError, match="zeta: 1 slice"):
        read_vmoe_checkpoint(prefix)
    path.unlink()
    with pytest.raises(VmoeFormatError, match="hand.data-00000-of-00002 not found"):
        read_vmoe_checkpoint(prefix)
    with pytest.raises(VmoeFormatError, match="not found"):
        read_vmoe_checkpoint(tmp_path / "nothing")


def test_writer_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        write_vmoe_checkpoint(tmp_path / "x", {"a": np.zeros(2)}, num_shards=0)
