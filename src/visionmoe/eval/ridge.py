"""Closed-form ridge regression for linear probes on frozen features.

One eigendecomposition of the Gram matrix (``X^T X`` when ``N >= F``, ``X X^T`` otherwise)
serves every regularisation strength, so a sweep over many lambdas costs about one solve. All in
float64 numpy: standardised features plus a bias feature of 100 span many orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

BIAS_VALUE: float = 100.0
"""Value of the constant feature appended as a bias.

A large constant makes the bias *effectively* unregularised: the penalty on the
effective intercept ``b = 100 * w`` is ``lam * (b / 100) ** 2``, i.e. 10^4 times
weaker than on a standardised feature, without needing a separate unpenalised
term in the closed form.
"""

STD_EPS: float = 1e-5
"""Added to the per-feature std so constant features map to 0 instead of NaN."""


def _as_features(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a finite 2-D float64 array or raise ``ValueError``.

    Validation happens up front because a NaN or a 1-D array would otherwise surface
    as an opaque ``LinAlgError`` (or a silently wrong accuracy) deep inside ``eigh``.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_examples, num_features); "
            f"got ndim={arr.ndim} with shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must have a real numeric dtype; got dtype={arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values; found NaN or inf")
    return arr


def _check_lambdas(lambdas: Sequence[float]) -> np.ndarray:
    """Validate ridge strengths: non-empty, finite and strictly positive.

    ``lam > 0`` is required because the Gram matrix of a few-shot set is usually
    rank-deficient (``N < F``, constant features), so ``lam = 0`` would divide by zero.
    """
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if lam.size == 0:
        raise ValueError("lambdas must contain at least one value; got an empty sequence")
    bad = lam[~(np.isfinite(lam) & (lam > 0))]
    if bad.size:
        raise ValueError(f"lambdas must be finite and > 0; got invalid value(s) {bad.tolist()}")
    return lam


# --------------------------------------------------------------------------- features


def standardize_with_bias(
    train_x: np.ndarray, test_x: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Standardise with *train* statistics and append the constant bias feature.

    The test features reuse the few-shot train mean/std: the probe is a function of
    the training set only, and per-test-set statistics would both leak test
    information and shift the decision boundary (e.g. on a single-class test set).

    Note: with zero-mean (standardised) columns the bias column is orthogonal to all
    others, so its weight decouples to ``100 * sum(Y[:, c]) / (100^2 N + lam)``,
    which is identical for every class on a balanced few-shot set. It therefore does
    not change the argmax here; it is kept for fidelity to the reference protocol
    and so that the regression outputs themselves are unbiased.

    Returns:
        ``(train_z, test_z)`` in float64 with ``F + 1`` columns, the last one being
        :data:`BIAS_VALUE`; ``test_z`` is ``None`` when ``test_x`` is ``None``.
    """
    train = _as_features(train_x, "train_x")
    mean = train.mean(axis=0)
    std = train.std(axis=0) + STD_EPS

    def _transform(x: np.ndarray) -> np.ndarray:
        z = (x - mean) / std
        return np.concatenate([z, np.full((z.shape[0], 1), BIAS_VALUE)], axis=1)

    if test_x is None:
        return _transform(train), None
    test = _as_features(test_x, "test_x")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_x has {test.shape[1]} features but train_x has {train.shape[1]}; they must match"
        )
    return _transform(train), _transform(test)


# --------------------------------------------------------------------------- ridge


@dataclass(frozen=True)
class _RidgeFactors:
    """Lambda-independent factors of the ridge solution.

    For any ``lam``: ``W(lam) = basis @ (proj / (eigvals + lam)[:, None])``.

    * primal (``X^T X = V S V^T``): ``basis = V``, ``proj = V^T X^T Y``.
    * dual (``X X^T = U S U^T``): ``basis = X^T U``, ``proj = U^T Y``, from
      ``W = X^T (X X^T + lam I)^-1 Y``.

    Keeping the factors (rather than the weights) lets test scores be computed as
    ``(X_test @ basis) @ (proj / (s + lam))``, so the large ``X_test @ basis`` product
    is shared by every lambda.
    """

    basis: np.ndarray  # (F, k)
    eigvals: np.ndarray  # (k,)
    proj: np.ndarray  # (k, C)

    def weights(self, lam: float) -> np.ndarray:
        return self.basis @ (self.proj / (self.eigvals + lam)[:, None])


def _ridge_factors(
    X: np.ndarray, Y: np.ndarray, mode: Literal["auto", "primal", "dual"] = "auto"
) -> _RidgeFactors:
    """Eigendecompose the smaller Gram matrix of ``X`` once (see :class:`_RidgeFactors`)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (N, F); got shape {X.shape}")
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"Y must be 2-D with the same number of rows as X ({X.shape[0]}); got shape {Y.shape}"
        )
    if mode not in ("auto", "primal", "dual"):
        raise ValueError(f"mode must be one of 'auto', 'primal', 'dual'; got {mode!r}")
    n, f = X.shape
    if mode == "primal" or (mode == "auto" and n >= f):
        eigvals, vecs = np.linalg.eigh(X.T @ X)
        basis, proj = vecs, vecs.T @ (X.T @ Y)
    else:
        eigvals, vecs = np.linalg.eigh(X @ X.T)
        basis, proj = X.T @ vecs, vecs.T @ Y
    # The Gram matrix is PSD; rounding can produce tiny negative eigenvalues, which
    # would bias (s + lam) for small lam, so clip them to the exact-arithmetic bound.
    return _RidgeFactors(basis=basis, eigvals=np.clip(eigvals, 0.0, None), proj=proj)


def ridge_eigh_solve(
    X: np.ndarray,
    Y: np.ndarray,
    lambdas: Sequence[float],
    *,
    mode: Literal["auto", "primal", "dual"] = "auto",
) -> list[np.ndarray]:
    """Solve ``W = (X^T X + lam I)^-1 X^T Y`` for every ``lam`` from ONE ``eigh``.

    With ``mode="auto"`` the primal form (``eigh`` of the ``F x F`` matrix ``X^T X``)
    is used when ``N >= F`` and the dual form ``W = X^T (X X^T + lam I)^-1 Y`` (``eigh``
    of the ``N x N`` matrix ``X X^T``) when ``N < F``: both give the same ``W``, but the
    dual is far cheaper for few-shot sets with many more features than examples.
    ``mode="primal"``/``"dual"`` force a form (useful for testing their equivalence).

    Args:
        X: ``(N, F)`` design matrix.
        Y: ``(N, C)`` targets (a 1-D ``(N,)`` vector is treated as ``C = 1``).
        lambdas: strictly positive ridge strengths.

    Returns:
        One float64 ``(F, C)`` weight matrix per lambda, in the order given.
    """
    lam = _check_lambdas(lambdas)
    factors = _ridge_factors(X, Y, mode)
    return [factors.weights(float(v)) for v in lam]
