"""Image-folder loading from PNG/BMP files written with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmoe.data import DatasetError, load_dataset, load_image_folder


def save(file: Path, pixels: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(file)


def grey(seed: int, shape: tuple[int, int] = (5, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp"])
def test_train_test_layout_round_trip(tmp_path: Path, ext: str):
    expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    seed = 0
    for split, counts in (("train", {"cat": 3, "ant": 2}), ("test", {"ant": 1, "cat": 2})):
        for name in sorted(counts):
            for i in range(counts[name]):
                seed += 1
                pixels = grey(seed)
                save(tmp_path / split / name / f"img{i:02d}{ext}", pixels)
                expected[split].append((pixels, ["ant", "cat"].index(name)))
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image")
    splits = load_image_folder(tmp_path)
    assert splits.train.class_names == ["ant", "cat"]
    for split in ("train", "test"):
        dataset = getattr(splits, split)
        assert dataset.images.shape == (len(expected[split]), 5, 6, 1)
        np.testing.assert_array_equal(dataset.images[..., 0], [p for p, _ in expected[split]])
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
    seen = [*splits.train.images, *splits.test.images]
    labels = [*splits.train.labels, *splits.test.labels]
    assert sorted(img[..., 0].tobytes() for img in seen) == sorted(originals)
    for img, label in zip(seen, labels, strict=True):
        assert originals[img[..., 0].tobytes()] == label
    again = load_image_folder(tmp_path)
    np.testing.assert_array_equal(again.test.images, splits.test.images)
    other = load_image_folder(tmp_path, test_fraction=0.4, seed=5)
    assert len(other.test) == 6


def test_mixed_modes_become_rgb(tmp_path: Path):
    g = grey(0)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    save(tmp_path / "train" / "a" / "g.png", g)
    save(tmp_path / "train" / "b" / "c.png", rgb)
    save(tmp_path / "test" / "a" / "g.png", g)
    splits = load_image_folder(tmp_path)
    assert splits.train.images.shape == (2, 5, 6, 3)
    np.testing.assert_array_equal(splits.train.images[0], np.repeat(g[..., None], 3, axis=2))
    np.testing.assert_array_equal(splits.train.images[1], rgb)


def test_odd_sizes_are_resized_to_most_common(tmp_path: Path):
    for i in range(3):
        save(tmp_path / "train" / "a" / f"{i}.png", grey(i, (4, 4)))
    save(tmp_path / "train" / "a" / "big.png", grey(9, (8, 12)))
    save(tmp_path / "test" / "a" / "0.png", grey(5, (4, 4)))
    splits = load_image_folder(tmp_path)
    assert splits.train.images.shape == (4, 4, 4, 1)
    np.testing.assert_array_equal(splits.test.images[0, ..., 0], grey(5, (4, 4)))


def test_folder_errors_name_the_path(tmp_path: Path):
    with pytest.raises(DatasetError, match="no class subdirectories") as excinfo:
        load_image_folder(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"cannot load folder dataset from '{tmp_path}': ")
    assert "; expected " in message and "\n" not in message

    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_image_folder(tmp_path)

    save(tmp_path / "a" / "ok.png", grey(0))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="broken.png") as excinfo:
        load_image_folder(tmp_path)
    assert f"'{tmp_path}'" in str(excinfo.value)

    file = tmp_path / "a" / "ok.png"
    with pytest.raises(DatasetError, match="not a directory"):
        load_image_folder(file)
