"""Few-shot linear-probe evaluation: closed-form ridge regression on frozen features.

The protocol follows the V-MoE / big_vision few-shot evaluation:

1. For every class, draw ``shot`` training examples with a seeded permutation.
2. Standardise features with the statistics of that few-shot set (the test set is
   transformed with the *same* statistics, so no test information leaks into the
   features), append a constant feature of value 100 as a bias, and regress onto
   targets ``2 * onehot - 1``.
3. Solve ridge regression in closed form. One eigendecomposition of the Gram matrix
   (``X^T X`` when ``N >= F``, ``X X^T`` otherwise) serves every regularisation
   strength, so sweeping 30 lambdas costs little more than solving for one.
4. Report top-1 accuracy of ``argmax`` over the regression outputs.

Everything is computed in float64 with numpy on the CPU: the Gram matrices of
standardised features with a bias of 100 span many orders of magnitude, and the
eigen-solve is cheap compared with the feature extraction that precedes it.

Two lambda-selection variants are provided (see :func:`fewshot_evaluate`):

* ``"vmoe"``: a grid ``2^-10 .. 2^19``; for each shot, one lambda shared by all
  datasets, chosen by the best mean rank of *test* accuracy across datasets.
* ``"big_vision"``: a fixed ``lambda = 2^10`` averaged over seeds 0, 1 and 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visionmoe.eval.ridge import (
    BIAS_VALUE,
    STD_EPS,
    _as_features,
    _check_lambdas,
    _ridge_factors,
    ridge_eigh_solve,
    standardize_with_bias,
)

__all__ = [
    "BIG_VISION_LAMBDA",
    "BIAS_VALUE",
    "PROTOCOLS",
    "STD_EPS",
    "VMOE_LAMBDAS",
    "FewShotResult",
    "fewshot_accuracy",
    "fewshot_evaluate",
    "fewshot_indices",
    "ridge_eigh_solve",
    "select_lambda_by_mean_rank",
    "standardize_with_bias",
]

VMOE_LAMBDAS: tuple[float, ...] = tuple(2.0**e for e in range(-10, 20))
"""Regularisation grid searched by the V-MoE protocol: ``2^-10, 2^-9, ..., 2^19``."""

BIG_VISION_LAMBDA: float = 2.0**10
"""Fixed regularisation strength of the big_vision protocol."""

PROTOCOLS: tuple[str, ...] = ("vmoe", "big_vision")

_DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"vmoe": (0,), "big_vision": (0, 1, 2)}


# --------------------------------------------------------------------------- validation


def _as_labels(y: Any, name: str) -> np.ndarray:
    """Return ``y`` as a 1-D integer array or raise ``ValueError``.

    Float labels are rejected rather than cast, so that e.g. soft labels or an
    accidentally swapped (features, labels) pair fail loudly.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class ids; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype; got dtype={arr.dtype}")
    return arr


def _check_shot(shot: Any) -> int:
    """Validate a shot count (a positive int; bools are rejected as a likely mistake)."""
    if isinstance(shot, bool) or not isinstance(shot, (int, np.integer)) or shot < 1:
        raise ValueError(f"shot must be an integer >= 1 (e.g. 1, 5, 10, 25); got {shot!r}")
    return int(shot)


def _check_pair(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} has {x.shape[0]} rows but {y_name} has {y.shape[0]} labels; "
            "they must have the same length"
        )


# --------------------------------------------------------------------------- sampling


def fewshot_indices(labels: np.ndarray, shot: int, seed: int) -> np.ndarray:
    """Pick ``shot`` training indices per class, reproducibly for a given ``seed``.

    A single ``np.random.default_rng(seed)`` is created per call and classes are
    visited in sorted order, each class's indices being permuted with that same
    generator. Fixing both the generator and the visiting order is what makes the
    subset a pure function of ``(labels, shot, seed)``, so results are comparable
    across models evaluated on the same features.

    Returns:
        1-D int64 array of length ``shot * num_classes``, grouped by class in sorted
        class order (within a class, in permutation order).

    Raises:
        ValueError: if ``shot < 1``, labels are not 1-D integers, or some class has
            fewer than ``shot`` examples.
    """
    labels = _as_labels(labels, "labels")
    shot = _check_shot(shot)
    if labels.size == 0:
        raise ValueError("labels is empty; need at least one example per class")
    rng = np.random.default_rng(seed)
    # A stable sort groups indices by class (classes ascending, indices ascending within
    # a class) in O(N log N), instead of one O(N) mask per class.
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    bounds = np.append(starts, labels.size)
    chosen: list[np.ndarray] = []
    for k, c in enumerate(classes):
        idx = order[bounds[k] : bounds[k + 1]]
        if idx.size < shot:
            raise ValueError(
                f"class {c.item()!r} has only {idx.size} training example(s) but "
                f"shot={shot} requires at least {shot}"
            )
        chosen.append(rng.permutation(idx)[:shot])
    return np.concatenate(chosen).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- accuracy


def fewshot_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shot: int,
    seed: int,
    lambdas: Sequence[float],
) -> np.ndarray:
    """Top-1 test accuracy of the ridge probe fitted on one few-shot draw, per lambda.

    The classes are those of ``train_y``; test examples whose label never occurs in
    ``train_y`` count as errors (the probe cannot predict them).

    Returns:
        float64 array of shape ``(len(lambdas),)`` with accuracies in ``[0, 1]``.
    """
    lam = _check_lambdas(lambdas)
    train_x = _as_features(train_x, "train_x")
    test_x = _as_features(test_x, "test_x")
    train_y = _as_labels(train_y, "train_y")
    test_y = _as_labels(test_y, "test_y")
    _check_pair(train_x, train_y, "train_x", "train_y")
    _check_pair(test_x, test_y, "test_x", "test_y")
    if test_y.size == 0:
        raise ValueError("test set is empty; accuracy is undefined")

    idx = fewshot_indices(train_y, shot, seed)
    classes, y_index = np.unique(train_y[idx], return_inverse=True)
    x_train, x_test = standardize_with_bias(train_x[idx], test_x)
    assert x_test is not None  # for type checkers: test_x was given
    targets = 2.0 * np.eye(classes.size)[y_index] - 1.0

    factors = _ridge_factors(x_train, targets)
    test_basis = x_test @ factors.basis  # (M, k), shared by every lambda
    acc = np.empty(lam.size, dtype=np.float64)
    for i, v in enumerate(lam):
        scores = test_basis @ (factors.proj / (factors.eigvals + v)[:, None])
        acc[i] = np.mean(classes[np.argmax(scores, axis=1)] == test_y)
    return acc


# --------------------------------------------------------------------------- selection


def _average_ranks_desc(values: np.ndarray) -> np.ndarray:
    """1-based ranks with the *largest* value ranked 1 and ties sharing their mean rank.

    ``rank_i = #{j : v_j > v_i} + (#{j : v_j == v_i} + 1) / 2`` is exactly the
    average of the positions a tie group would occupy; O(L^2) is fine for L = 30.
    """
    greater = (values[None, :] > values[:, None]).sum(axis=1)
    equal = (values[None, :] == values[:, None]).sum(axis=1)
    return greater + (equal + 1) / 2.0


def select_lambda_by_mean_rank(acc_table: Mapping[str, np.ndarray]) -> int:
    """Index of the lambda with the best (lowest) rank averaged over datasets.

    Ranking within each dataset (rather than averaging raw accuracies) keeps datasets
    with a wide accuracy spread from dominating the choice. Ties within a dataset
    get their average rank; ties in mean rank go to the smallest index (for an
    increasing grid, the smallest lambda).

    Args:
        acc_table: dataset name -> 1-D accuracies, one per lambda (same grid for all).
    """
    if len(acc_table) == 0:
        raise ValueError("acc_table is empty; need accuracies for at least one dataset")
    ranks = []
    size: int | None = None
    for name, acc in acc_table.items():
        arr = np.asarray(acc, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"accuracies for dataset {name!r} must be a non-empty 1-D array; "
                f"got shape {arr.shape}"
            )
        if size is None:
            size = arr.size
        elif arr.size != size:
            raise ValueError(
                f"dataset {name!r} has {arr.size} accuracies but others have {size}; "
                "all datasets must share one lambda grid"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"accuracies for dataset {name!r} contain NaN or inf")
        ranks.append(_average_ranks_desc(arr))
    return int(np.argmin(np.mean(ranks, axis=0)))


# --------------------------------------------------------------------------- driver


@dataclass
class FewShotResult:
    """Outcome of :func:`fewshot_evaluate`.

    Attributes:
        shots: evaluated shot counts, in the order requested.
        lambda_per_shot: shot -> ridge strength used (shared across datasets).
        accuracy: dataset -> shot -> top-1 accuracy averaged over seeds.
        per_seed: dataset -> shot -> accuracy of each seed, in seed order.
        protocol: ``"vmoe"`` or ``"big_vision"``.
        seeds: the seeds used.
    """

    shots: list[int]
    lambda_per_shot: dict[int, float]
    accuracy: dict[str, dict[int, float]]
    per_seed: dict[str, dict[int, list[float]]]
    protocol: str
    seeds: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (builtin ints/floats/lists) suitable for ``json.dumps``.

        Shot keys stay ints; ``json.dumps`` turns them into strings.
        """
        return {
            "protocol": self.protocol,
            "shots": [int(s) for s in self.shots],
            "seeds": [int(s) for s in self.seeds],
            "lambda_per_shot": {int(k): float(v) for k, v in self.lambda_per_shot.items()},
            "accuracy": {
                ds: {int(k): float(v) for k, v in by_shot.items()}
                for ds, by_shot in self.accuracy.items()
            },
            "per_seed": {
                ds: {int(k): [float(a) for a in v] for k, v in by_shot.items()}
                for ds, by_shot in self.per_seed.items()
            },
        }


def fewshot_evaluate(
    datasets: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    shots: Sequence[int] = (1, 5, 10, 25),
    protocol: str = "vmoe",
    seeds: Sequence[int] | None = None,
) -> FewShotResult:
    """Run the few-shot linear-probe protocol on several datasets.

    Protocols:
        ``"vmoe"``: sweep :data:`VMOE_LAMBDAS`. For each shot, accuracies (averaged
        over seeds) are ranked per dataset, ranks are averaged across datasets, and
        the lambda with the best mean rank is used for every dataset at that shot.
        **The selection uses test accuracy**, as in the V-MoE paper's protocol, so the
        reported numbers are optimistic compared with a held-out selection and should
        only be compared with numbers obtained the same way. Default seeds: ``(0,)``.

        ``"big_vision"``: fixed ``lambda =`` :data:`BIG_VISION_LAMBDA`, no selection.
        Default seeds: ``(0, 1, 2)``; every seed is reported in ``per_seed`` and the
        mean in ``accuracy``.

    Args:
        datasets: name -> ``(train_x, train_y, test_x, test_y)`` of frozen features.
        shots: examples per class, each ``>= 1``.
        protocol: ``"vmoe"`` or ``"big_vision"``.
        seeds: few-shot sampling seeds; ``None`` uses the protocol's default.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if not datasets:
        raise ValueError("datasets is empty; provide at least one name -> (tr_x, tr_y, te_x, te_y)")
    shot_list = [_check_shot(s) for s in shots]
    if not shot_list:
        raise ValueError("shots is empty; provide at least one shot count, e.g. (1, 5, 10, 25)")
    if len(set(shot_list)) != len(shot_list):
        raise ValueError(f"shots must be unique; got {list(shots)!r}")
    seed_list = list(_DEFAULT_SEEDS[protocol] if seeds is None else seeds)
    if not seed_list:
        raise ValueError("seeds is empty; provide at least one seed or None for the default")
    for s in seed_list:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seeds must be non-negative integers; got {s!r}")
    seed_list = [int(s) for s in seed_list]
    lambdas = VMOE_LAMBDAS if protocol == "vmoe" else (BIG_VISION_LAMBDA,)

    # Validate and convert to float64 once, not once per (shot, seed) call.
    prepared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, data in datasets.items():
        if not isinstance(data, (tuple, list)) or len(data) != 4:
            raise ValueError(
                f"dataset {name!r} must be a (train_x, train_y, test_x, test_y) tuple; "
                f"got {type(data).__name__}"
                + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
            )
        try:
            tr_x, te_x = _as_features(data[0], "train_x"), _as_features(data[2], "test_x")
            tr_y, te_y = _as_labels(data[1], "train_y"), _as_labels(data[3], "test_y")
            _check_pair(tr_x, tr_y, "train_x", "train_y")
            _check_pair(te_x, te_y, "test_x", "test_y")
            if tr_x.shape[1] != te_x.shape[1]:
                raise ValueError(
                    f"test_x has {te_x.shape[1]} features but train_x has {tr_x.shape[1]}; "
                    "they must match"
                )
        except ValueError as err:
            raise ValueError(f"dataset {name!r}: {err}") from err
        prepared[name] = (tr_x, tr_y, te_x, te_y)

    accuracy: dict[str, dict[int, float]] = {name: {} for name in prepared}
    per_seed: dict[str, dict[int, list[float]]] = {name: {} for name in prepared}
    lambda_per_shot: dict[int, float] = {}
    for shot in shot_list:
        # (num_seeds, num_lambdas) per dataset; ranking uses the seed-mean.
        table = {
            name: np.stack([fewshot_accuracy(*data, shot, s, lambdas) for s in seed_list])
            for name, data in prepared.items()
        }
        best = select_lambda_by_mean_rank({n: t.mean(axis=0) for n, t in table.items()})
        lambda_per_shot[shot] = float(lambdas[best])
        for name, t in table.items():
            per_seed[name][shot] = [float(a) for a in t[:, best]]
            accuracy[name][shot] = float(t[:, best].mean())

    return FewShotResult(
        shots=shot_list,
        lambda_per_shot=lambda_per_shot,
        accuracy=accuracy,
        per_seed=per_seed,
        protocol=protocol,
        seeds=seed_list,
    )
