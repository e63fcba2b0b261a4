"""Request body size and per-request time limits, enforced before and around the route.

Both answer in the one error shape: 413 for a body over ``max_body_bytes`` (checked from Content-Length
before anything is read, and counted while reading when there is none), 503 + Retry-After when a request
runs past ``request_timeout_s`` -- answered, never hung.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from . import state


class _BodyTooLarge(Exception):
    pass


class LimitsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes, timeout = state.current.max_body_bytes, state.current.request_timeout_s
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await self._too_large(scope, receive, send, max_bytes)

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_bytes:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await asyncio.wait_for(self.app(scope, counting_receive, tracking_send), timeout)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send, max_bytes)
        except asyncio.TimeoutError:
            if not started:
                resp = error_response(f"The request took longer than {timeout:g} s; the server is busy, retry shortly", 503)
                await resp(scope, receive, send)

    @staticmethod
    async def _too_large(scope, receive, send, max_bytes: int) -> None:
        resp = error_response(f"Request body too large: the limit is {max_bytes} bytes", 413)
        await resp(scope, receive, send)
