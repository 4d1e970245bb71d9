"""Round-trip and failure tests for the digits, IDX, npz and registry entry points.

Every fixture is written by the test itself into ``tmp_path``, so nothing is downloaded.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from visionmoe.data import (
    DATASET_KINDS,
    FASHION_MNIST_CLASS_NAMES,
    DatasetError,
    DatasetSplits,
    ImageDataset,
    load_dataset,
    load_digits,
    load_idx,
    load_npz,
)

FASHION_NPZ = Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion_mnist.npz"


def assert_dataset_error(excinfo: pytest.ExceptionInfo[DatasetError], kind: str, path: object):
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"cannot load {kind} dataset from '{path}': ")
    assert "; expected " in message


def write_idx(file: Path, array: np.ndarray, magic: int | None = None) -> None:
    if magic is None:
        magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if file.name.endswith(".gz"):
        with gzip.open(file, "wb") as handle:
            handle.write(payload)
    else:
        file.write_bytes(payload)


def make_idx_dir(root: Path, prefix: str = "", gz: bool = False, test_word: str = "t10k"):
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        f"{test_word}-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        f"{test_word}-labels-idx1-ubyte": np.array([0, 9, 3, 3, 1, 2], dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / (prefix + name + (".gz" if gz else "")), array)
    return list(arrays.values())


# --------------------------------------------------------------------------------------- digits


def test_digits_shapes_values_and_names():
    splits = load_digits()
    assert isinstance(splits, DatasetSplits) and splits.name == "digits"
    assert splits.train.images.shape == (1347, 8, 8, 1)
    assert splits.test.images.shape == (450, 8, 8, 1)
    assert splits.train.images.dtype == np.uint8 and splits.train.labels.dtype == np.int64
    assert splits.train.images.max() == 255 and splits.train.images.min() == 0
    assert splits.train.class_names == [str(i) for i in range(10)]
    assert splits.num_classes == 10 and len(splits.test) == 450


def test_digits_matches_sklearn_stratified_split():
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        expected, bunch.target, test_size=0.3, stratify=bunch.target, random_state=7
    )
    splits = load_digits(test_fraction=0.3, seed=7)
    np.testing.assert_array_equal(splits.train.images, x_tr)
    np.testing.assert_array_equal(splits.test.labels, y_te)
    counts = np.bincount(splits.test.labels, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 57  # stratified: ~30% of ~180 per class


def test_digits_split_is_seeded():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.test.labels, c.test.labels)
    with pytest.raises(ValueError):
        load_digits(test_fraction=1.5)


# ------------------------------------------------------------------------------------------ idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("prefix", ["", "fashion-"])
def test_idx_round_trip(tmp_path: Path, gz: bool, prefix: str):
    x_tr, y_tr, x_te, y_te = make_idx_dir(tmp_path / "mnist", prefix, gz)
    splits = load_idx(tmp_path / "mnist")
    assert splits.name == "mnist"
    np.testing.assert_array_equal(splits.train.images, x_tr[..., None])
    np.testing.assert_array_equal(splits.train.labels, y_tr)
    np.testing.assert_array_equal(splits.test.images, x_te[..., None])
    np.testing.assert_array_equal(splits.test.labels, y_te)
    assert splits.train.labels.dtype == np.int64
    assert splits.train.class_names == [str(i) for i in range(10)]
    assert splits.train.images.flags.writeable


def test_idx_emnist_style_names(tmp_path: Path):
    x_tr, _, x_te, _ = make_idx_dir(tmp_path, "emnist-digits-", gz=True, test_word="test")
    splits = load_idx(tmp_path)
    np.testing.assert_array_equal(splits.test.images[..., 0], x_te)
    assert len(splits.train) == len(x_tr)


def test_idx_prefers_uncompressed_copy(tmp_path: Path):
    make_idx_dir(tmp_path, gz=True)
    x_tr, *_ = make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros_like(x_tr))
    np.testing.assert_array_equal(load_idx(tmp_path).train.images[..., 0], x_tr)


def test_idx_wrong_magic(tmp_path: Path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(12, np.uint8), magic=0x0803)
    with pytest.raises(DatasetError, match="magic") as excinfo:
        load_idx(tmp_path)
    assert_dataset_error(excinfo, "idx", tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool):
    make_idx_dir(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    file = tmp_path / name
    if gz:
        with gzip.open(file, "rb") as handle:
            data = handle.read()
        with gzip.open(file, "wb") as handle:
            handle.write(data[:-7])
    else:
        file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="truncated") as excinfo:
        load_idx(tmp_path)
    assert_dataset_error(excinfo, "idx", tmp_path)


def test_idx_cut_gzip_stream_and_garbage_gzip(tmp_path: Path):
    make_idx_dir(tmp_path, gz=True)
    file = tmp_path / "train-images-idx3-ubyte.gz"
    file.write_bytes(file.read_bytes()[:20])
    with pytest.raises(DatasetError) as excinfo:
        load_idx(tmp_path)
    assert_dataset_error(excinfo, "idx", tmp_path)
    file.write_bytes(b"definitely not gzip data")
    with pytest.raises(DatasetError, match="train-images"):
        load_idx(tmp_path)


def test_idx_label_count_mismatch(tmp_path: Path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="12 images but 11 labels") as excinfo:
        load_idx(tmp_path)
    assert_dataset_error(excinfo, "idx", tmp_path)


def test_idx_missing_file_missing_dir_and_ambiguity(tmp_path: Path):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="no test labels file") as excinfo:
        load_idx(tmp_path)
    assert_dataset_error(excinfo, "idx", tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as excinfo:
        load_idx(missing)
    assert_dataset_error(excinfo, "idx", missing)
    other = tmp_path / "two"
    make_idx_dir(other, "a-")
    make_idx_dir(other, "b-")
    with pytest.raises(DatasetError, match="ambiguous"):
        load_idx(other)


# ------------------------------------------------------------------------------------------ npz


def test_npz_round_trip_grey(tmp_path: Path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (10, 6, 7), dtype=np.uint8)
    x_te = rng.integers(0, 256, (4, 6, 7), dtype=np.uint8)
    y_tr, y_te = np.arange(10) % 3, np.array([2, 0, 1, 4])
    file = tmp_path / "tiny.npz"
    np.savez_compressed(file, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    splits = load_npz(file)
    assert splits.name == "tiny"
    np.testing.assert_array_equal(splits.train.images, x_tr[..., None])
    np.testing.assert_array_equal(splits.test.labels, y_te)
    assert splits.train.class_names == ["0", "1", "2", "3", "4"]
    names = ["a", "b", "c", "d", "e", "f"]
    assert load_npz(file, class_names=names).test.class_names == names


def test_npz_float_rgb_and_column_labels(tmp_path: Path):
    x = np.linspace(0.0, 1.0, 2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    y = np.array([[1], [0]])
    file = tmp_path / "f.npz"
    np.savez(file, x_train=x, y_train=y, x_test=x, y_test=y[:, 0])
    splits = load_npz(file)
    np.testing.assert_array_equal(splits.train.images, np.rint(x * 255).astype(np.uint8))
    np.testing.assert_array_equal(splits.train.labels, [1, 0])
    assert splits.train.images.shape == (2, 3, 3, 3)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x_train": np.zeros((2, 3, 3), np.uint8), "y_train": np.zeros(2, int)}, "x_test"),
        (
            {
                "x_train": np.full((2, 3, 3), 2.0),
                "y_train": np.zeros(2, int),
                "x_test": np.zeros((1, 3, 3)),
                "y_test": np.zeros(1, int),
            },
            r"not within \[0, 1\]",
        ),
        (
            {
                "x_train": np.zeros((2, 3, 3), np.uint8),
                "y_train": np.zeros(3, int),
                "x_test": np.zeros((1, 3, 3), np.uint8),
                "y_test": np.zeros(1, int),
            },
            "3 labels but there are 2 images",
        ),
        (
            {
                "x_train": np.zeros((2, 3, 3, 2), np.uint8),
                "y_train": np.zeros(2, int),
                "x_test": np.zeros((1, 3, 3, 2), np.uint8),
                "y_test": np.zeros(1, int),
            },
            "shape",
        ),
        (
            {
                "x_train": np.zeros((2, 3, 3), np.uint8),
                "y_train": np.array(["a", "b"], dtype=object),
                "x_test": np.zeros((1, 3, 3), np.uint8),
                "y_test": np.zeros(1, int),
            },
            "unreadable",  # object arrays are pickles and must not be loaded
        ),
    ],
)
def test_npz_malformed(tmp_path: Path, arrays: dict[str, np.ndarray], match: str):
    file = tmp_path / "bad.npz"
    np.savez(file, **arrays)
    with pytest.raises(DatasetError, match=match) as excinfo:
        load_npz(file)
    assert_dataset_error(excinfo, "npz", file)


def test_npz_not_a_zip_missing_file_and_too_few_names(tmp_path: Path):
    file = tmp_path / "junk.npz"
    file.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetError) as excinfo:
        load_npz(file)
    assert_dataset_error(excinfo, "npz", file)
    with pytest.raises(DatasetError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    ok = tmp_path / "ok.npz"
    x = np.zeros((2, 2, 2), np.uint8)
    np.savez(ok, x_train=x, y_train=np.array([0, 5]), x_test=x, y_test=np.array([1, 1]))
    with pytest.raises(DatasetError, match="class names"):
        load_npz(ok, class_names=["a", "b"])


def test_npz_stored_names_single_npy_and_corrupt_member(tmp_path: Path):
    x = np.zeros((2, 2, 2), np.uint8)
    y = np.array([0, 1])
    named = tmp_path / "named.npz"
    np.savez(named, x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["no", "yes"]))
    assert load_npz(named).train.class_names == ["no", "yes"]
    single = tmp_path / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, x)
    with pytest.raises(DatasetError, match="single .npy"):
        load_npz(single)
    corrupt = tmp_path / "corrupt.npz"
    rng = np.random.default_rng(0)
    big = rng.integers(0, 4, (50, 20, 20), dtype=np.uint8)
    np.savez_compressed(corrupt, x_train=big, y_train=np.zeros(50, int), x_test=x, y_test=y)
    data = bytearray(corrupt.read_bytes())
    data[200:260] = bytes(60)  # damage the compressed x_train stream, keep the zip directory
    corrupt.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as excinfo:
        load_npz(corrupt)
    assert_dataset_error(excinfo, "npz", corrupt)


def test_real_fashion_mnist_npz():
    if not FASHION_NPZ.exists():
        pytest.skip(f"{FASHION_NPZ} not available")
    splits = load_npz(FASHION_NPZ, class_names=FASHION_MNIST_CLASS_NAMES)
    assert splits.train.images.shape == (60000, 28, 28, 1)
    assert splits.test.images.shape == (10000, 28, 28, 1)
    assert splits.train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [6000] * 10)
    assert splits.test.class_names[9] == "Ankle boot"
    assert abs(splits.train.images.mean() / 255 - 0.2860) < 1e-3


# ------------------------------------------------------------------------------------- registry


def test_registry_kinds_and_unknown_kind():
    assert DATASET_KINDS == (
        "digits",
        "folder",
        "idx",
        "cifar10",
        "cifar100",
        "npz",
        "tar",
        "hf",
    )
    with pytest.raises(ValueError, match="cifar100") as excinfo:
        load_dataset("imagenet", "/x")
    assert not isinstance(excinfo.value, DatasetError)


@pytest.mark.parametrize("kind", [k for k in DATASET_KINDS if k != "digits"])
def test_registry_missing_or_absent_path(tmp_path: Path, kind: str):
    with pytest.raises(DatasetError, match="no path given"):
        load_dataset(kind)
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(kind, str(missing))
    assert_dataset_error(excinfo, kind, missing)


def test_registry_dispatch(tmp_path: Path):
    splits = load_dataset("digits", test_fraction=0.5, seed=1)
    assert len(splits.train) + len(splits.test) == 1797
    with pytest.raises(ValueError):
        load_dataset("digits", str(tmp_path))
    make_idx_dir(tmp_path / "idx")
    assert len(load_dataset("idx", tmp_path / "idx").test) == 6
    x = np.zeros((3, 2, 2), np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=[0, 1, 1], x_test=x, y_test=[1, 0, 0])
    loaded = load_dataset("npz", str(tmp_path / "a.npz"), class_names=["no", "yes"])
    assert loaded.train.class_names == ["no", "yes"]


def test_image_dataset_validates():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    ds = ImageDataset(images, np.array([0, 1], dtype=np.int32), ["a", "b"])
    assert ds.labels.dtype == np.int64 and ds.num_classes == 2 and len(ds) == 2
    with pytest.raises(ValueError):
        ImageDataset(images, np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError):
        ImageDataset(images.astype(np.float32), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError):
        ImageDataset(np.zeros((2, 4, 4, 2), np.uint8), np.array([0, 1]), ["a", "b"])
