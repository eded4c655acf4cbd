"""L2-regularised logistic regression on standardised features, fitted by Newton's method.

Pure numpy and deterministic (no random start, no threads beyond BLAS): the pneumonia
selector and the typicality classifier both fit through :func:`fit_newton`, predict
through :func:`predict_standardised` and keep their coefficients as a
:class:`StandardisedLogistic`; each adds its own ``kind`` (and fields) to the model file.

The fitted coefficients are kept to :data:`COEFFICIENT_DIGITS` significant digits. BLAS
and LAPACK pick their kernels by CPU (OpenBLAS by core type), and another kernel sums in
another order: the same features fitted on another machine differ in the last bits, far
below the fit's own tolerance. Rounded, both machines write the same model file, so a
release rebuilt elsewhere keeps its selector version and id (docs/select.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Logits are clipped to this magnitude before ``exp`` (beyond it σ is 0 or 1 in float64).
LOGIT_CLIP = 500.0
#: Significant digits a fitted coefficient keeps (Newton stops at steps of 1e-10).
COEFFICIENT_DIGITS = 10


def significant(value: float, digits: int = COEFFICIENT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (0.0 for -0.0)."""
    out = float(f"{float(value):.{digits}g}")
    return out + 0.0


@dataclass(frozen=True)
class NewtonFit:
    """Standardisation and coefficients of one fit."""

    mean: FloatArray
    scale: FloatArray
    weights: FloatArray
    bias: float
    n_fit: int
    n_positive: int


@dataclass(frozen=True)
class StandardisedLogistic:
    """A fitted model's coefficients: p = σ(w·(x − mean)/scale + b) on its ``features``."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    l2: float
    n_fit: int
    n_positive: int

    @staticmethod
    def fields_of_fit(fit: NewtonFit, features: Sequence[str], l2: float) -> dict[str, Any]:
        """Constructor arguments from a :func:`fit_newton` result."""
        return {
            "features": tuple(features),
            "mean": tuple(significant(v) for v in fit.mean),
            "scale": tuple(significant(v) for v in fit.scale),
            "weights": tuple(significant(v) for v in fit.weights),
            "bias": significant(fit.bias),
            "l2": float(l2),
            "n_fit": fit.n_fit,
            "n_positive": fit.n_positive,
        }

    @staticmethod
    def fields_of_json(data: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from :meth:`coefficients_json`'s keys; ``KeyError``,
        ``TypeError`` or ``ValueError`` on a missing or malformed one."""
        return {
            "features": tuple(str(f) for f in data["features"]),
            "mean": tuple(float(v) for v in data["mean"]),
            "scale": tuple(float(v) for v in data["scale"]),
            "weights": tuple(float(v) for v in data["weights"]),
            "bias": float(data["bias"]),
            "l2": float(data["l2"]),
            "n_fit": int(data["n_fit"]),
            "n_positive": int(data["n_positive"]),
        }

    def coefficients_json(self) -> dict[str, Any]:
        """The coefficients in JSON-able form (a model file adds its ``kind``)."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
            "l2": self.l2,
            "n_fit": self.n_fit,
            "n_positive": self.n_positive,
        }

    def lengths_match(self, n: int) -> bool:
        """Whether mean, scale and weights each hold ``n`` values."""
        return len(self.mean) == len(self.scale) == len(self.weights) == n


def sigmoid(logit: FloatArray) -> FloatArray:
    """σ(logit), with logits clipped to ±:data:`LOGIT_CLIP` (no overflow warning)."""
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(logit, -LOGIT_CLIP, LOGIT_CLIP)))
    return out


def predict_standardised(
    x: npt.ArrayLike,
    mean: tuple[float, ...],
    scale: tuple[float, ...],
    weights: tuple[float, ...],
    bias: float,
) -> FloatArray:
    """p = σ(w·(x − mean)/scale + b) for the rows of ``x``; ``ValueError`` on a width mismatch."""
    arr = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if arr.shape[1] != len(weights):
        msg = f"expected {len(weights)} features, got {arr.shape[1]}"
        raise ValueError(msg)
    z = (arr - np.asarray(mean)) / np.asarray(scale)
    return sigmoid(z @ np.asarray(weights) + bias)


def fit_newton(
    x: FloatArray,
    y: FloatArray,
    l2: float,
    sample_weight: FloatArray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> NewtonFit:
    """Fit by Newton's method; ``x`` is (n, d), ``y`` holds 0/1 labels.

    Features are standardised with the fit set's mean and standard deviation (a constant
    feature keeps scale 1); the penalty ``l2/2·|w|²`` spares the bias; ``sample_weight``
    weighs each row's log-loss. Without both classes the model is the smoothed prior: zero
    weights and bias ``log((n1 + 1) / (n0 + 1))``.
    """
    n, d = x.shape
    sw = np.ones(n) if sample_weight is None else sample_weight
    n1 = int(y.sum())
    mean = x.mean(axis=0) if n else np.zeros(d)
    std = x.std(axis=0) if n else np.ones(d)
    scale = np.where(std > 1e-12, std, 1.0)
    w = np.zeros(d + 1)  # last entry: bias
    if 0 < n1 < n:
        z = np.hstack([(x - mean) / scale, np.ones((n, 1))])
        penalty = np.full(d + 1, l2)
        penalty[-1] = 0.0
        for _ in range(max_iter):
            p = sigmoid(z @ w)
            grad = z.T @ (sw * (p - y)) + penalty * w
            curv = sw * p * (1.0 - p)
            hess = (z * curv[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(d + 1)
            step = np.linalg.solve(hess, grad)
            w = w - step
            if float(np.abs(step).max()) < tol:
                break
    else:
        w[-1] = float(np.log((n1 + 1.0) / (n - n1 + 1.0)))
    return NewtonFit(mean, scale, w[:-1], float(w[-1]), n, n1)
