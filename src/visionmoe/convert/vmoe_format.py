"""Read and write the sharded msgpack checkpoints released with google-research/vmoe, without JAX.

A checkpoint is ``<prefix>.index`` plus ``<prefix>.data-NNNNN-of-NNNNN`` shards (format described
in ``shared/spec/CHECKPOINT_FORMAT.md``):

- the index is a msgpack map ``{"shard_count", "index", "version"?}`` whose ``index`` mirrors the
  parameter tree, each leaf an *IndexInfo* (global shape/dtype, the slices it was cut into and the
  shard holding each slice);
- each data shard maps ``str(leaf_id)`` to a list of ``[subchunks, slice]`` chunks; a chunk is the
  concatenation of its 1-D subchunks, reshaped to the slice's extent.

Leaf ids are positions in the depth-first flattening of the tree with keys sorted (JAX's order);
files written before the ``version`` field existed use the order stored in the index itself.

We check every chunk against the index (known leaf, expected slice, expected shard, dtype, size)
and that every slice of every leaf arrived, so a truncated, mixed-up or tampered checkpoint fails
with :class:`VmoeFormatError` naming the offending file instead of yielding wrong weights. The
writer exists so tests (and users converting their own trees) can produce the same layout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

CHUNK_MARKER = "__msgpack_array_chunk_a87ca2__"
INDEX_VERSION = "20220622"

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
EXT_SHAPED_ARRAY = 4
EXT_SLICE = 5
EXT_SLICE_ND = 6
EXT_SLICE_ND_ARRAY = 7
EXT_INDEX_INFO = 8

_EXTRA_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


class VmoeFormatError(ValueError):
    """A vmoe checkpoint file that is missing, truncated, malformed or inconsistent."""


@dataclass(frozen=True)
class ShapedArray:
    """Global shape and dtype of one leaf (JAX's abstract array, minus the JAX)."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class IndexInfo:
    """Where a leaf lives: its global shape/dtype, the slices it was cut into, and their shards."""

    global_array: ShapedArray
    slices: tuple[tuple[slice, ...], ...]
    shards: tuple[int, ...]


def _dtype(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise ValueError(f"dtype name must be a string, got {name!r}")
    if name in _EXTRA_DTYPES:
        return _EXTRA_DTYPES[name]
    try:
        return np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def _as_slice(value: Any) -> slice:
    if isinstance(value, slice):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return slice(*value)
    raise ValueError(f"expected a Slice, got {value!r}")


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_ext_hook)


def _ext_hook(code: int, payload: bytes) -> Any:
    """Decode the Flax-style extension types used by vmoe (nested ones are ext types too)."""
    if code == EXT_NDARRAY:
        shape, dtype_name, data = _unpack(payload)
        dtype = _dtype(dtype_name)
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if code == EXT_SHAPED_ARRAY:
        shape, dtype_name, *_ = _unpack(payload)
        return ShapedArray(tuple(int(d) for d in shape), _dtype(dtype_name))
    if code == EXT_SLICE:
        return _as_slice(_unpack(payload))
    if code == EXT_SLICE_ND:
        return tuple(_as_slice(s) for s in _unpack(payload))
    if code == EXT_INDEX_INFO:
        global_array, slices, shards = _unpack(payload)
        if not isinstance(global_array, ShapedArray):
            raise ValueError(f"IndexInfo without a ShapedArray: {global_array!r}")
        slices = tuple(tuple(_as_slice(s) for s in nd) for nd in slices)
        return IndexInfo(global_array, slices, tuple(int(s) for s in shards))
    raise ValueError(f"unsupported msgpack extension type {code}")


def _read_msgpack(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise VmoeFormatError(f"cannot read vmoe checkpoint file {path}: {err}") from None
    try:
        return _unpack(data)
    except Exception as err:  # msgpack raises many types for truncated / garbage input
        raise VmoeFormatError(
            f"{path} is not a valid vmoe checkpoint file (truncated or corrupted msgpack: "
            f"{type(err).__name__}: {err})"
        ) from None


def _flatten(tree: Mapping, sort: bool, prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Depth-first ``(path, leaf)`` pairs; keys sorted as JAX does when ``sort``."""
    keys = sorted(tree) if sort else list(tree)
    for key in keys:
        value = tree[key]
        if isinstance(value, Mapping):
            yield from _flatten(value, sort, (*prefix, str(key)))
        elif value is not None:
            yield (*prefix, str(key)), value


def _extent(nd: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of ``array[nd]`` for an array of ``shape``, or None if the slice does not fit it."""
    if len(nd) > len(shape):
        return None
    out = []
    for i, dim in enumerate(shape):
        s = nd[i] if i < len(nd) else slice(None)
        for bound in (s.start, s.stop):
            if bound is not None and not (0 <= bound <= dim):
                return None
        out.append(len(range(*s.indices(dim))))
    return tuple(out)


def _slice_key(nd: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in nd)


def shard_path(prefix: str | os.PathLike, index: int, count: int) -> Path:
    """File name of data shard ``index`` of ``count``."""
    return Path(f"{os.fspath(prefix)}.data-{index:05d}-of-{count:05d}")


def _read_index(prefix: str | os.PathLike) -> tuple[int, list[tuple[tuple[str, ...], IndexInfo]]]:
    path = Path(f"{os.fspath(prefix)}.index")
    if not path.is_file():
        raise VmoeFormatError(f"vmoe checkpoint index {path} not found")
    content = _read_msgpack(path)
    if not isinstance(content, Mapping) or "index" not in content or "shard_count" not in content:
        raise VmoeFormatError(f"{path} is not a vmoe checkpoint index (no 'index'/'shard_count')")
    count = content["shard_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise VmoeFormatError(f"{path}: bad shard_count {count!r}")
    if not isinstance(content["index"], Mapping):
        raise VmoeFormatError(f"{path}: 'index' is not a tree of IndexInfo")
    leaves = list(_flatten(content["index"], sort="version" in content))
    for name, info in leaves:
        where = f"{path}: leaf {'/'.join(name)}"
        if not isinstance(info, IndexInfo):
            raise VmoeFormatError(f"{where} is not an IndexInfo")
        if len(info.slices) != len(info.shards):
            raise VmoeFormatError(
                f"{where} lists {len(info.slices)} slices for {len(info.shards)} shards"
            )
        shape = info.global_array.shape
        covered = 0
        for nd, shard in zip(info.slices, info.shards, strict=True):
            extent = _extent(nd, shape)
            if extent is None or not 0 <= shard < count:
                raise VmoeFormatError(f"{where} has a slice outside {shape} or a bad shard {shard}")
            covered += int(np.prod(extent, dtype=np.int64))
        if covered != int(np.prod(shape, dtype=np.int64)):
            raise VmoeFormatError(
                f"{where}: its slices cover {covered} of {int(np.prod(shape))} values"
            )
    return count, leaves


def read_vmoe_checkpoint(prefix: str | os.PathLike) -> dict[str, Any]:
    """Read ``<prefix>.index`` and all its data shards into a nested dict of numpy arrays.

    bfloat16 leaves come back as ``ml_dtypes.bfloat16`` arrays.

    Raises:
      VmoeFormatError: on a missing, truncated or inconsistent file (the message names it).
    """
    count, leaves = _read_index(prefix)
    arrays = [np.empty(info.global_array.shape, info.global_array.dtype) for _, info in leaves]
    pending = [
        {_slice_key(nd): shard for nd, shard in zip(info.slices, info.shards, strict=True)}
        for _, info in leaves
    ]
    for shard in range(count):
        path = shard_path(prefix, shard, count)
        if not path.is_file():
            raise VmoeFormatError(f"vmoe checkpoint shard {path} not found")
        _read_shard(path, shard, leaves, arrays, pending)
    for (name, _), left in zip(leaves, pending, strict=True):
        if left:
            raise VmoeFormatError(
                f"leaf {'/'.join(name)}: {len(left)} slice(s) missing from the data shards of "
                f"{os.fspath(prefix)} (shard(s) {sorted(set(left.values()))})"
            )
    tree: dict[str, Any] = {}
    for (name, _), array in zip(leaves, arrays, strict=True):
        node = tree
        for key in name[:-1]:
            node = node.setdefault(key, {})
        node[name[-1]] = array
    return tree


def _read_shard(
    path: Path,
    shard: int,
    leaves: list[tuple[tuple[str, ...], IndexInfo]],
    arrays: list[np.ndarray],
    pending: list[dict[tuple, int]],
) -> None:
    content = _read_msgpack(path)
    if not isinstance(content, Mapping) or content.get(CHUNK_MARKER, True) is not True:
        raise VmoeFormatError(f"{path} is not a vmoe data shard (expected a map of chunks)")
    for key, chunks in content.items():
        if key == CHUNK_MARKER:
            continue
        try:
            leaf = int(key)
        except (TypeError, ValueError):
            raise VmoeFormatError(
                f"{path}: unexpected key {key!r} (leaf ids are integers)"
            ) from None
        if not 0 <= leaf < len(leaves):
            raise VmoeFormatError(f"{path}: leaf id {leaf} not in the index ({len(leaves)} leaves)")
        name = "/".join(leaves[leaf][0])
        info = leaves[leaf][1]
        if not isinstance(chunks, list):
            raise VmoeFormatError(f"{path}: leaf {name} holds {type(chunks).__name__}, not chunks")
        for chunk in chunks:
            _place_chunk(path, shard, name, info, arrays[leaf], pending[leaf], chunk)


def _place_chunk(
    path: Path,
    shard: int,
    name: str,
    info: IndexInfo,
    array: np.ndarray,
    pending: dict[tuple, int],
    chunk: Any,
) -> None:
    where = f"{path}: leaf {name}"
    if not (isinstance(chunk, list) and len(chunk) == 2 and isinstance(chunk[0], list)):
        raise VmoeFormatError(f"{where}: malformed chunk (expected [subchunks, SliceNd])")
    subchunks, nd = chunk
    if not isinstance(nd, tuple) or not all(isinstance(s, slice) for s in nd):
        raise VmoeFormatError(f"{where}: chunk without a SliceNd")
    if not all(isinstance(s, np.ndarray) for s in subchunks):
        raise VmoeFormatError(f"{where}: chunk holds something other than arrays")
    key = _slice_key(nd)
    if pending.get(key) != shard:
        raise VmoeFormatError(
            f"{where}: chunk {key} is not a slice the index assigns to this shard (or repeats one)"
        )
    extent = _extent(nd, array.shape)
    if extent is None:
        raise VmoeFormatError(f"{where}: chunk slice {key} does not fit shape {array.shape}")
    for sub in subchunks:
        if sub.dtype != array.dtype:
            raise VmoeFormatError(f"{where}: chunk dtype {sub.dtype} != leaf dtype {array.dtype}")
    flat = np.concatenate([s.reshape(-1) for s in subchunks]) if subchunks else np.empty(0)
    if flat.size != int(np.prod(extent, dtype=np.int64)):
        raise VmoeFormatError(
            f"{where}: chunk has {flat.size} values but slice {key} of shape {array.shape} "
            f"needs {int(np.prod(extent))}"
        )
    array[nd] = flat.astype(array.dtype, copy=False).reshape(extent)
    del pending[key]


# ---------------------------------------------------------------------------------------------
# Writer


def _pack_ndarray(array: np.ndarray) -> msgpack.ExtType:
    array = np.ascontiguousarray(array)
    payload = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes()))
    return msgpack.ExtType(EXT_NDARRAY, payload)


def _pack_slice(s: slice) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SLICE, msgpack.packb((s.start, s.stop, s.step)))


def _pack_slice_nd(nd: tuple[slice, ...]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SLICE_ND, msgpack.packb([_pack_slice(s) for s in nd]))


def _pack_index_info(array: np.ndarray, slices: list, shards: list[int]) -> msgpack.ExtType:
    shaped = msgpack.ExtType(
        EXT_SHAPED_ARRAY, msgpack.packb((list(array.shape), array.dtype.name, False, {}))
    )
    payload = msgpack.packb((shaped, [_pack_slice_nd(nd) for nd in slices], shards))
    return msgpack.ExtType(EXT_INDEX_INFO, payload)


def _row_slices(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> list[tuple[slice, ...]]:
    """Cut an array into runs of leading-axis rows of at most ``max_bytes`` (>= one row)."""
    if not shape or shape[0] == 0:
        return [tuple(slice(0, d, 1) for d in shape)]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, max_bytes // row_bytes)
    rest = tuple(slice(0, d, 1) for d in shape[1:])
    return [(slice(i, min(i + rows, shape[0]), 1), *rest) for i in range(0, shape[0], rows)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_vmoe_checkpoint(
    prefix: str | os.PathLike,
    tree: Mapping[str, Any],
    num_shards: int = 1,
    max_chunk_bytes: int = 256 << 20,
    max_subchunk_bytes: int | None = None,
    version: str | None = INDEX_VERSION,
) -> list[Path]:
    """Write a nested dict of arrays in vmoe's released checkpoint layout.

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
    leaves = list(_flatten(tree, sort=version is not None))
    shards: list[dict[str, Any]] = [{CHUNK_MARKER: True} for _ in range(num_shards)]
    index: dict[str, Any] = {}
    next_shard = 0
    for leaf_id, (name, value) in enumerate(leaves):
        array = np.asarray(value)
        slices, owners = _row_slices(array.shape, array.itemsize, max_chunk_bytes), []
        for nd in slices:
            flat = np.ascontiguousarray(array[nd]).reshape(-1)
            step = max(1, (max_subchunk_bytes or flat.nbytes or 1) // max(array.itemsize, 1))
            subs = [_pack_ndarray(flat[i : i + step]) for i in range(0, max(flat.size, 1), step)]
            shards[next_shard].setdefault(str(leaf_id), []).append([subs, _pack_slice_nd(nd)])
            owners.append(next_shard)
            next_shard = (next_shard + 1) % num_shards
        node = index
        for key in name[:-1]:
            node = node.setdefault(key, {})
        node[name[-1]] = _pack_index_info(array, slices, owners)
    prefix_path = Path(os.fspath(prefix))
    prefix_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, content in enumerate(shards):
        path = shard_path(prefix, i, num_shards)
        _atomic_write_bytes(path, msgpack.packb(content))
        written.append(path)
    header: dict[str, Any] = {"shard_count": num_shards, "index": index}
    if version is not None:
        header["version"] = version
    index_path = Path(f"{os.fspath(prefix)}.index")
    _atomic_write_bytes(index_path, msgpack.packb(header))
    return [index_path, *written]
