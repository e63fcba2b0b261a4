"""The numbers of a request in the terms of the tensors they end up in, checked before anything joins a batch.

A number that is finite as a JSON float may still overflow or vanish where the model uses it: a strength times
``strength_multiplier`` beyond float32, ``1 / temperature`` beyond float32, a frequency penalty times a token's count,
a steering step whose square the next norm layer cannot hold, a vector too small to normalise in float32. Each is a
400 naming the field. Steering arithmetic is float32 whatever the model's dtype (a float16 model's steered
activations are cast back to float16, so there the step must also fit float16, entry by entry).

Vectors whose direction is all that matters (``normalize_steering``, ``ORTHOGONAL_DECOMP``, ``PROJECTION_CAP``, the
cosine query, and -- up to a factor put back afterwards -- a projection) are scaled by a power of two into
``[2**-SCALE_BITS, 2**SCALE_BITS]`` first: exact in binary floating point, so a vector already inside answers bit for
bit as before, and a tiny or huge one answers what the mathematics says instead of underflowing or overflowing.

Numpy only (the ingress imports no torch).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from deployments.engine.errors import RequestError
from deployments.protocol import SIMPLE_ADDITIVE

from ..errors import quoted

FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The next norm layer squares a steered activation: its norm must stay below this for the square to fit float32.
STEP_NORM_MAX = math.sqrt(FLOAT32_MAX)
#: The smallest normal float32: a temperature and 1 / temperature are then both float32 numbers.
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)
DTYPE_MAX = {"float32": FLOAT32_MAX, "bfloat16": float.fromhex("0x1.fep127"), "float16": 65504.0}
SCALE_BITS = 20


def finite(value, field: str) -> float:
    """``value`` as a float, or a 400 naming ``field`` (NaN, infinities, and integers no float holds)."""
    try:
        v = float(value)
    except (OverflowError, TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise RequestError(f"{field} must be a finite number, got {quoted(value, 40)}")
    return v


def floats(values, field: str) -> np.ndarray:
    """A list of JSON numbers as float64, every entry finite, or a 400 naming ``field``."""
    try:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
    except (OverflowError, TypeError, ValueError):
        raise RequestError(f"{field} must be a list of finite numbers") from None
    if not np.all(np.isfinite(v)):
        raise RequestError(f"{field} contains NaN or infinite values")
    return v


def power_of_two_scale(v: np.ndarray) -> float:
    """``s``, a power of two, such that ``v * s`` has its largest entry within ``[2**-SCALE_BITS, 2**SCALE_BITS]``
    (1.0 when it already has, or when ``v`` is zero)."""
    m = float(np.max(np.abs(v))) if v.size else 0.0
    if m == 0.0 or 2.0 ** -SCALE_BITS <= m <= 2.0 ** SCALE_BITS:
        return 1.0
    return math.ldexp(1.0, -math.frexp(m)[1])  # m * s in [0.5, 1)


def direction(v: np.ndarray) -> np.ndarray:
    """``v`` scaled exactly by a power of two into a range float32 arithmetic handles (see the module's doc)."""
    s = power_of_two_scale(v)
    return v if s == 1.0 else v * s


def check_temperature(value) -> float:
    t = finite(value, "temperature")
    if t < 0:
        raise RequestError(f"temperature must be >= 0 (0 is greedy), got {t:g}")
    if 0 < t < MIN_TEMPERATURE:
        raise RequestError(f"temperature {t:g} is too small: it and 1/temperature must be float32 numbers, so a "
                           f"temperature is 0 (greedy) or at least {MIN_TEMPERATURE:.3g}")
    return t


def check_freq_penalty(value, max_count: int) -> float:
    """``freq_penalty`` times a token's count (at most ``max_count``: the model's context) must fit float32."""
    p = finite(value, "freq_penalty")
    bound = FLOAT32_MAX / max(1, max_count)
    if abs(p) > bound:
        raise RequestError(f"freq_penalty {p:g} is too large: freq_penalty x a token's count (up to {max_count}, the "
                           f"context length) must fit float32, so |freq_penalty| <= {bound:.3g}")
    return p


def coefficient(strength, multiplier: float, field: str) -> float:
    """``strength x strength_multiplier``, which must fit float32."""
    s = finite(strength, field)
    coeff = s * multiplier
    if not abs(coeff) <= FLOAT32_MAX:
        raise RequestError(f"{field} x strength_multiplier = {coeff:g} is beyond float32 (max {FLOAT32_MAX:.3g}); lower "
                           "the strength")
    return coeff


def check_step(v: np.ndarray, coeff: float, method: str, model_dtype: str, field: str) -> None:
    """The activation change one steering vector makes must fit the arithmetic that follows it.

    ``v`` is the vector as it will be applied (float64; unit-normalised already if requested, never zero for the
    projection methods). The step is ``coeff * v`` for SIMPLE_ADDITIVE; for the projection methods it is ``coeff``
    along ``v``'s direction (the component they cap or rescale), ``coeff * v / |v|``.
    """
    norm = float(np.linalg.norm(v))
    largest = float(np.max(np.abs(v))) if v.size else 0.0
    if method == SIMPLE_ADDITIVE:
        size, peak, what = abs(coeff) * norm, abs(coeff) * largest, "strength x vector"
    else:
        size, peak, what = abs(coeff), abs(coeff) * largest / norm, "strength"
    if not size <= STEP_NORM_MAX:
        raise RequestError(f"{field}: the steering step ({what}) has norm {size:.3g}; the model's norm layers square it, "
                           f"so it must stay below {STEP_NORM_MAX:.3g} to fit float32; lower the strength")
    top = DTYPE_MAX.get(model_dtype, FLOAT32_MAX)
    if not peak <= top:
        raise RequestError(f"{field}: the steering step reaches {peak:.3g} in one entry, beyond the model's {model_dtype} "
                           f"(max {top:.3g}); lower the strength")


def projection_scale(vector: np.ndarray) -> tuple[list[float], float]:
    """activation/single's vector: ``(v * s, 1 / s)`` with ``s`` a power of two (see :func:`direction`); the projection
    onto ``v`` is ``1 / s`` times the projection onto ``v * s``."""
    s = power_of_two_scale(vector)
    return (vector * s).tolist(), 1.0 / s


def scaled_values(values: list[float], factor: float, field: str) -> Optional[list[float]]:
    """``values * factor`` (exact: a power of two), each finite, or a 400 naming ``field``."""
    if factor == 1.0:
        out = values
    else:
        out = [v * factor for v in values]
    if not all(math.isfinite(v) for v in out):
        raise RequestError(f"The projection onto {field} is not finite (it overflows); scale the vector down")
    return out
