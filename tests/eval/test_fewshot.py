"""Tests for the few-shot ridge linear-probe protocol (visionmoe.eval.fewshot)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visionmoe.eval.fewshot import (
    BIAS_VALUE,
    BIG_VISION_LAMBDA,
    VMOE_LAMBDAS,
    FewShotResult,
    fewshot_accuracy,
    fewshot_evaluate,
    fewshot_indices,
    ridge_eigh_solve,
    select_lambda_by_mean_rank,
    standardize_with_bias,
)

LAMBDAS = (2.0**-3, 0.5, 1.0, 7.0, 2.0**10)


def _direct_ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)


def _clusters(
    rng: np.random.Generator,
    num_classes: int,
    per_class: int,
    dim: int,
    sep: float = 6.0,
    centers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian blobs with unit noise around well-separated class centres."""
    if centers is None:
        centers = rng.normal(size=(num_classes, dim)) * sep
    y = np.repeat(np.arange(num_classes), per_class)
    x = centers[y] + rng.normal(size=(y.size, dim))
    return x, y, centers


# --------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("shape", [(40, 7), (7, 40)], ids=["primal N>=F", "dual N<F"])
def test_ridge_eigh_matches_direct_solve(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=shape)
    Y = rng.normal(size=(shape[0], 3))
    weights = ridge_eigh_solve(X, Y, LAMBDAS)
    assert len(weights) == len(LAMBDAS)
    for lam, W in zip(LAMBDAS, weights, strict=True):
        assert W.shape == (shape[1], 3)
        np.testing.assert_allclose(W, _direct_ridge(X, Y, lam), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (15, 15)])
def test_primal_equals_dual(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=shape)
    Y = 2.0 * np.eye(4)[rng.integers(0, 4, size=shape[0])] - 1.0
    primal = ridge_eigh_solve(X, Y, LAMBDAS, mode="primal")
    dual = ridge_eigh_solve(X, Y, LAMBDAS, mode="dual")
    for wp, wd in zip(primal, dual, strict=True):
        np.testing.assert_allclose(wp, wd, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- sampling


def test_fewshot_indices_properties() -> None:
    rng = np.random.default_rng(2)
    labels = rng.permutation(np.repeat(np.array([3, 0, 7]), [20, 11, 30]))
    for shot in (1, 5, 11):
        idx = fewshot_indices(labels, shot, seed=0)
        assert idx.shape == (3 * shot,)
        assert len(set(idx.tolist())) == idx.size  # no duplicates
        for c in (0, 3, 7):
            assert np.sum(labels[idx] == c) == shot  # exactly `shot`, drawn from class c
        # grouped by class in sorted order
        np.testing.assert_array_equal(labels[idx], np.repeat([0, 3, 7], shot))
        np.testing.assert_array_equal(idx, fewshot_indices(labels, shot, seed=0))
    a = fewshot_indices(labels, 5, seed=0)
    b = fewshot_indices(labels, 5, seed=1)
    assert not np.array_equal(np.sort(a), np.sort(b))


def test_fewshot_indices_matches_spec_generator_usage() -> None:
    """One default_rng(seed) per call; classes in sorted order, each permuted by it."""
    labels = np.array([2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 1])
    rng = np.random.default_rng(5)
    expected = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:2] for c in (0, 1, 2)])
    np.testing.assert_array_equal(fewshot_indices(labels, 2, seed=5), expected)


def test_fewshot_indices_too_few_examples() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"class 1 has only 2 .*shot=3"):
        fewshot_indices(labels, 3, seed=0)


# --------------------------------------------------------------------------- features


def test_standardize_with_bias_uses_train_stats() -> None:
    train = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    test = np.array([[6.0, 3.0]])
    z_train, z_test = standardize_with_bias(train, test)
    assert z_test is not None
    std0 = np.sqrt(8.0 / 3.0) + 1e-5  # population std of (0, 2, 4), plus epsilon
    np.testing.assert_allclose(z_train[:, 0], np.array([-2.0, 0.0, 2.0]) / std0)
    np.testing.assert_allclose(z_train[:, 1], 0.0)  # constant feature -> 0, not NaN
    np.testing.assert_allclose(z_test[0, :2], [4.0 / std0, 2.0 / 1e-5])
    np.testing.assert_array_equal(z_train[:, -1], BIAS_VALUE)
    np.testing.assert_array_equal(z_test[:, -1], BIAS_VALUE)


def test_bias_feature_is_present_and_nearly_unregularised() -> None:
    """With zero-mean columns the bias weight is 100 * sum(Y) / (100^2 N + lam)."""
    rng = np.random.default_rng(3)
    x, y, _ = _clusters(rng, num_classes=3, per_class=4, dim=5)
    z, _ = standardize_with_bias(x)
    Y = 2.0 * np.eye(3)[y] - 1.0
    for lam, W in zip(LAMBDAS, ridge_eigh_solve(z, Y, LAMBDAS), strict=True):
        expected = BIAS_VALUE * Y.sum(axis=0) / (BIAS_VALUE**2 * y.size + lam)
        np.testing.assert_allclose(W[-1], expected, rtol=1e-6)
        # The implied intercept 100 * w is the target mean, barely shrunk by lam.
        np.testing.assert_allclose(BIAS_VALUE * W[-1], Y.mean(axis=0), rtol=1e-1)


def test_test_features_use_fewshot_train_statistics() -> None:
    """A single-class test set that test-set standardisation would split in half.

    Train: class 0 at x=0, class 1 at x=10 -> boundary at the train mean 5. Test:
    class-0 points at x=1 and x=3. Train stats keep both below 5 (accuracy 1.0);
    test stats would map them to -1 and +1, misclassifying x=3 (accuracy 0.5).
    """
    train_x = np.array([[0.0], [0.0], [10.0], [10.0]])
    train_y = np.array([0, 0, 1, 1])
    test_x = np.array([[1.0], [3.0]])
    test_y = np.array([0, 0])
    acc = fewshot_accuracy(train_x, train_y, test_x, test_y, shot=1, seed=0, lambdas=[1.0])
    np.testing.assert_array_equal(acc, [1.0])


# --------------------------------------------------------------------------- accuracy


def test_fewshot_accuracy_matches_reference_implementation() -> None:
    rng = np.random.default_rng(4)
    tr_x, tr_y, centers = _clusters(rng, 5, 30, 16, sep=1.0)
    te_x, te_y, _ = _clusters(rng, 5, 20, 16, centers=centers)
    shot, seed = 5, 3
    acc = fewshot_accuracy(tr_x, tr_y, te_x, te_y, shot, seed, LAMBDAS)

    idx = fewshot_indices(tr_y, shot, seed)
    mean, std = tr_x[idx].mean(0), tr_x[idx].std(0) + 1e-5

    def feats(x: np.ndarray) -> np.ndarray:
        return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])

    Y = 2.0 * np.eye(5)[tr_y[idx]] - 1.0
    for lam, a in zip(LAMBDAS, acc, strict=True):
        pred = np.argmax(feats(te_x) @ _direct_ridge(feats(tr_x[idx]), Y, lam), axis=1)
        assert a == pytest.approx(np.mean(pred == te_y))


def test_end_to_end_separable_clusters() -> None:
    rng = np.random.default_rng(6)
    tr_x, tr_y, centers = _clusters(rng, 10, 40, 32, sep=3.0)
    te_x, te_y, _ = _clusters(rng, 10, 50, 32, centers=centers)
    acc = fewshot_accuracy(tr_x, tr_y, te_x, te_y, 10, 0, VMOE_LAMBDAS)
    assert acc.shape == (len(VMOE_LAMBDAS),)
    assert np.all((acc >= 0) & (acc <= 1))
    assert acc[VMOE_LAMBDAS.index(1.0)] > 0.9


def test_arbitrary_label_ids_and_unseen_test_classes() -> None:
    rng = np.random.default_rng(7)
    tr_x, tr_y, centers = _clusters(rng, 3, 10, 8, sep=5.0)
    te_x, te_y, _ = _clusters(rng, 3, 10, 8, centers=centers)
    remap = np.array([-4, 17, 1000])
    acc = fewshot_accuracy(tr_x, remap[tr_y], te_x, remap[te_y], 5, 0, [1.0])
    assert acc[0] > 0.9
    te_y_unseen = remap[te_y].copy()
    te_y_unseen[:10] = 99  # never in train -> always counted wrong
    acc2 = fewshot_accuracy(tr_x, remap[tr_y], te_x, te_y_unseen, 5, 0, [1.0])
    assert acc2[0] <= 2.0 / 3.0 + 1e-12


# --------------------------------------------------------------------------- selection


def test_select_lambda_by_mean_rank_hand_table() -> None:
    # ranks (1 = best):        a: [3, 1, 2]  b: [1, 3, 2]  c: [2.5, 1, 2.5] (tie)
    # mean ranks:                 [6.5/3, 5/3, 6.5/3] -> index 1
    table = {
        "a": np.array([0.1, 0.9, 0.5]),
        "b": np.array([0.8, 0.2, 0.3]),
        "c": np.array([0.4, 0.6, 0.4]),
    }
    assert select_lambda_by_mean_rank(table) == 1
    # Mean rank, not mean accuracy: mean accuracy would pick index 0 here.
    table2 = {"a": np.array([1.0, 0.0]), "b": np.array([0.4, 0.5]), "c": np.array([0.4, 0.5])}
    assert select_lambda_by_mean_rank(table2) == 1
    # A tie in mean rank goes to the smallest index.
    assert select_lambda_by_mean_rank({"a": np.array([0.3, 0.3, 0.1])}) == 0


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({}, "empty"),
        ({"a": np.array([0.1, 0.2]), "b": np.array([0.1])}, "share one lambda grid"),
        ({"a": np.array([0.1, np.nan])}, "NaN"),
        ({"a": np.zeros((2, 2))}, "1-D"),
    ],
)
def test_select_lambda_bad_input(table: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_lambda_by_mean_rank(table)


# --------------------------------------------------------------------------- driver


def _datasets(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, ...]]:
    out = {}
    for name, (c, d, sep) in {"easy": (4, 12, 3.0), "hard": (5, 20, 0.6)}.items():
        tr_x, tr_y, centers = _clusters(rng, c, 30, d, sep=sep)
        te_x, te_y, _ = _clusters(rng, c, 15, d, centers=centers)
        out[name] = (tr_x, tr_y, te_x, te_y)
    return out


def test_fewshot_evaluate_vmoe_selects_shared_lambda_by_mean_rank() -> None:
    data = _datasets(np.random.default_rng(8))
    res = fewshot_evaluate(data, shots=(1, 5), protocol="vmoe")
    assert isinstance(res, FewShotResult)
    assert res.protocol == "vmoe" and res.shots == [1, 5] and res.seeds == [0]
    for shot in (1, 5):
        table = {n: fewshot_accuracy(*d, shot, 0, VMOE_LAMBDAS) for n, d in data.items()}
        best = select_lambda_by_mean_rank(table)
        assert res.lambda_per_shot[shot] == VMOE_LAMBDAS[best]
        for name in data:
            assert res.per_seed[name][shot] == [table[name][best]]
            assert res.accuracy[name][shot] == table[name][best]
    d = res.to_dict()
    assert json.loads(json.dumps(d))["accuracy"]["easy"]["5"] == res.accuracy["easy"][5]


def test_fewshot_evaluate_big_vision_three_seeds() -> None:
    data = _datasets(np.random.default_rng(9))
    res = fewshot_evaluate(data, shots=(5,), protocol="big_vision")
    assert res.seeds == [0, 1, 2]
    assert res.lambda_per_shot == {5: BIG_VISION_LAMBDA}
    for name, d in data.items():
        expected = [float(fewshot_accuracy(*d, 5, s, [BIG_VISION_LAMBDA])[0]) for s in (0, 1, 2)]
        assert res.per_seed[name][5] == expected
        assert res.accuracy[name][5] == pytest.approx(np.mean(expected))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_error() -> None:
    rng = np.random.default_rng(10)
    tr_x, tr_y, centers = _clusters(rng, 2, 6, 3)
    te_x, te_y, _ = _clusters(rng, 2, 3, 3, centers=centers)
    data = {"d": (tr_x, tr_y, te_x, te_y)}

    with pytest.raises(ValueError, match=r"unknown protocol 'sklearn'.*vmoe, big_vision"):
        fewshot_evaluate(data, protocol="sklearn")
    with pytest.raises(ValueError, match=r"shot must be an integer >= 1.*got 0"):
        fewshot_evaluate(data, shots=(0,))
    with pytest.raises(ValueError, match="shot must be an integer >= 1"):
        fewshot_indices(tr_y, -2, seed=0)
    with pytest.raises(ValueError, match=r"train_x has 12 rows but train_y has 11"):
        fewshot_accuracy(tr_x, tr_y[:-1], te_x, te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match=r"dataset .d.: test_x has 6 rows but test_y has 5"):
        fewshot_evaluate({"d": (tr_x, tr_y, te_x, te_y[:-1])})
    with pytest.raises(ValueError, match=r"train_x must be a 2-D array.*ndim=1"):
        fewshot_accuracy(tr_x[:, 0], tr_y, te_x, te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match=r"test_x must be a 2-D array.*ndim=3"):
        fewshot_accuracy(tr_x, tr_y, te_x[None], te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match=r"test_x has 2 features but train_x has 3"):
        fewshot_accuracy(tr_x, tr_y, te_x[:, :2], te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match="integer dtype"):
        fewshot_accuracy(tr_x, tr_y.astype(float), te_x, te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match="finite"):
        fewshot_accuracy(np.full_like(tr_x, np.nan), tr_y, te_x, te_y, 1, 0, [1.0])
    with pytest.raises(ValueError, match=r"lambdas must be finite and > 0.*0\.0"):
        ridge_eigh_solve(tr_x, tr_y[:, None], [1.0, 0.0])
    with pytest.raises(ValueError, match="lambdas must contain at least one value"):
        ridge_eigh_solve(tr_x, tr_y[:, None], [])
    with pytest.raises(ValueError, match="mode must be one of"):
        ridge_eigh_solve(tr_x, tr_y[:, None], [1.0], mode="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"class 0 has only 6 .*shot=7"):
        fewshot_evaluate(data, shots=(7,))
    with pytest.raises(ValueError, match="shots must be unique"):
        fewshot_evaluate(data, shots=(1, 1))
    with pytest.raises(ValueError, match=r"dataset 'd' must be a \(train_x"):
        fewshot_evaluate({"d": (tr_x, tr_y)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="seeds must be non-negative integers"):
        fewshot_evaluate(data, seeds=(-1,))
