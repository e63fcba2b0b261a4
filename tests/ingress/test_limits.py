"""The size and time limits, on a bare FastAPI app (no Ray): answered in the error shape, never hung."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from ingress.errors import install_error_handlers
from ingress.limits import BodyMiddleware, LimitsMiddleware
from ingress.state import current


class Body(BaseModel):
    text: str


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(current, "max_body_bytes", 1024)
    monkeypatch.setattr(current, "request_timeout_s", 0.3)
    a = FastAPI()
    install_error_handlers(a)
    a.add_middleware(BodyMiddleware)
    a.add_middleware(LimitsMiddleware)

    @a.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    @a.post("/model")
    async def model(body: Body):
        return {"n": len(body.text)}

    @a.get("/slow")
    async def slow():
        await asyncio.sleep(5)
        return {"ok": True}

    return a


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_small_body_passes(app):
    async def go():
        async with await _client(app) as c:
            return await c.post("/echo", content=b"x" * 100)
    r = asyncio.run(go())
    assert r.status_code == 200 and r.json() == {"n": 100}


def test_large_body_is_413_from_content_length(app):
    async def go():
        async with await _client(app) as c:
            return await c.post("/echo", content=b"x" * 5000)
    r = asyncio.run(go())
    assert r.status_code == 413 and "1024 bytes" in r.json()["error"]


def test_large_chunked_body_is_413_while_reading(app):
    async def chunks():
        for _ in range(10):
            yield b"y" * 500

    async def go():
        async with await _client(app) as c:
            return await c.post("/echo", content=chunks())
    r = asyncio.run(go())
    assert r.status_code == 413


def test_large_chunked_body_is_413_for_a_model_route(app):
    """FastAPI reads a model route's body itself and turns any error while reading into its 400: the body is counted
    before the route, so the answer is the 413 (with the error shape)."""
    async def chunks():
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    async def small():
        yield b'{"text": "'
        yield b"y" * 500
        yield b'"}'

    async def go():
        async with await _client(app) as c:
            json_type = {"Content-Type": "application/json"}
            return (await c.post("/model", content=chunks(), headers=json_type),
                    await c.post("/model", content=small(), headers=json_type))
    big, ok = asyncio.run(go())
    assert big.status_code == 413, big.text
    assert big.json() == {"error": "Request body too large: the limit is 1024 bytes"}
    assert ok.status_code == 200 and ok.json() == {"n": 500}


def test_slow_request_is_answered_503_with_retry_after(app):
    async def go():
        async with await _client(app) as c:
            return await c.get("/slow")
    r = asyncio.run(go())
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert "longer than 0.3 s" in r.json()["error"]
