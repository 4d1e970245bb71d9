"""Tar shards and saved Hugging Face datasets as image sources, from fixtures built here."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmoe.data import CorruptImageError, DatasetError, load_dataset


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def rgb(seed: int, shape: tuple[int, int] = (4, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def write_shard(file: Path, members: list[tuple[str, bytes]]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(file, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_round_trip(tmp_path: Path):
    # Two train shards in a train/ folder (one key in a sub-path with a dotted extension, as
    # WebDataset writes them), one val shard named val-*.tar beside it.
    train = [(rgb(0), 2), (rgb(1, (6, 3)), 0), (rgb(2), 1)]
    write_shard(
        tmp_path / "train" / "shard-000.tar",
        [
            ("a.png", png(train[0][0])),
            ("a.cls", b"2"),
            ("b.cls", b" 0\n"),
            ("b.png", png(train[1][0])),
        ],
    )
    write_shard(
        tmp_path / "train" / "shard-001.tar",
        [("x/c.seg.png", png(train[2][0])), ("x/c.cls", b"1"), ("x/c.json", b"{}")],
    )
    write_shard(tmp_path / "val-000.tar", [("v.png", png(rgb(3))), ("v.cls", b"1")])
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    splits = load_dataset("tar", tmp_path)
    assert splits.train.class_names == splits.test.class_names == ["zero", "one", "two"]
    assert splits.train.labels.tolist() == [label for _, label in train]
    for i, (pixels, _) in enumerate(train):
        np.testing.assert_array_equal(splits.train.read(i), pixels)
    np.testing.assert_array_equal(splits.test.read(0), rgb(3))
    assert splits.test.labels.tolist() == [1]


def test_tar_shard_problems_name_the_shard(tmp_path: Path):
    write_shard(tmp_path / "train-0.tar", [("a.png", png(rgb(0))), ("a.cls", b"0")])
    with pytest.raises(DatasetError, match="no val or test shards") as excinfo:
        load_dataset("tar", tmp_path)
    assert "; expected " in str(excinfo.value) and "\n" not in str(excinfo.value)
    write_shard(tmp_path / "test-0.tar", [("b.png", png(rgb(1)))])
    with pytest.raises(DatasetError, match="'b' in .*test-0.tar has no .cls label"):
        load_dataset("tar", tmp_path)
    write_shard(tmp_path / "test-0.tar", [("b.png", b"\x89PNG broken"), ("b.cls", b"0")])
    splits = load_dataset("tar", tmp_path)
    with pytest.raises(CorruptImageError, match="test-0.tar"):
        splits.test.read(0)
    (tmp_path / "test-0.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(DatasetError, match="cannot read shard .*test-0.tar"):
        load_dataset("tar", tmp_path)


def test_saved_hugging_face_dataset(tmp_path: Path):
    import datasets  # the [hf] extra, installed by .ci/run

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    train_pixels = [rgb(0), rgb(1, (7, 2)), rgb(2)]
    dataset = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": [Image.fromarray(p) for p in train_pixels], "label": [1, 0, 1]},
                features=features,
            ),
            "validation": datasets.Dataset.from_dict(
                {"image": [{"bytes": b"garbage", "path": None}], "label": [0]},
                features=features,
            ),
        }
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    splits = load_dataset("hf", tmp_path / "saved")
    assert splits.train.class_names == ["cat", "dog"] and splits.train.labels.tolist() == [1, 0, 1]
    for i, pixels in enumerate(train_pixels):
        np.testing.assert_array_equal(splits.train.read(i), pixels)
    with pytest.raises(CorruptImageError, match="#0"):
        splits.test.read(0)
    dataset["train"].save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DatasetError, match="single split"):
        load_dataset("hf", tmp_path / "one")
