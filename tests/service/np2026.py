"""The 2026-08 Neuronpedia inference spec (``tests/data/neuronpedia-openapi-2026-08.json``: the ``openapi.json`` of
``hijohnnylin/neuronpedia`` at ebb8426f, ``apps/inference``, Apache-2.0), for validating requests and replies
with jsonschema, ``$ref``s resolved inside the spec."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "neuronpedia-openapi-2026-08.json"
URI = "urn:neuronpedia-inference-2026-08"


@lru_cache(maxsize=1)
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


@lru_cache(maxsize=1)
def _registry() -> Registry:
    return Registry().with_resource(URI, Resource.from_contents(spec(), default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@lru_cache(maxsize=None)
def _validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/{pointer}"}, registry=_registry())


def validate_request(path: str, body: dict, method: str = "post") -> None:
    _validator(_pointer("paths", path, method, "requestBody", "content", "application/json", "schema")).validate(body)


def validate_reply(path: str, status: int, body, method: str = "post") -> None:
    """A reply against the spec's schema for that path and status. The spec describes 200s and FastAPI's 422s;
    every other status is the wire's error shape, ``{"error": str}``."""
    responses = spec()["paths"][path][method]["responses"]
    if str(status) in responses and "application/json" in responses[str(status)].get("content", {}):
        _validator(_pointer("paths", path, method, "responses", str(status), "content", "application/json",
                            "schema")).validate(body)
    else:
        assert status >= 400 and isinstance(body, dict) and isinstance(body.get("error"), str), (status, body)


def schema(name: str) -> dict:
    return spec()["components"]["schemas"][name]
