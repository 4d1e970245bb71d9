"""CIFAR pickle loading, including the restricted unpickler's refusal of unsafe globals."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from visionmoe.data import DatasetError, load_cifar, load_dataset
from visionmoe.data.cifar import RestrictedUnpickler


def to_rows(images: np.ndarray) -> np.ndarray:
    """Encode (N, 32, 32, 3) images the way CIFAR does: R plane, G plane, B plane per row."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def dump(file: Path, obj: object, protocol: int = 2) -> None:
    with open(file, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


def make_cifar10(root: Path, protocol: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    x_train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, 10)
    x_test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([9, 0, 4])
    for i in range(5):
        part = slice(2 * i, 2 * i + 2)
        batch = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": [int(v) for v in y_train[part]],
            b"data": to_rows(x_train[part]),
            b"filenames": [b"a.png", b"b.png"],
        }
        dump(root / f"data_batch_{i + 1}", batch, protocol)
    dump(root / "test_batch", {b"labels": y_test.tolist(), b"data": to_rows(x_test)}, protocol)
    names = [n.encode() for n in ("plane", "car", "bird", "cat", "deer")] + [b"x"] * 5
    dump(root / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return x_train, y_train, x_test, y_test


def make_cifar100(root: Path) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    x_train = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 100, 7)
    x_test = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([99, 0])
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        record = {
            b"fine_labels": y.tolist(),
            b"coarse_labels": (y // 5).tolist(),
            b"data": to_rows(x),
        }
        dump(root / name, record)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    dump(root / "meta", meta)
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_round_trip(tmp_path: Path, protocol: int):
    x_tr, y_tr, x_te, y_te = make_cifar10(tmp_path / "cifar-10-batches-py", protocol)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        splits = load_cifar(path)
        assert splits.name == "cifar10"
        np.testing.assert_array_equal(splits.train.images, x_tr)
        np.testing.assert_array_equal(splits.train.labels, y_tr)
        np.testing.assert_array_equal(splits.test.images, x_te)
        np.testing.assert_array_equal(splits.test.labels, y_te)
        assert splits.train.class_names[:3] == ["plane", "car", "bird"]
        assert splits.train.images.flags.c_contiguous
    assert load_dataset("cifar10", str(tmp_path)).num_classes == 10


def test_cifar_plane_order(tmp_path: Path):
    make_cifar10(tmp_path)
    row = (np.arange(3072) % 251).astype(np.uint8)
    dump(tmp_path / "test_batch", {b"labels": [1], b"data": row[None]})
    image = load_cifar(tmp_path).test.images[0]
    assert image[0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert image[0, 1, 0] == row[1] and image[1, 0, 0] == row[32]


def test_cifar100_round_trip_uses_fine_labels(tmp_path: Path):
    x_tr, y_tr, x_te, y_te = make_cifar100(tmp_path / "cifar-100-python")
    splits = load_dataset("cifar100", tmp_path)
    assert splits.name == "cifar100" and splits.num_classes == 100
    np.testing.assert_array_equal(splits.train.images, x_tr)
    np.testing.assert_array_equal(splits.train.labels, y_tr)
    np.testing.assert_array_equal(splits.test.images, x_te)
    np.testing.assert_array_equal(splits.test.labels, y_te)
    assert splits.test.class_names[99] == "fine99"


def test_cifar_kind_mismatch(tmp_path: Path):
    make_cifar100(tmp_path)
    with pytest.raises(DatasetError, match="not found") as excinfo:
        load_dataset("cifar10", tmp_path)
    assert str(excinfo.value).startswith(f"cannot load cifar10 dataset from '{tmp_path}'")


def test_malicious_pickle_is_refused_without_running(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    make_cifar10(tmp_path)
    dump(tmp_path / "data_batch_3", {b"data": Exploit(), b"labels": []})
    with pytest.raises(DatasetError, match="system") as excinfo:
        load_cifar(tmp_path)
    assert str(tmp_path) in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [eval, os.remove, io.BytesIO])
def test_restricted_unpickler_refuses_non_numpy_globals(payload: object):
    blob = pickle.dumps(payload)
    unpickler = RestrictedUnpickler(io.BytesIO(blob), kind="cifar10", path="p", expected="x")
    with pytest.raises(DatasetError, match="refusing"):
        unpickler.load()


def test_restricted_unpickler_allows_arrays():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        blob = pickle.dumps({b"data": array}, protocol=protocol)
        loaded = RestrictedUnpickler(io.BytesIO(blob), kind="k", path="p", expected="x").load()
        np.testing.assert_array_equal(loaded[b"data"], array)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda root: (root / "test_batch").write_bytes(b"\x80\x02}q\x00(U"), "unpickle"),
        (lambda root: (root / "data_batch_5").unlink(), "not found"),
        (
            lambda root: dump(root / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8)}),
            "labels",
        ),
        (lambda root: dump(root / "data_batch_2", [1, 2]), "not a dict"),
        (
            lambda root: dump(
                root / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}
            ),
            "2 images but 1 labels",
        ),
        (
            lambda root: dump(
                root / "test_batch", {b"data": np.zeros((1, 1024), np.uint8), b"labels": [0]}
            ),
            "shape",
        ),
        (
            lambda root: dump(
                root / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}
            ),
            "labels range",
        ),
    ],
)
def test_cifar_malformed(tmp_path: Path, damage, match: str):
    make_cifar10(tmp_path)
    damage(tmp_path)
    with pytest.raises(DatasetError, match=match) as excinfo:
        load_cifar(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"cannot load cifar dataset from '{tmp_path}': ")
    assert "; expected " in message and "\n" not in message


def test_cifar_archive_and_missing_path(tmp_path: Path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError, match="extract"):
        load_cifar(archive)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "missing")
