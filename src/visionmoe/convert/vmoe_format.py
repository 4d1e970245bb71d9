"""Read and write the sharded msgpack checkpoints released with google-research/vmoe, without JAX.

A checkpoint is ``<prefix>.index`` plus ``<prefix>.data-NNNNN-of-NNNNN`` shards (format described
in ``shared/spec/CHECKPOINT_FORMAT.md``; the byte encoding lives in :mod:`.vmoe_codec`):

- the index is a msgpack map ``{"shard_count", "index", "version"?}`` whose ``index`` mirrors the
  parameter tree, each leaf an *IndexInfo* (global shape/dtype, the slices it was cut into and the
  shard holding each slice);
- each data shard maps ``str(leaf_id)`` to a list of ``[subchunks, SliceNd]`` chunks; a chunk is
  the concatenation of its 1-D subchunks, reshaped to the slice's extent.

Leaf ids are positions in the depth-first flattening of the tree with keys sorted (JAX's order);
files written before the ``version`` field existed use the order stored in the index itself.

We check that every leaf's slices tile it exactly, every chunk against the index (known leaf,
expected slice, expected shard, dtype, size) and that every slice of every leaf arrived, so a
truncated, mixed-up or tampered checkpoint fails with :class:`VmoeFormatError` naming the
offending file instead of yielding wrong weights. The writer emits the official nesting, so
trees we write load in vmoe.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from visionmoe.convert.vmoe_codec import (
    EXT_SLICE_ND,
    Box,
    CodecError,
    decode_ext_slice_nd,
    decode_index_info,
    decode_ndarray,
    encode_index_info,
    encode_ndarray,
    encode_slice_nd,
    name_of,
    packb,
    resolve_box,
)

CHUNK_MARKER = "__msgpack_array_chunk_a87ca2__"
INDEX_VERSION = "20220622"


class VmoeFormatError(ValueError):
    """A vmoe checkpoint file that is missing, truncated, malformed or inconsistent."""


@dataclass(frozen=True)
class _Leaf:
    """One index entry: where a leaf lives and which slice sits in which shard."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    owners: dict[Box, int]  # slice -> shard


def shard_path(prefix: str | os.PathLike, index: int, count: int) -> Path:
    """File name of data shard ``index`` of ``count``."""
    return Path(f"{os.fspath(prefix)}.data-{index:05d}-of-{count:05d}")


def _read_msgpack(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise VmoeFormatError(f"cannot read vmoe checkpoint file {path}: {err}") from None
    try:
        # raw=True: text may have been written as str or bytes; names are decoded explicitly.
        return msgpack.unpackb(data, raw=True, strict_map_key=False)
    except Exception as err:  # msgpack raises many types for truncated / garbage input
        raise VmoeFormatError(
            f"{path} is not a valid vmoe checkpoint file (truncated or corrupted msgpack: "
            f"{type(err).__name__}: {err})"
        ) from None


def _named_map(path: Path, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise VmoeFormatError(f"{path}: {where} is {type(value).__name__}, expected a map")
    out = {}
    for key, item in value.items():
        try:
            out[name_of(key, f"key under {where}")] = item
        except CodecError as err:
            raise VmoeFormatError(f"{path}: {err}") from None
    return out


def _flatten(path: Path, tree: Any, sort: bool, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Depth-first ``(name, leaf)`` pairs; keys sorted as JAX does when ``sort``."""
    node = _named_map(path, tree, f"leaf {prefix.rstrip('/') or '<root>'}")
    for key in sorted(node) if sort else node:
        value = node[key]
        if isinstance(value, Mapping):
            yield from _flatten(path, value, sort, f"{prefix}{key}/")
        elif value is not None:
            yield f"{prefix}{key}", value


def _overlap(a: Box, b: Box) -> bool:
    return all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(a, b, strict=True))


def _index_leaf(path: Path, name: str, value: Any, count: int) -> _Leaf:
    where = f"{path}: leaf {name}"
    try:
        shape, dtype, raw_slices, shards = decode_index_info(value)
        boxes = [resolve_box(raw, shape, "slice") for raw in raw_slices]
    except CodecError as err:
        raise VmoeFormatError(f"{where}: {err}") from None
    for shard in shards:
        if not 0 <= shard < count:
            raise VmoeFormatError(f"{where}: shard {shard} outside 0..{count - 1}")
    covered = 0
    for i, box in enumerate(boxes):
        if any(_overlap(box, other) for other in boxes[:i]):
            raise VmoeFormatError(f"{where}: slice {box} overlaps another slice of the leaf")
        covered += int(np.prod([hi - lo for lo, hi in box], dtype=np.int64))
    total = int(np.prod(shape, dtype=np.int64))
    if covered != total:
        raise VmoeFormatError(f"{where}: its slices cover {covered} of {total} values")
    return _Leaf(name, shape, dtype, dict(zip(boxes, shards, strict=True)))


def _read_index(prefix: str | os.PathLike) -> tuple[int, list[_Leaf]]:
    path = Path(f"{os.fspath(prefix)}.index")
    if not path.is_file():
        raise VmoeFormatError(f"vmoe checkpoint index {path} not found")
    content = _named_map(path, _read_msgpack(path), "the index file")
    if "index" not in content or "shard_count" not in content:
        raise VmoeFormatError(f"{path} is not a vmoe checkpoint index (no 'index'/'shard_count')")
    count = content["shard_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise VmoeFormatError(f"{path}: bad shard_count {count!r}")
    pairs = _flatten(path, content["index"], sort="version" in content)
    return count, [_index_leaf(path, name, value, count) for name, value in pairs]


def read_vmoe_checkpoint(prefix: str | os.PathLike) -> dict[str, Any]:
    """Read ``<prefix>.index`` and all its data shards into a nested dict of numpy arrays.

    bfloat16 leaves come back as ``ml_dtypes.bfloat16`` arrays.

    Raises:
      VmoeFormatError: on a missing, truncated or inconsistent file (the message names it).
    """
    count, leaves = _read_index(prefix)
    arrays = [np.empty(leaf.shape, leaf.dtype) for leaf in leaves]
    pending = [dict(leaf.owners) for leaf in leaves]
    for shard in range(count):
        path = shard_path(prefix, shard, count)
        if not path.is_file():
            raise VmoeFormatError(f"vmoe checkpoint shard {path} not found")
        _read_shard(path, shard, leaves, arrays, pending)
    for leaf, left in zip(leaves, pending, strict=True):
        if left:
            raise VmoeFormatError(
                f"leaf {leaf.name}: {len(left)} slice(s) missing from the data shards of "
                f"{os.fspath(prefix)} (shard(s) {sorted(set(left.values()))})"
            )
    tree: dict[str, Any] = {}
    for leaf, array in zip(leaves, arrays, strict=True):
        *parents, last = leaf.name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = array
    return tree


def _read_shard(
    path: Path, shard: int, leaves: list[_Leaf], arrays: list[np.ndarray], pending: list[dict]
) -> None:
    content = _read_msgpack(path)
    if not isinstance(content, Mapping):
        raise VmoeFormatError(f"{path} is not a vmoe data shard (expected a map of chunks)")
    content = _named_map(path, content, "the data shard")
    if content.get(CHUNK_MARKER, True) is not True:
        raise VmoeFormatError(f"{path} is not a vmoe data shard (bad chunk marker)")
    for key, chunks in content.items():
        if key == CHUNK_MARKER:
            continue
        if not key.isdigit() or int(key) >= len(leaves):
            raise VmoeFormatError(
                f"{path}: key {key!r} is not a leaf id of the index (0..{len(leaves) - 1})"
            )
        leaf = int(key)
        if not isinstance(chunks, list):
            raise VmoeFormatError(
                f"{path}: leaf {leaves[leaf].name} holds {type(chunks).__name__}, not chunks"
            )
        for chunk in chunks:
            _place_chunk(path, shard, leaves[leaf], arrays[leaf], pending[leaf], chunk)


def _place_chunk(
    path: Path, shard: int, leaf: _Leaf, array: np.ndarray, pending: dict, chunk: Any
) -> None:
    where = f"{path}: leaf {leaf.name}"
    if not (isinstance(chunk, list) and len(chunk) == 2 and isinstance(chunk[0], list)):
        raise VmoeFormatError(f"{where}: malformed chunk (expected [subchunks, SliceNd])")
    try:
        box = resolve_box(decode_ext_slice_nd(chunk[1]), leaf.shape, "chunk slice")
        subchunks = [decode_ndarray(sub) for sub in chunk[0]]
    except CodecError as err:
        raise VmoeFormatError(f"{where}: {err}") from None
    if pending.get(box) != shard:
        owner = leaf.owners.get(box)
        why = "repeats one" if owner == shard else f"index: shard {owner}"
        raise VmoeFormatError(
            f"{where}: chunk {box} is not a slice the index assigns to this shard ({why})"
        )
    for sub in subchunks:
        if sub.dtype != leaf.dtype:
            raise VmoeFormatError(f"{where}: chunk dtype {sub.dtype} != leaf dtype {leaf.dtype}")
    extent = tuple(hi - lo for lo, hi in box)
    needed = int(np.prod(extent, dtype=np.int64))
    flat = np.concatenate([s.reshape(-1) for s in subchunks]) if subchunks else np.empty(0)
    if flat.size != needed:
        raise VmoeFormatError(
            f"{where}: chunk has {flat.size} values but slice {box} of shape {leaf.shape} "
            f"needs {needed}"
        )
    array[tuple(slice(lo, hi) for lo, hi in box)] = flat.reshape(extent)
    del pending[box]


# ---------------------------------------------------------------------------------------------
# Writer


def _row_boxes(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> list[Box]:
    """Cut an array into runs of leading-axis rows of at most ``max_bytes`` (>= one row)."""
    rest = tuple((0, d) for d in shape[1:])
    if not shape or shape[0] == 0:
        return [tuple((0, d) for d in shape)]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, max_bytes // row_bytes)
    return [((i, min(i + rows, shape[0])), *rest) for i in range(0, shape[0], rows)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tree_leaves(tree: Mapping[str, Any], sort: bool, prefix: tuple = ()) -> Iterator[tuple]:
    for key in sorted(tree) if sort else list(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            yield from _tree_leaves(value, sort, (*prefix, str(key)))
        elif value is not None:
            yield (*prefix, str(key)), value


def write_vmoe_checkpoint(
    prefix: str | os.PathLike,
    tree: Mapping[str, Any],
    num_shards: int = 1,
    max_chunk_bytes: int = 256 << 20,
    max_subchunk_bytes: int | None = None,
    version: str | None = INDEX_VERSION,
) -> list[Path]:
    """Write a nested dict of arrays in vmoe's released checkpoint layout and encoding.

    Each leaf is cut along its first axis into chunks of at most ``max_chunk_bytes`` (one row at
    least); chunks are dealt round-robin over ``num_shards`` data files, so one leaf's slices can
    land in several shards; ``max_subchunk_bytes`` further splits each chunk's flat data (default:
    one subchunk). ``version=None`` writes an old-style index (leaf order = the tree's own order).
    Returns the written paths (index first). Files are replaced atomically.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes!r}")
    shards: list[dict[str, Any]] = [{CHUNK_MARKER: True} for _ in range(num_shards)]
    index: dict[str, Any] = {}
    next_shard = 0
    for leaf_id, (name, value) in enumerate(_tree_leaves(tree, sort=version is not None)):
        array = np.asarray(value)
        boxes, owners = _row_boxes(array.shape, array.itemsize, max_chunk_bytes), []
        for box in boxes:
            flat = np.ascontiguousarray(array[tuple(slice(lo, hi) for lo, hi in box)]).reshape(-1)
            step = max(1, (max_subchunk_bytes or flat.nbytes or 1) // max(array.itemsize, 1))
            subs = [encode_ndarray(flat[i : i + step]) for i in range(0, max(flat.size, 1), step)]
            chunk = [subs, msgpack.ExtType(EXT_SLICE_ND, encode_slice_nd(box))]
            shards[next_shard].setdefault(str(leaf_id), []).append(chunk)
            owners.append(next_shard)
            next_shard = (next_shard + 1) % num_shards
        node = index
        for key in name[:-1]:
            node = node.setdefault(key, {})
        node[name[-1]] = encode_index_info(array.shape, array.dtype, boxes, owners)
    Path(os.fspath(prefix)).parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, content in enumerate(shards):
        path = shard_path(prefix, i, num_shards)
        _atomic_write_bytes(path, packb(content))
        written.append(path)
    header: dict[str, Any] = {"shard_count": num_shards, "index": index}
    if version is not None:
        header["version"] = version
    index_path = Path(f"{os.fspath(prefix)}.index")
    _atomic_write_bytes(index_path, packb(header))
    return [index_path, *written]
