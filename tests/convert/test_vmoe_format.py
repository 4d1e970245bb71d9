"""The vmoe checkpoint reader and writer against the official encoding, built by hand.

Every file here is packed with plain ``msgpack`` following the table of
``shared/spec/CHECKPOINT_FORMAT.md``: only the outermost object is an ExtType; the ShapedArray and
SliceNd inside an IndexInfo (code 8) and the Slices inside a SliceNd (code 6) are packed ``bin``.
"""

from __future__ import annotations

import ml_dtypes
import msgpack
import numpy as np
import pytest

from visionmoe.convert import VmoeFormatError, read_vmoe_checkpoint, write_vmoe_checkpoint

MARKER = "__msgpack_array_chunk_a87ca2__"

# The spec's real leaf (float32 bias of shape (64,), one slice, shard 0), byte for byte.
SPEC_LEAF = (
    bytes.fromhex("c7 1c 08 93 c4 0d 94 91 40 a7")
    + b"float32"
    + bytes.fromhex("c2 80 91 c4 07 91 c4 04 93 00 40 c0 91 00")
)


def _p(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _slice_nd(*bounds: tuple[int, int]) -> bytes:
    """SliceNd payload: one packed ``[start, stop, nil]`` per dimension."""
    return _p([_p([lo, hi, None]) for lo, hi in bounds])


def _chunk_slice(*bounds) -> msgpack.ExtType:
    return msgpack.ExtType(6, _slice_nd(*bounds))


def _nd(array: np.ndarray, dtype_name=None, use_bin_type=True) -> msgpack.ExtType:
    name = array.dtype.name if dtype_name is None else dtype_name
    payload = [list(array.shape), name, array.tobytes()]
    return msgpack.ExtType(1, msgpack.packb(payload, use_bin_type=use_bin_type))


def _info(shape, dtype, slices, shards) -> msgpack.ExtType:
    shaped = _p([list(shape), dtype, False, {}])
    return msgpack.ExtType(8, _p([shaped, [_slice_nd(*b) for b in slices], shards]))


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "Encoder/bias": np.arange(64, dtype=np.float32) / 7 - 3,
        "Moe/kernel": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16),
        "head/kernel": rng.standard_normal((5, 3)).astype(np.float32),
        "scale": np.array(0.125, dtype=np.float32),
    }


def _handmade(tmp_path, versioned: bool = True):
    """Three shards; ``head/kernel`` rows spread over all three; the spec's leaf verbatim."""
    a = _arrays()
    # The index lists leaves unsorted. Leaf ids: sorted depth-first with a version; the index's
    # own (insertion) order without.
    order = ["head/kernel", "scale", "Encoder/bias", "Moe/kernel"]
    ids = {name: str(i) for i, name in enumerate(sorted(order) if versioned else order)}
    leaves = {
        "Encoder/bias": msgpack.ExtType(8, SPEC_LEAF[3:]),
        "Moe/kernel": _info((2, 4), "bfloat16", [((0, 2), (0, 4))], [2]),
        "head/kernel": _info(
            (5, 3), "float32", [((0, 2), (0, 3)), ((2, 4), (0, 3)), ((4, 5), (0, 3))], [1, 2, 0]
        ),
        "scale": _info((), "float32", [()], [1]),
    }
    index: dict = {}
    for name in order:
        *parents, last = name.split("/")
        node = index
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaves[name]
    header = {"shard_count": 3, "index": index}
    if versioned:
        header["version"] = "20220622"
    head, moe = a["head/kernel"], a["Moe/kernel"]
    shard0 = {
        MARKER: True,
        ids["Encoder/bias"]: [[[_nd(a["Encoder/bias"])], _chunk_slice((0, 64))]],
        ids["head/kernel"]: [[[_nd(head[4:].reshape(-1))], _chunk_slice((4, 5), (0, 3))]],
    }
    shard1 = {
        MARKER: True,
        ids["head/kernel"]: [[[_nd(head[:2].reshape(-1))], _chunk_slice((0, 2), (0, 3))]],
        ids["scale"]: [[[_nd(a["scale"].reshape(1))], _chunk_slice()]],
    }
    shard2 = {
        MARKER: True,
        ids["head/kernel"]: [[[_nd(head[2:4].reshape(-1))], _chunk_slice((2, 4), (0, 3))]],
        # Two subchunks make one chunk; the second is packed without the bin type (its dtype
        # name and data both arrive as raw bytes), as older msgpack writers did.
        ids["Moe/kernel"]: [
            [[_nd(moe.reshape(-1)[:3]), _nd(moe.reshape(-1)[3:], use_bin_type=False)],
             _chunk_slice((0, 2), (0, 4))]
        ],
    }  # fmt: skip
    (tmp_path / "hand.index").write_bytes(_p(header))
    for i, shard in enumerate([shard0, shard1, shard2]):
        (tmp_path / f"hand.data-{i:05d}-of-00003").write_bytes(_p(shard))
    return tmp_path / "hand", a


def test_spec_leaf_bytes_match_the_table():
    # c7 1c 08: ext8 of 28 bytes with code 8; the helpers build the same bytes from the table.
    assert len(SPEC_LEAF) == 3 + 0x1C
    assert _p(_info((64,), "float32", [((0, 64),)], [0])) == SPEC_LEAF


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("versioned", [True, False])
def test_reads_handmade_official_checkpoint(tmp_path, versioned):
    prefix, expected = _handmade(tmp_path, versioned)
    got = dict(_leaves(read_vmoe_checkpoint(prefix)))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def _official_nesting(obj):
    """Decode an unpacked file by the table, failing if a nested item is not a packed bin."""
    if isinstance(obj, dict):
        return {k: _official_nesting(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_official_nesting(v) for v in obj]
    if not isinstance(obj, msgpack.ExtType):
        return obj

    def nested(b):
        assert isinstance(b, bytes), f"nested item is {type(b).__name__}, not a bin"
        return msgpack.unpackb(b, raw=True)

    def slice_nd(payload):
        return [tuple(nested(s)) for s in nested(payload)]

    if obj.code == 1:
        shape, dtype, data = nested(obj.data)
        return ("ndarray", tuple(shape), dtype, data)
    if obj.code == 6:
        return ("SliceNd", slice_nd(obj.data))
    assert obj.code == 8, obj.code
    shaped, slices, shards = nested(obj.data)
    return ("IndexInfo", nested(shaped), [slice_nd(s) for s in slices], shards)


def test_writer_emits_the_official_nesting(tmp_path):
    a = _arrays()
    tree = {"head": {"kernel": a["head/kernel"]}, "scale": a["scale"]}
    tree |= {"Moe": {"kernel": a["Moe/kernel"]}, "Encoder": {"bias": a["Encoder/bias"]}}
    write_vmoe_checkpoint(tmp_path / "ours", tree)
    # The same checkpoint by hand: one shard, one chunk per leaf, ids in sorted order.
    leaves = ["Encoder/bias", "Moe/kernel", "head/kernel", "scale"]
    index: dict = {}
    data: dict = {MARKER: True}
    for i, name in enumerate(leaves):
        array = a[name]
        full = tuple((0, d) for d in array.shape)
        *parents, last = name.split("/")
        node = index
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = _info(array.shape, array.dtype.name, [full], [0])
        data[str(i)] = [[[_nd(array.reshape(-1))], _chunk_slice(*full)]]
    expected_index = {"shard_count": 1, "index": index, "version": "20220622"}
    ours_index = msgpack.unpackb((tmp_path / "ours.index").read_bytes())
    ours_data = msgpack.unpackb((tmp_path / "ours.data-00000-of-00001").read_bytes())
    assert ours_index == expected_index  # ExtTypes compare by code and payload bytes
    assert ours_data == data
    assert ours_index["index"]["Encoder"]["bias"] == msgpack.ExtType(8, SPEC_LEAF[3:])
    assert _official_nesting(ours_index) == _official_nesting(expected_index)
    assert _official_nesting(ours_data) == _official_nesting(data)


def test_writer_spreads_a_leaf_over_shards_in_official_nesting(tmp_path):
    big = np.arange(33 * 17, dtype=np.float32).reshape(33, 17)
    paths = write_vmoe_checkpoint(tmp_path / "c", {"big": big}, num_shards=3, max_chunk_bytes=700)
    info = _official_nesting(msgpack.unpackb(paths[0].read_bytes()))["index"]["big"]
    assert info[1] == [[33, 17], b"float32", False, {}]
    # 700 // (17 * 4) = 10 rows per chunk -> 4 chunks dealt round-robin over 3 shards.
    assert info[2] == [[(lo, min(lo + 10, 33), None), (0, 17, None)] for lo in (0, 10, 20, 30)]
    assert info[3] == [0, 1, 2, 0]
    for shard, path in enumerate(paths[1:]):
        chunks = _official_nesting(msgpack.unpackb(path.read_bytes()))["0"]
        starts = [lo for lo, owner in zip((0, 10, 20, 30), info[3], strict=True) if owner == shard]
        assert [chunk[1][1][0][0] for chunk in chunks] == starts
    np.testing.assert_array_equal(read_vmoe_checkpoint(tmp_path / "c")["big"], big)


@pytest.mark.parametrize("version", ["20220622", None])
def test_writer_reader_round_trip(tmp_path, version):
    rng = np.random.default_rng(1)
    tree = {
        "b": {"k": rng.standard_normal((9, 2, 3)).astype(ml_dtypes.bfloat16)},
        "a": rng.standard_normal((33, 17)).astype(np.float32),
        "step": np.array(12, dtype=np.int32),
    }
    write_vmoe_checkpoint(
        tmp_path / "c", tree, num_shards=3, max_chunk_bytes=100, max_subchunk_bytes=24,
        version=version,
    )  # fmt: skip
    got = dict(_leaves(read_vmoe_checkpoint(tmp_path / "c")))
    for name, value in _leaves(tree):
        assert got[name].dtype == value.dtype
        assert got[name].tobytes() == value.tobytes(), name


# --- refusals -------------------------------------------------------------------------------


def _rewrite(path, edit):
    content = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    edit(content)
    path.write_bytes(_p(content))


@pytest.mark.parametrize("victim", ["index", "data-00002-of-00003"])
def test_truncated_file_names_the_file(tmp_path, victim):
    prefix, _ = _handmade(tmp_path)
    path = tmp_path / f"hand.{victim}"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(VmoeFormatError, match=f"hand.{victim}"):
        read_vmoe_checkpoint(prefix)


def _shard2(tmp_path, chunk):
    """The hand-made checkpoint with the bf16 leaf's chunk (id 1, shard 2) replaced."""
    prefix, _ = _handmade(tmp_path)
    _rewrite(tmp_path / "hand.data-00002-of-00003", lambda c: c.__setitem__("1", [chunk]))
    return prefix


BF16 = ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "chunk, message",
    [
        ([[_nd(np.zeros(8, np.float32))], _chunk_slice((0, 2), (0, 4))], "dtype float32 != leaf"),
        ([[_nd(np.zeros(7, BF16))], _chunk_slice((0, 2), (0, 4))], "needs 8"),
        ([[_nd(np.zeros(8, BF16))], _chunk_slice((0, 3), (0, 4))], r"\[0:3\] outside"),
        ([[_nd(np.zeros(4, BF16))], _chunk_slice((0, 1), (0, 4))], "not a slice the index"),
        ([[_nd(np.zeros(8, BF16), 7)], _chunk_slice((0, 2), (0, 4))], "must be a str or bytes"),
        ([[_nd(np.zeros(8, BF16), "object")], _chunk_slice((0, 2), (0, 4))], "unsupported"),
        ([_nd(np.zeros(8, BF16))], "malformed chunk"),
        # The old nested encoding: a Slice as ExtType 5 inside the SliceNd.
        ([[_nd(np.zeros(8, BF16))], msgpack.ExtType(6, _p([msgpack.ExtType(5, _p([0, 2, 1]))]))],
         "ExtType 5"),
    ],
)  # fmt: skip
def test_chunks_that_do_not_fit_are_refused(tmp_path, chunk, message):
    prefix = _shard2(tmp_path, chunk)
    with pytest.raises(VmoeFormatError, match=message) as err:
        read_vmoe_checkpoint(prefix)
    assert "hand.data-00002-of-00003: leaf Moe/kernel" in str(err.value)


def test_chunk_in_the_wrong_shard_is_refused(tmp_path):
    prefix, _ = _handmade(tmp_path)
    moved = []
    _rewrite(tmp_path / "hand.data-00002-of-00003", lambda c: moved.append(c.pop("1")))
    _rewrite(tmp_path / "hand.data-00000-of-00003", lambda c: c.__setitem__("1", moved[0]))
    with pytest.raises(VmoeFormatError, match=r"00000-of-00003: leaf Moe/kernel.*shard 2"):
        read_vmoe_checkpoint(prefix)


def test_missing_slice_and_missing_shard(tmp_path):
    prefix, _ = _handmade(tmp_path)
    _rewrite(tmp_path / "hand.data-00001-of-00003", lambda c: c.pop("2"))
    missing = r"head/kernel: 1 slice\(s\) missing.*shard\(s\) \[1\]"
    with pytest.raises(VmoeFormatError, match=missing):
        read_vmoe_checkpoint(prefix)
    (tmp_path / "hand.data-00001-of-00003").unlink()
    with pytest.raises(VmoeFormatError, match="hand.data-00001-of-00003 not found"):
        read_vmoe_checkpoint(prefix)
    with pytest.raises(VmoeFormatError, match="nothing.index not found"):
        read_vmoe_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize(
    "leaf, message",
    [
        (_info((2, 4), "bfloat16", [((0, 2), (0, 9))], [2]), r"\[0:9\] outside"),
        (_info((2, 4), "bfloat16", [((0, 2), (0, 4))], [3]), "shard 3 outside"),
        (_info((2, 4), "bfloat16", [((0, 1), (0, 4))], [2]), "cover 4 of 8"),
        (_info((2, 4), "bfloat16", [((0, 2), (0, 4))] * 2, [2, 2]), "overlaps"),
        (_info((2, 4), 5, [((0, 2), (0, 4))], [2]), "must be a str or bytes, got int"),
        (_info((2, 4), "no_such_type", [((0, 2), (0, 4))], [2]), "unsupported dtype"),
        # The old nested encoding: ShapedArray as ExtType 4 inside the IndexInfo.
        (msgpack.ExtType(8, _p([msgpack.ExtType(4, _p([[2, 4], "bfloat16", False, {}])),
                                [_slice_nd((0, 2), (0, 4))], [2]])), "ExtType 4"),
        (_nd(np.zeros((2, 4), BF16)), "must be msgpack ExtType 8"),
    ],
)  # fmt: skip
def test_bad_index_leaf_is_refused(tmp_path, leaf, message):
    prefix, _ = _handmade(tmp_path)
    _rewrite(tmp_path / "hand.index", lambda c: c["index"]["Moe"].__setitem__("kernel", leaf))
    with pytest.raises(VmoeFormatError, match=message) as err:
        read_vmoe_checkpoint(prefix)
    assert "hand.index: leaf Moe/kernel" in str(err.value)


def test_non_text_key_is_refused(tmp_path):
    prefix, _ = _handmade(tmp_path)
    _rewrite(tmp_path / "hand.index", lambda c: c["index"]["Moe"].__setitem__(3.5, {}))
    with pytest.raises(VmoeFormatError, match=r"hand\.index: key under leaf Moe must be a str"):
        read_vmoe_checkpoint(prefix)


def test_wrong_structure_is_refused(tmp_path):
    prefix, _ = _handmade(tmp_path)
    (tmp_path / "hand.data-00000-of-00003").write_bytes(_p([1, 2, 3]))
    with pytest.raises(VmoeFormatError, match="00000-of-00003 is not a vmoe data shard"):
        read_vmoe_checkpoint(prefix)
    (tmp_path / "hand.data-00000-of-00003").write_bytes(_p({MARKER: True, "17": []}))
    with pytest.raises(VmoeFormatError, match="00000-of-00003: key '17' is not a leaf id"):
        read_vmoe_checkpoint(prefix)
    (tmp_path / "hand.index").write_bytes(_p({"hello": "world"}))
    with pytest.raises(VmoeFormatError, match=r"hand\.index is not a vmoe checkpoint index"):
        read_vmoe_checkpoint(prefix)


def test_writer_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        write_vmoe_checkpoint(tmp_path / "x", {"a": np.zeros(2)}, num_shards=0)
