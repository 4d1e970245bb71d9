"""Decoding one encoded image, and a dataset split made of image files on disk."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from .core import CorruptImageError

__all__ = ["DECODE_MODES", "ImageFiles", "decode_image"]

DECODE_MODES = ("RGB", "L")


def decode_image(source: str | os.PathLike[str] | bytes, mode: str, name: str) -> np.ndarray:
    """Decode a file path or encoded bytes to a uint8 ``(H, W, C)`` array in ``mode``.

    Anything Pillow cannot read completely (unknown format, truncated data, a decompression
    bomb) raises :class:`CorruptImageError` naming ``name``, so the loader can skip the sample
    and count it, or stop with the file named.  ``load()`` forces the full decode here: Pillow
    is lazy and would otherwise report truncation only at conversion time.
    """
    from PIL import Image

    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as image:
            image.load()
            array = np.asarray(image.convert(mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        problem = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise CorruptImageError(f"cannot decode image {name} ({problem})") from exc
    return array[..., None] if array.ndim == 2 else array


class ImageFiles:
    """A split whose samples are image files, decoded one at a time by :meth:`read`.

    Only the file list and the labels are held (a few bytes per sample), so memory and start-up
    time do not depend on the image sizes and no pixel is decoded before a batch needs it.
    Images keep their own sizes; a per-sample transform brings them to a common one.
    ``files`` are relative to ``root`` (or absolute with the default empty root); ``mode`` is the
    Pillow mode every image is converted to (``"RGB"`` or ``"L"``).
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        root: str | os.PathLike[str] = "",
        mode: str = "RGB",
    ) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(files),):
            raise ValueError(f"labels must have shape ({len(files)},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"labels must lie in [0, {len(class_names)})")
        # One byte-string array of paths relative to ``root`` instead of a list of Path objects:
        # a few dozen bytes per file, and it pickles as one buffer when a worker starts.
        self.root = os.fspath(root)
        self.files = np.asarray([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = labels
        self.class_names = [str(name) for name in class_names]
        self.mode = mode

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> str:
        """Full path of sample ``index``."""
        return os.path.join(self.root, os.fsdecode(bytes(self.files[index])))

    def describe(self, index: int) -> str:
        return self.path(index)

    def encoded(self, index: int) -> str:
        """The still-encoded sample (its path), for transforms that decode it themselves."""
        return self.path(index)

    def read(self, index: int) -> np.ndarray:
        file = self.path(index)
        return decode_image(file, self.mode, file)
