"""Steering vectors as a request gives them: checked and (optionally) unit-normalised before they reach a model,
and refused where the float32 steering arithmetic would overflow or vanish. Numpy only, so the ingress checks them
before any call (and the generation engine checks them again before a row joins)."""

from __future__ import annotations

import math

import numpy as np

from .engine.errors import RequestError
from .protocol import METHODS, SIMPLE_ADDITIVE

FLOAT32_MAX = float(np.finfo(np.float32).max)


def prepare_vector(vector, coeff: float, method: str, normalize: bool, what: str = "steering vector") -> np.ndarray:
    """Check a vector and coefficient and (optionally) unit-normalise the vector. Raises RequestError on bad input.

    Everything that would overflow or vanish in the float32 steering arithmetic is refused here, naming ``what``.
    """
    if method not in METHODS:
        raise RequestError(f"Unknown steer_method {method!r}; use one of {list(METHODS)}")
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise RequestError(f"{what} contains NaN or infinite values")
    if not math.isfinite(coeff):
        raise RequestError(f"{what}: strength x strength_multiplier must be finite, got {coeff}")
    norm = float(np.linalg.norm(v))
    if normalize or method != SIMPLE_ADDITIVE:
        if norm == 0.0 or not math.isfinite(norm):
            why = "normalize_steering" if normalize else method
            raise RequestError(f"{what} is the zero vector: it has no direction to {'normalise' if normalize else 'project on'} ({why})")
    if normalize:
        v = v / norm
    with np.errstate(over="ignore"):
        out = v.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise RequestError(f"{what} overflows float32")
    check_steer_numbers(out, coeff, method, what)
    return out


def check_steer_numbers(v: np.ndarray, coeff: float, method: str, what: str) -> None:
    """Refuse a (float32) vector and coefficient whose steering arithmetic would leave float32."""
    if abs(coeff) > FLOAT32_MAX:
        raise RequestError(f"{what}: strength x strength_multiplier is {coeff:g}, beyond float32 (max {FLOAT32_MAX:.3g}); "
                           "lower the strength")
    v64 = np.asarray(v, dtype=np.float64)
    if method == SIMPLE_ADDITIVE:
        if not np.all(np.abs(coeff * v64) <= FLOAT32_MAX):
            raise RequestError(f"{what}: strength x vector overflows float32; lower the strength")
    elif not np.any(v64 != 0.0):
        raise RequestError(f"{what} is the zero vector in float32: it has no direction to project on ({method})")
