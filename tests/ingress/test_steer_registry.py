"""The steering methods are defined once (deployments.steer_methods): the wire enum, the OpenAPI schema,
/v1/capabilities, the engine's functions and the vector checks all agree with that registry, and each method's
declared properties are what its function does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments import steer_methods as SM
from deployments.engine.errors import RequestError
from deployments.steer_vectors import prepare_vector

METHODS = list(SM.METHODS)


def test_the_registry_names_each_method_once():
    assert METHODS and len(set(METHODS)) == len(METHODS)
    assert SM.DEFAULT in METHODS and SM.spec(SM.DEFAULT).name == SM.DEFAULT
    for name in (SM.SIMPLE_ADDITIVE, SM.ORTHOGONAL_DECOMP, SM.PROJECTION_CAP):
        assert name in METHODS


def test_the_wire_enum_and_the_openapi_schema_are_the_registry():
    from neuronpedia_inference_client.models import NPSteerMethod

    from ingress import schemas as S
    from ingress.app import app

    assert [m.value for m in S.SteerMethod] == METHODS
    assert app.openapi()["components"]["schemas"]["SteerMethod"]["enum"] == METHODS
    assert S.LegacyCompletionRequest.model_fields["steer_method"].default.value == SM.DEFAULT
    # every method the published client can send is one we serve
    assert {m.value for m in NPSteerMethod} <= set(METHODS)
    base = dict(model="demo-lm", normalize_steering=False, types=["STEERED"], n_completion_tokens=1, temperature=0,
                strength_multiplier=1, freq_penalty=0, seed=0, prompt="I think")
    for m in METHODS:
        assert S.SteerCompletionRequest(steer_method=m, **base).steer_method.value == m
    with pytest.raises(ValueError):
        S.SteerCompletionRequest(steer_method="MAGIC", **base)


def test_capabilities_list_the_registry_where_steering_is_served():
    from ingress.endpoints import route_paths
    from ingress.handlers.util import served_steer_methods

    assert served_steer_methods(route_paths()) == METHODS
    assert served_steer_methods([r for r in route_paths() if not r.startswith("/v1/steer")]) == []


def test_the_engine_binds_exactly_one_function_and_slot_code_per_method():
    from deployments.engine import steering as St

    assert list(St.FUNCTIONS) == METHODS and all(callable(f) for f in St.FUNCTIONS.values())
    assert list(St.SLOT_CODES) == METHODS
    codes = list(St.SLOT_CODES.values())
    assert len(set(codes)) == len(codes) and 0 not in codes  # 0 is "no vector" in the slot tables
    with pytest.raises(RuntimeError, match="missing"):
        SM.bind({m: None for m in METHODS[1:]}, "test")
    with pytest.raises(RuntimeError, match="not registered"):
        SM.bind({**{m: None for m in METHODS}, "MAGIC": None}, "test")


@pytest.mark.parametrize("method", METHODS)
def test_declared_properties_are_what_the_function_does(method):
    """needs_direction: only v's direction matters (scaling v changes nothing); adds_vector: a zero vector is a no-op."""
    from deployments.engine import steering as St

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 16, generator=g, dtype=torch.float64)
    coeff = torch.tensor([0.5, 3.0], dtype=torch.float64)
    f = St.FUNCTIONS[method]
    spec = SM.spec(method)
    assert torch.allclose(f(h, v, coeff), f(h, 7.0 * v, coeff), rtol=1e-12, atol=1e-12) == spec.needs_direction
    assert not torch.allclose(f(h, v, coeff), h)  # it steers at all
    if spec.adds_vector:
        assert torch.equal(f(h, torch.zeros_like(v), coeff), h)


@pytest.mark.parametrize("method", METHODS)
def test_the_vector_checks_follow_the_declared_properties(method):
    spec = SM.spec(method)
    if spec.needs_direction:
        with pytest.raises(RequestError, match="zero vector"):
            prepare_vector([0.0, 0.0], 1.0, method, normalize=False)
    else:
        assert np.all(prepare_vector([0.0, 0.0], 1.0, method, normalize=False) == 0)
    big = ([1e30, 0.0], 1e9)  # coeff * v = 1e39: beyond float32 only when it is added
    if spec.adds_vector:
        with pytest.raises(RequestError, match="overflows float32"):
            prepare_vector(*big, method, normalize=False)
    else:
        prepare_vector(*big, method, normalize=False)
    with pytest.raises(RequestError, match="Unknown steer_method"):
        prepare_vector([1.0], 1.0, "MAGIC", normalize=False)
