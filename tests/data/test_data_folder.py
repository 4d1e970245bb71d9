"""Image-folder indexing and per-sample decoding, from PNG/BMP files written with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmoe.data import CorruptImageError, DatasetError, load_dataset, load_image_folder


def save(file: Path, pixels: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(file)


def grey(seed: int, shape: tuple[int, int] = (5, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """What decoding to RGB must give for a greyscale image: the grey value in every channel."""
    return np.repeat(pixels[..., None], 3, axis=2)


def images_of(source) -> list[np.ndarray]:
    return [source.read(i) for i in range(len(source))]


@pytest.mark.parametrize(("ext", "eval_split"), [(".png", "test"), (".bmp", "val")])
def test_train_test_layout_round_trip(tmp_path: Path, ext: str, eval_split: str):
    expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    seed = 0
    for split, counts in (("train", {"cat": 3, "ant": 2}), ("test", {"ant": 1, "cat": 2})):
        for name in sorted(counts):
            for i in range(counts[name]):
                seed += 1
                pixels = grey(seed)
                folder = eval_split if split == "test" else split
                save(tmp_path / folder / name / f"img{i:02d}{ext}", pixels)
                expected[split].append((pixels, ["ant", "cat"].index(name)))
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image")
    splits = load_image_folder(tmp_path)
    assert splits.train.class_names == ["ant", "cat"]
    for split in ("train", "test"):
        dataset = getattr(splits, split)
        assert len(dataset) == len(expected[split])
        np.testing.assert_array_equal(images_of(dataset), [as_rgb(p) for p, _ in expected[split]])
        np.testing.assert_array_equal(dataset.labels, [label for _, label in expected[split]])


def test_class_only_in_train_keeps_its_index(tmp_path: Path):
    save(tmp_path / "train" / "a" / "0.png", grey(0))
    save(tmp_path / "train" / "b" / "0.png", grey(1))
    save(tmp_path / "test" / "b" / "0.png", grey(2))
    splits = load_image_folder(tmp_path)
    assert splits.test.class_names == ["a", "b"]
    assert splits.test.labels.tolist() == [1]


def test_single_level_layout_is_stratified_and_seeded(tmp_path: Path):
    originals = {}
    for c, name in enumerate(["x", "y", "z"]):
        for i in range(5):
            pixels = grey(10 * c + i)
            save(tmp_path / name / f"{i}.png", pixels)
            originals[pixels.tobytes()] = c
    splits = load_dataset("folder", str(tmp_path))
    assert len(splits.train) == 12 and len(splits.test) == 3
    assert sorted(splits.test.labels.tolist()) == [0, 1, 2]
    seen = [*images_of(splits.train), *images_of(splits.test)]
    labels = [*splits.train.labels, *splits.test.labels]
    assert sorted(img[..., 0].tobytes() for img in seen) == sorted(originals)
    for img, label in zip(seen, labels, strict=True):
        assert originals[img[..., 0].tobytes()] == label
    again = load_image_folder(tmp_path)
    np.testing.assert_array_equal(images_of(again.test), images_of(splits.test))
    other = load_image_folder(tmp_path, test_fraction=0.4, seed=5)
    assert len(other.test) == 6


def test_mixed_modes_become_rgb(tmp_path: Path):
    g = grey(0)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    save(tmp_path / "train" / "a" / "g.png", g)
    save(tmp_path / "train" / "b" / "c.png", rgb)
    save(tmp_path / "test" / "a" / "g.png", g)
    splits = load_image_folder(tmp_path)
    first, second = images_of(splits.train)
    np.testing.assert_array_equal(first, as_rgb(g))
    np.testing.assert_array_equal(second, rgb)


def test_images_keep_their_own_sizes(tmp_path: Path):
    shapes = [(4, 4), (8, 12), (5, 3)]
    for i, shape in enumerate(shapes):
        save(tmp_path / "train" / "a" / f"{i}.png", grey(i, shape))
    save(tmp_path / "val" / "a" / "0.png", grey(5, (4, 4)))
    splits = load_image_folder(tmp_path)
    for i, (image, shape) in enumerate(zip(images_of(splits.train), shapes, strict=True)):
        np.testing.assert_array_equal(image, as_rgb(grey(i, shape)))
    np.testing.assert_array_equal(splits.test.read(0), as_rgb(grey(5, (4, 4))))


def test_folder_errors_name_the_path(tmp_path: Path):
    with pytest.raises(DatasetError, match="no class subdirectories") as excinfo:
        load_image_folder(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"cannot load folder dataset from '{tmp_path}': ")
    assert "; expected " in message and "\n" not in message

    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="class folder .*empty_class holds no image files"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").rmdir()

    save(tmp_path / "a" / "ok.png", grey(0))
    save(tmp_path / "a" / "ok2.png", grey(1))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    splits = load_image_folder(tmp_path, test_fraction=0.5)  # indexing reads no pixels
    sources = [(s, i) for s in (splits.train, splits.test) for i in range(len(s))]
    broken = [(s, i) for s, i in sources if s.encoded(i).endswith("broken.png")]
    assert all(s.describe(i) == s.base.path(s.indices[i]) for s, i in sources)
    assert len(broken) == 1
    with pytest.raises(CorruptImageError, match="broken.png") as excinfo:
        broken[0][0].read(broken[0][1])
    assert "\n" not in str(excinfo.value)

    file = tmp_path / "a" / "ok.png"
    with pytest.raises(DatasetError, match="not a directory"):
        load_image_folder(file)


def test_wrong_layouts_name_the_path_and_the_expected_layout(tmp_path: Path):
    save(tmp_path / "loose.png", grey(0))
    save(tmp_path / "a" / "0.png", grey(1))
    with pytest.raises(DatasetError, match="lie directly in") as excinfo:
        load_image_folder(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path) in message and "; expected " in message and "\n" not in message

    only_train = tmp_path / "imagenet"
    save(only_train / "train" / "n01" / "0.png", grey(2))
    with pytest.raises(DatasetError, match="no .*val or .*test") as excinfo:
        load_image_folder(only_train)
    assert str(only_train / "train") in str(excinfo.value)
