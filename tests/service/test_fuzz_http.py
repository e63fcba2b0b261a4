"""Schemathesis against the running service's /openapi.json: generated requests over every route (legacy
included) — zero 5xx, and every response conforms to the published schema."""

from __future__ import annotations

import collections

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from .conftest import SECRET

EXAMPLES_PER_OPERATION = 50  # x every operation (fewer for tiny schemas): over 500 requests in all, derandomized


VALID = {"model": "demo-lm", "source_set": "res-demo", "secret": SECRET}
SOURCE_KEYS = ("source", "layer", "sae_id")


def steer_towards_valid(body: dict, source: str) -> None:
    """Most random bodies die at `Unsupported model`; make three in four name real things so the fuzzing
    reaches the deeper checks (index ranges, lengths, token limits, sort indexes) and the model itself."""
    for k, v in VALID.items():
        if k in body:
            body[k] = v
    for k in SOURCE_KEYS:
        if k in body:
            body[k] = source
    if isinstance(body.get("feature"), dict):
        body["feature"].update(model="demo-lm", source=source)
    if isinstance(body.get("selected_sources"), list):
        body["selected_sources"] = [s for s in body["selected_sources"] if s.endswith("res-demo")][:2]


@pytest.fixture(scope="module")
def schema(serve_app):
    s = schemathesis.openapi.from_url(f"{serve_app}/openapi.json")
    return s


def test_fuzz_every_route(schema, serve_app):
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    for route in ("POST /v1/activation/all", "POST /v1/activation/single", "POST /activations-all", "GET /health"):
        assert route in labels
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    sent = 0

    for op in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @hypothesis.given(case=op.as_strategy(), valid=st.sampled_from([None, "0-res-demo", "1-res-demo", "0-att-demo"]))
        def run(case, valid):
            nonlocal sent
            if valid is not None and isinstance(case.body, dict):
                steer_towards_valid(case.body, valid)
            case.headers = {**(case.headers or {}), "X-SECRET-KEY": SECRET}
            resp = case.call(base_url=serve_app, timeout=60)
            sent += 1
            statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                failures.append(f"{op.label} -> {resp.status_code} {resp.text[:200]} for {case.body!r:.300}")
                return
            try:
                case.validate_response(resp, checks=[schemathesis.checks.response_schema_conformance,
                                                     schemathesis.checks.status_code_conformance,
                                                     schemathesis.checks.content_type_conformance])
            except Exception as e:  # collect, so one run reports every kind of mismatch
                failures.append(f"{op.label} -> {resp.status_code}: {str(e)[:300]}")

        run()

    print(f"fuzz: {sent} requests, statuses {dict(statuses)}")
    assert not failures, "\n".join(failures[:20])
    assert sent >= 500
