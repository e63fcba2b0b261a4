"""Every error body is JSON in the one shape, also when the message quotes text no UTF-8 encoder takes (a lone
surrogate from a JSON escape), and invalid Unicode in a text field is a 400, not a schema 422. A bare FastAPI app
with the ingress's handlers and middleware (no Ray)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI

from deployments.engine.errors import RequestError
from ingress import schemas as S
from ingress.errors import install_error_handlers, quoted
from ingress.limits import BodyMiddleware, LimitsMiddleware


class Body(S.Wire):
    text: S.StrictStr
    n: S.Number = 0


@pytest.fixture(scope="module")
def app():
    a = FastAPI()
    install_error_handlers(a)
    a.add_middleware(BodyMiddleware)
    a.add_middleware(LimitsMiddleware)

    @a.post("/echo-error")
    async def echo_error(body: Body):
        raise RequestError(f"Invalid SAE ID or type: {body.text}")

    @a.post("/quote")
    async def quote(body: dict):
        raise RequestError(f"Unknown source {body['source']}")  # a handler that quotes raw input

    @a.post("/crash")
    async def crash():
        raise RuntimeError("\ud800 boom")

    return a


def post(app, path, raw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as c:
            content = raw.encode() if isinstance(raw, str) else raw
            return await c.post(path, content=content, headers={"Content-Type": "application/json"})
    return asyncio.run(go())


def test_invalid_unicode_in_a_text_field_is_a_400(app):
    r = post(app, "/echo-error", '{"text": "ab\\ud800"}')
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "text: text is not valid Unicode: a lone UTF-16 surrogate (U+D800) at character 2" in r.json()["error"]


def test_a_schema_error_beside_it_is_still_a_422(app):
    r = post(app, "/echo-error", '{"text": "\\ud800", "n": "seven"}')
    assert r.status_code == 422 and "error" in r.json() and r.json()["detail"]


def test_a_message_quoting_a_surrogate_is_still_json(app):
    r = post(app, "/quote", '{"source": "x\\udfffy"}')
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.content.decode("utf-8")) == {"error": "Unknown source x\\udfffy"}  # the escape, as text


def test_an_unhandled_error_is_a_json_500(app):
    r = post(app, "/crash", "{}")
    assert r.status_code == 500 and r.json() == {"error": "Internal server error"}


def test_unknown_route_and_bad_json_are_json(app):
    assert post(app, "/nowhere", "{}").json() == {"error": "Not Found"}
    r = post(app, "/echo-error", '{"text": ')
    assert r.status_code == 422 and "error" in r.json()
    r = post(app, "/echo-error", b'{"text": "\xff\xfe"}')  # not UTF-8
    assert r.status_code == 400 and "error" in r.json()


def test_quoted_cuts_long_values():
    assert quoted("x" * 1000).endswith("...") and len(quoted("x" * 1000)) == 200
    assert quoted(7) == "7"
