"""The ingress's checks of a request's numbers in float32's terms (ingress.handlers.numeric) and the wire types'
checks of numbers and text (ingress.schemas): bounds derived from the dtypes, exact power-of-two rescaling, and
errors that stay cheap for hostile lists. Torch-free, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.engine.errors import RequestError
from deployments.protocol import ORTHOGONAL_DECOMP, PROJECTION_CAP, SIMPLE_ADDITIVE
from ingress import schemas as S
from ingress.handlers import numeric as N

F32_MAX = float(np.finfo(np.float32).max)


def test_bounds_come_from_float32():
    assert N.FLOAT32_MAX == F32_MAX
    assert N.STEP_NORM_MAX ** 2 <= F32_MAX and np.isfinite(np.float32(N.STEP_NORM_MAX) ** 2)
    t = np.float32(N.MIN_TEMPERATURE)
    assert t > 0 and np.isfinite(np.float32(1.0) / t)
    assert N.DTYPE_MAX["float16"] == float(np.finfo(np.float16).max)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10 ** 400, "x", None])
def test_finite_refuses_what_no_float32_holds(value):
    with pytest.raises(RequestError, match="temperature must be a finite number"):
        N.finite(value, "temperature")


def test_temperature():
    assert N.check_temperature(0) == 0.0 and N.check_temperature(0.7) == 0.7
    assert N.check_temperature(N.MIN_TEMPERATURE) == N.MIN_TEMPERATURE
    for bad, why in ((-0.1, ">= 0"), (1e-300, "too small"), (1e-39, "too small"), (float("nan"), "finite")):
        with pytest.raises(RequestError, match=why):
            N.check_temperature(bad)


def test_freq_penalty_times_the_largest_count_fits_float32():
    n_ctx = 128
    ok = F32_MAX / n_ctx
    assert N.check_freq_penalty(-ok, n_ctx) == -ok
    assert np.isfinite(np.float32(ok) * np.float32(n_ctx))
    with pytest.raises(RequestError, match="freq_penalty"):
        N.check_freq_penalty(-1e308, n_ctx)
    with pytest.raises(RequestError, match="freq_penalty"):
        N.check_freq_penalty(ok * 1.01, n_ctx)


def test_coefficient_is_strength_times_multiplier_within_float32():
    assert N.coefficient(2, 3.0, "vectors[0].strength") == 6.0
    with pytest.raises(RequestError, match=r"vectors\[0\].strength x strength_multiplier"):
        N.coefficient(1e20, 1e20, "vectors[0].strength")
    with pytest.raises(RequestError, match=r"features\[1\].strength"):
        N.coefficient(1e39, 1.0, "features[1].strength")  # finite in float64, inf in float32


def test_steering_step():
    v = np.full(128, 0.5)
    N.check_step(v, 10.0, SIMPLE_ADDITIVE, "float32", "v")
    with pytest.raises(RequestError, match="norm"):  # entries fit float32, the square of the norm does not
        N.check_step(np.full(128, 1e19), 1.0, SIMPLE_ADDITIVE, "float32", "v")
    with pytest.raises(RequestError, match="float16"):  # a steered float16 activation must fit float16
        N.check_step(v, 2e5, SIMPLE_ADDITIVE, "float16", "v")
    N.check_step(v, 2e5, SIMPLE_ADDITIVE, "bfloat16", "v")
    # the projection methods: the step is coeff along the direction, whatever |v|
    N.check_step(np.full(128, 1e18), 3.0, ORTHOGONAL_DECOMP, "float32", "v")
    with pytest.raises(RequestError, match="norm"):
        N.check_step(v, 1e20, PROJECTION_CAP, "float32", "v")


@pytest.mark.parametrize("scale", [2.0 ** -140, 2.0 ** -30, 1.0, 2.0 ** 25, 2.0 ** 120])
def test_direction_is_an_exact_power_of_two_scale(scale):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(64)
    v = base * scale
    d = N.direction(v)
    m = np.max(np.abs(d))
    assert 2.0 ** -N.SCALE_BITS <= m <= 2.0 ** N.SCALE_BITS
    ratio = d / v
    assert np.all(ratio == ratio[0]) and math.frexp(ratio[0])[0] == 0.5  # one power of two for every entry
    # the float32 vector the engine gets differs from the unscaled one by that power of two exactly
    if 2.0 ** -60 < scale < 2.0 ** 60:
        assert np.array_equal(d.astype(np.float32) / np.float32(ratio[0]), v.astype(np.float32))
    assert np.all(np.isfinite(d.astype(np.float32))) and np.any(d.astype(np.float32) != 0)


def test_direction_leaves_a_comfortable_vector_alone():
    v = np.array([0.25, -3.0, 1e-3])
    assert N.direction(v) is v
    assert N.power_of_two_scale(np.zeros(3)) == 1.0


def test_projection_scale_and_back():
    v = np.array([1e38, -1e38, 3e37])
    scaled, back = N.projection_scale(v)
    assert max(abs(x) for x in scaled) < 1.0 and back > 1e37
    assert N.scaled_values([1.5, -2.0], back, "v") == [1.5 * back, -2.0 * back]
    with pytest.raises(RequestError, match="not finite"):
        N.scaled_values([1e300], 1e300, "v")


def test_floats():
    assert N.floats([1, 2.5], "v").tolist() == [1.0, 2.5]
    with pytest.raises(RequestError, match="NaN or infinite"):
        N.floats([1.0, float("inf")], "v")


# --- the wire types -------------------------------------------------------------------------------------------


def _steer(**kw):
    body = {"prompt": "hi", "model": "m", "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
            "types": ["STEERED"], "vectors": [{"steering_vector": [0.5, 1], "strength": 1, "hook": "h"}],
            "n_completion_tokens": 2, "temperature": 0, "strength_multiplier": 1, "freq_penalty": 0, "seed": 1}
    body.update(kw)
    return body


@pytest.mark.parametrize("patch,where", [
    ({"seed": 10 ** 400}, ("seed",)),
    ({"temperature": -10 ** 309}, ("temperature",)),
    ({"vectors": [{"steering_vector": [0.5, 10 ** 400], "strength": 1, "hook": "h"}]}, ("vectors", 0, "steering_vector")),
    ({"vectors": [{"steering_vector": [0.5], "strength": 10 ** 400, "hook": "h"}]}, ("vectors", 0, "strength")),
])
def test_integers_beyond_float_range_are_schema_errors(patch, where):
    with pytest.raises(ValidationError) as e:
        S.SteerCompletionRequest.model_validate(_steer(**patch))
    (err,) = e.value.errors()
    assert err["type"] == "float_range" and err["loc"] == where


def test_big_integers_within_float_range_pass():
    r = S.SteerCompletionRequest.model_validate(_steer(seed=2 ** 64 + 1, strength_multiplier=10 ** 300))
    assert r.seed == 2 ** 64 + 1  # kept as sent (torch_seed masks it), not rounded through a float


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc00\ud800"])
def test_lone_surrogates_are_invalid_unicode(text):
    with pytest.raises(ValidationError) as e:
        S.TokenizeRequest.model_validate({"model": "m", "text": text})
    (err,) = e.value.errors()
    assert err["type"] == S.INVALID_UNICODE and err["loc"] == ("text",)
    assert "surrogate" in err["msg"]


@pytest.mark.parametrize("text", ["\x00", "\u200f\u202e rtl", "\U0001F600 emoji", "\ufeff"])
def test_odd_but_valid_text_passes(text):
    assert S.TokenizeRequest.model_validate({"model": "m", "text": text}).text == text


def test_a_million_bad_entries_are_one_cheap_error():
    body = {"prompt": "x", "model": "m", "vector": ["a"] * 1_000_000, "hook": "h"}
    with pytest.raises(ValidationError) as e:
        S.ActivationSingleRequest.model_validate(body)
    # The first entry's, once per member of the number union (without fail-fast: a million error objects, which took
    # 16 s and a GB of the ingress to build).
    assert len(e.value.errors()) <= 2


def test_fail_fast_lists_publish_the_same_schema():
    schema = S.ActivationAllRequest.model_json_schema()["properties"]
    assert schema["sort_by_token_indexes"] == {"items": {"type": "integer"}, "title": "Sort By Token Indexes", "type": "array"}
    assert S.ActivationSingleRequest.model_json_schema()["properties"]["vector"]["anyOf"][0] == {
        "items": {"anyOf": [{"type": "number"}, {"type": "integer"}]}, "type": "array"}
