"""Steering vectors as a request gives them: checked and (optionally) unit-normalised before they reach a model.
Numpy only, so the ingress checks them before any call."""

from __future__ import annotations

import math

import numpy as np

from .engine.errors import RequestError
from .protocol import METHODS, SIMPLE_ADDITIVE


def prepare_vector(vector, coeff: float, method: str, normalize: bool, what: str = "steering vector") -> np.ndarray:
    """Check a vector and coefficient and (optionally) unit-normalise the vector. Raises RequestError on bad input."""
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
    out = v.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise RequestError(f"{what} overflows float32")
    return out
