"""Per-request caps that the shared test app cannot reach with its small model: the steering-work cap, and the
caps' place in the configuration. (tests/service/test_hostile_http.py sends the reachable ones to the app.)"""

from __future__ import annotations

import pytest

from deployments.engine.errors import RequestError
from ingress import schemas as S
from ingress.args import AppArgs
from ingress.handlers.steer import check_steer_work

STEERED, DEFAULT = S.SteerType.STEERED, S.SteerType.DEFAULT


def test_work_counts_vectors_steered_rows_and_every_token():
    assert check_steer_work(3, [STEERED, DEFAULT], 10, 5, 10 ** 6) == 3 * 1 * 15
    assert check_steer_work(64, [DEFAULT], 200, 256, 1) == 0  # DEFAULT alone steers nothing


def test_work_over_the_cap_is_a_400_that_says_what_to_change():
    with pytest.raises(RequestError) as e:
        check_steer_work(64, [STEERED], 200, 256, 1 << 14)
    assert e.value.status == 400
    assert "64 vectors x 1 steered row(s) x 456 tokens" in e.value.message and "max_steer_work" in e.value.message


def test_defaults_admit_the_largest_ordinary_request():
    """The default caps let a request with the most vectors use the whole default token budget."""
    lim = AppArgs().limits
    assert check_steer_work(lim.max_steer_vectors, [STEERED, DEFAULT], lim.token_limit, lim.max_completion_tokens,
                            lim.max_steer_work) <= lim.max_steer_work


def test_caps_are_settings_with_flat_keys():
    a = AppArgs.model_validate({"max_steer_vectors": 8, "limits": {"max_steer_work": 100}})
    assert a.limits.max_steer_vectors == 8 and a.limits.max_steer_work == 100
    for name in ("max_steer_vectors", "max_steer_work"):
        assert AppArgs.model_fields["limits"].annotation.model_fields[name].description
