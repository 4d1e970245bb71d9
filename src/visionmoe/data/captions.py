"""Image-text pairs for contrastive (LIMoE) training: captioned digits and caption folders.

The embedded default needs no files: scikit-learn's 8x8 digits with one generated caption per
image, its phrasing ("a handwritten seven", "the digit 7", "7", ...) drawn by a seeded RNG, so a
model has to learn that numerals and number words mean the same thing. Class prompts for
zero-shot evaluation come from :func:`digit_class_prompts`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core import DatasetError, ImageDataset, split_indices
from .digits import load_digits
from .folder import IMAGE_EXTENSIONS

__all__ = [
    "CAPTION_FOLDER_LAYOUT",
    "CaptionSplits",
    "CaptionedImages",
    "DIGIT_CAPTION_TEMPLATES",
    "DIGIT_WORDS",
    "digit_class_prompts",
    "load_caption_folder",
    "load_digit_captions",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: "seven"; {num}: "7"; {a_word} / {a_num}: with the right article ("an eight", "an 8").
DIGIT_CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a photo of the number {word}",
    "{a_num}",
    "an image of {a_num}",
    "{num}",
    "{word}",
    "the number {word}",
    "a drawing of the digit {num}",
    "a small picture of {a_word}",
)
CAPTION_FOLDER_LAYOUT = (
    "a directory of image files (png/jpg/jpeg/bmp/gif/webp) plus either captions.tsv (one "
    "'file<TAB>caption' line per caption; a file may have several lines) or captions.jsonl (one "
    'JSON object per line: {"file": NAME, "caption": TEXT} or {"file": NAME, "captions": [...]})'
)


@dataclass
class CaptionedImages:
    """Images with one or more captions each; ``labels`` only where classes are known."""

    images: np.ndarray  # (N, H, W, C) uint8
    captions: list[list[str]]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.images) or any(not c for c in self.captions):
            raise ValueError(
                f"need at least one caption for each of the {len(self.images)} images, got "
                f"{len(self.captions)} caption lists"
            )
        if self.labels is not None:
            # Reuse ImageDataset's checks of the image array, labels and class names.
            ImageDataset(self.images, self.labels, self.class_names or [])

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class CaptionSplits:
    name: str
    train: CaptionedImages
    test: CaptionedImages


def _fill(template: str, label: int) -> str:
    word, num = DIGIT_WORDS[label], str(label)
    return template.format(
        word=word,
        num=num,
        a_word=("an " if word[0] in "aeiou" else "a ") + word,
        a_num=("an " if label == 8 else "a ") + num,
    )


def digit_class_prompts(templates: tuple[str, ...] = DIGIT_CAPTION_TEMPLATES) -> list[list[str]]:
    """Per digit class, its prompts (one per template), for zero-shot classification."""
    return [[_fill(t, label) for t in templates] for label in range(10)]


def _caption(labels: np.ndarray, rng: np.random.Generator) -> list[list[str]]:
    choice = rng.integers(0, len(DIGIT_CAPTION_TEMPLATES), size=len(labels))
    return [
        [_fill(DIGIT_CAPTION_TEMPLATES[c], int(y))] for c, y in zip(choice, labels, strict=True)
    ]


def load_digit_captions(seed: int = 0, test_fraction: float = 0.25) -> CaptionSplits:
    """The digits split of :func:`load_digits`, each image with one seeded random caption.

    The image split does not depend on ``seed`` (it is the classification split), so zero-shot
    accuracy is measured on the same test images as the classifiers' accuracy.
    """
    digits = load_digits(test_fraction=test_fraction)
    rng = np.random.default_rng(seed)
    parts = []
    for split in (digits.train, digits.test):
        parts.append(
            CaptionedImages(
                split.images, _caption(split.labels, rng), split.labels, list(split.class_names)
            )
        )
    return CaptionSplits("digits", *parts)


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("caption folder", path, problem, CAPTION_FOLDER_LAYOUT)


def _read_tsv(file: Path, root: object) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or not name.strip() or not caption.strip():
            raise _fail(root, f"{file.name} line {number} is not 'file<TAB>caption': {line!r}")
        rows.append((name.strip(), caption.strip()))
    return rows


def _read_jsonl(file: Path, root: object) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(root, f"{file.name} line {number} is not JSON ({err})") from None
        texts = item.get("captions", [item.get("caption")]) if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("file"), str)
            or not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise _fail(root, f"{file.name} line {number} lacks a 'file' and non-empty captions")
        rows.extend((item["file"], t.strip()) for t in texts)
    return rows


def _decode(files: list[Path], root: object) -> np.ndarray:
    """Decode to the most common size; greyscale stays one channel only if every image is."""
    from PIL import Image

    opened = []
    for file in files:
        try:
            with Image.open(file) as image:
                opened.append((image.size, image.mode))
        except (OSError, ValueError) as err:
            raise _fail(root, f"cannot read image {file} ({type(err).__name__}: {err})") from None
    size = Counter(s for s, _ in opened).most_common(1)[0][0]
    mode = "L" if all(m == "L" for _, m in opened) else "RGB"
    out = np.empty((len(files), size[1], size[0], 1 if mode == "L" else 3), dtype=np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as image:
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            out[i] = np.asarray(image).reshape(out.shape[1:])
    return out


def load_caption_folder(
    path: str | os.PathLike[str], *, test_fraction: float = 0.1, seed: int = 0
) -> CaptionSplits:
    """Load ``path`` (see ``CAPTION_FOLDER_LAYOUT``) and split it with a seeded split.

    Raises :class:`DatasetError` naming the path and the expected layout when the folder, the
    caption file, a referenced image or a caption line is missing or malformed.
    """
    root = Path(path)
    if not root.is_dir():
        raise _fail(path, "directory does not exist" if not root.exists() else "not a directory")
    tsv, jsonl = root / "captions.tsv", root / "captions.jsonl"
    if tsv.is_file() and jsonl.is_file():
        raise _fail(path, "both captions.tsv and captions.jsonl found; keep one")
    if tsv.is_file():
        rows = _read_tsv(tsv, path)
    elif jsonl.is_file():
        rows = _read_jsonl(jsonl, path)
    else:
        raise _fail(path, "no captions.tsv or captions.jsonl")
    captions: dict[str, list[str]] = {}
    for name, caption in rows:
        captions.setdefault(name, []).append(caption)
    if len(captions) < 2:
        raise _fail(path, f"need captions for at least 2 images, found {len(captions)}")
    files = []
    for name in sorted(captions):
        file = root / name
        if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS:
            raise _fail(path, f"captioned file {name!r} is missing or not an image")
        files.append(file)
    images = _decode(files, path)
    texts = [captions[name] for name in sorted(captions)]
    # No classes: one stratum, i.e. a plain seeded split.
    train, test = split_indices(np.zeros(len(files), dtype=np.int64), test_fraction, seed)
    return CaptionSplits(
        root.resolve().name,
        CaptionedImages(images[train], [texts[i] for i in train]),
        CaptionedImages(images[test], [texts[i] for i in test]),
    )
