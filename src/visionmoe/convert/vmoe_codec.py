"""The msgpack extension types of vmoe checkpoints, encoded and decoded byte-exactly.

Layout (``shared/spec/CHECKPOINT_FORMAT.md``): only the *outermost* object of each kind is a
msgpack ``ExtType``; whatever its payload nests is plain msgpack, with nested structures stored as
msgpack-packed ``bin`` strings:

- ndarray (code 1): ``[shape, dtype_name, raw C-order bytes]``;
- Slice: ``[start, stop, step]`` (ints or nil), only ever found packed inside a SliceNd;
- SliceNd (code 6): ``[bin(Slice), ...]``, one per dimension;
- IndexInfo (code 8): ``[bin(ShapedArray), [bin(SliceNd payload), ...], [shard ids]]`` with the
  ShapedArray payload ``[shape, dtype_name, weak_type, {}]``.

Nested payloads are unpacked with ``raw=True`` as the official reader does, so names (dtype
names) arrive as ``str`` or ``bytes``; both are accepted. Decoders raise :class:`CodecError`
with a message lacking the file name, which the reader adds.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np

EXT_NDARRAY = 1
EXT_NPSCALAR = 3
EXT_SLICE_ND = 6
EXT_INDEX_INFO = 8

Box = tuple[tuple[int, int], ...]  # per dimension, [start, stop) of a contiguous slice

# dtypes a checkpoint leaf may hold: numpy's numeric ones plus the ml_dtypes JAX writes.
_EXTRA_DTYPES = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
}


class CodecError(ValueError):
    """A malformed extension-type payload (the caller adds the file and leaf)."""


def packb(obj: Any) -> bytes:
    """msgpack as the official writer emits it (``bin`` for bytes, ``str`` for text)."""
    return msgpack.packb(obj, use_bin_type=True)


def name_of(value: Any, what: str) -> str:
    """A name that arrived as ``str`` or utf-8 ``bytes``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what} {value!r} is not utf-8 text") from None
    raise CodecError(f"{what} must be a str or bytes, got {type(value).__name__} {value!r}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{what} must be an integer, got {value!r}")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise CodecError(f"{what} shape must be a list of integers, got {value!r}")
    shape = tuple(_int(d, f"{what} shape entry") for d in value)
    if any(d < 0 for d in shape):
        raise CodecError(f"{what} shape {list(shape)} has a negative dimension")
    return shape


def dtype_of(value: Any, what: str) -> np.dtype:
    """The dtype named ``value``: a numeric numpy dtype, or bfloat16 / float8."""
    name = name_of(value, f"{what} dtype name")
    if name in _EXTRA_DTYPES:
        return _EXTRA_DTYPES[name]
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biufc":
        raise CodecError(f"{what} has unsupported dtype {name!r} (numeric dtypes or bfloat16)")
    return dtype


def _nested(payload: Any, what: str, length: int | None = None) -> Any:
    """Unpack a packed ``bin`` found inside an extension payload."""
    if isinstance(payload, msgpack.ExtType):
        raise CodecError(
            f"{what} is ExtType {payload.code}; the official format packs it as a msgpack bin"
        )
    if not isinstance(payload, bytes):
        raise CodecError(f"{what} must be a msgpack-packed bin, got {type(payload).__name__}")
    try:
        value = msgpack.unpackb(payload, raw=True, strict_map_key=False)
    except Exception as err:  # msgpack raises many types on truncated or garbage input
        raise CodecError(f"{what} is not valid msgpack ({type(err).__name__}: {err})") from None
    if length is not None and not (isinstance(value, (list, tuple)) and len(value) >= length):
        raise CodecError(f"{what} must be a list of {length} items, got {value!r:.80}")
    return value


def _ext_payload(value: Any, codes: tuple[int, ...], what: str) -> bytes:
    if not isinstance(value, msgpack.ExtType) or value.code not in codes:
        is_ext = isinstance(value, msgpack.ExtType)
        got = f"ExtType {value.code}" if is_ext else type(value).__name__
        raise CodecError(f"{what} must be msgpack ExtType {codes[0]}, got {got}")
    return value.data


# --- decoding ----------------------------------------------------------------------------------


def decode_slice_nd(payload: Any, what: str = "SliceNd") -> tuple[tuple[Any, Any, Any], ...]:
    """``[bin([start, stop, step]), ...]`` -> raw per-dimension triples (validated types)."""
    items = _nested(payload, what)
    if not isinstance(items, (list, tuple)):
        raise CodecError(f"{what} must be a list of packed Slices, got {items!r:.80}")
    out = []
    for dim, item in enumerate(items):
        triple = _nested(item, f"{what} slice {dim}", length=3)
        if len(triple) != 3:
            raise CodecError(f"{what} slice {dim} must be [start, stop, step], got {triple!r}")
        for value in triple:
            if value is not None:
                _int(value, f"{what} slice {dim} bound")
        out.append(tuple(triple))
    return tuple(out)


def decode_ext_slice_nd(value: Any, what: str = "chunk SliceNd") -> tuple[tuple[Any, ...], ...]:
    """An ``ExtType(6, ...)`` as found in data shards."""
    return decode_slice_nd(_ext_payload(value, (EXT_SLICE_ND,), what), what)


def decode_index_info(value: Any) -> tuple[tuple[int, ...], np.dtype, list, list[int]]:
    """``ExtType(8, ...)`` -> ``(shape, dtype, [raw SliceNd], [shard])``."""
    fields = _nested(_ext_payload(value, (EXT_INDEX_INFO,), "IndexInfo"), "IndexInfo", length=3)
    shaped = _nested(fields[0], "IndexInfo ShapedArray", length=2)
    shape = _shape(shaped[0], "ShapedArray")
    dtype = dtype_of(shaped[1], "ShapedArray")
    if not isinstance(fields[1], (list, tuple)) or not isinstance(fields[2], (list, tuple)):
        raise CodecError("IndexInfo slices and shards must be lists")
    slices = [decode_slice_nd(s, f"IndexInfo SliceNd {i}") for i, s in enumerate(fields[1])]
    shards = [_int(s, "IndexInfo shard id") for s in fields[2]]
    if len(slices) != len(shards):
        raise CodecError(f"IndexInfo lists {len(slices)} slices for {len(shards)} shards")
    return shape, dtype, slices, shards


def decode_ndarray(value: Any) -> np.ndarray:
    """``ExtType(1 or 3, [shape, dtype_name, bytes])`` -> a read-only numpy array."""
    payload = _ext_payload(value, (EXT_NDARRAY, EXT_NPSCALAR), "subchunk ndarray")
    fields = _nested(payload, "ndarray", length=3)
    shape = _shape(fields[0], "ndarray")
    dtype = dtype_of(fields[1], "ndarray")
    data = fields[2]
    if not isinstance(data, bytes):
        raise CodecError(f"ndarray data must be bytes, got {type(data).__name__}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(
            f"ndarray of shape {list(shape)} {dtype} needs {expected} bytes, has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def resolve_box(raw: tuple[tuple[Any, Any, Any], ...], shape: tuple[int, ...], what: str) -> Box:
    """Contiguous ``[start, stop)`` per dimension of ``shape`` (missing trailing dims = full)."""
    if len(raw) > len(shape):
        raise CodecError(f"{what} has {len(raw)} dimensions, the leaf of shape {shape} fewer")
    box = []
    for dim, size in enumerate(shape):
        start, stop, step = raw[dim] if dim < len(raw) else (None, None, None)
        if step not in (None, 1):
            raise CodecError(f"{what} has step {step} (only contiguous slices are written)")
        lo = 0 if start is None else start
        hi = size if stop is None else stop
        if not 0 <= lo <= hi <= size:
            raise CodecError(f"{what} [{start}:{stop}] outside dimension {dim} of shape {shape}")
        box.append((lo, hi))
    return tuple(box)


# --- encoding ----------------------------------------------------------------------------------


def encode_slice_nd(box: Box) -> bytes:
    """SliceNd payload: one packed ``[start, stop, nil]`` bin per dimension."""
    return packb([packb([lo, hi, None]) for lo, hi in box])


def encode_ndarray(array: np.ndarray) -> msgpack.ExtType:
    array = np.ascontiguousarray(array)
    return msgpack.ExtType(
        EXT_NDARRAY, packb([list(array.shape), array.dtype.name, array.tobytes()])
    )


def encode_index_info(
    shape: tuple[int, ...], dtype: np.dtype, boxes: list[Box], shards: list[int]
) -> msgpack.ExtType:
    shaped = packb([list(shape), np.dtype(dtype).name, False, {}])
    payload = packb([shaped, [encode_slice_nd(b) for b in boxes], list(shards)])
    return msgpack.ExtType(EXT_INDEX_INFO, payload)
