"""Request body size and per-request time limits, enforced before and around the route.

Both answer in the one error shape. 413 for a body over ``max_body_bytes``: from Content-Length before anything is
read (:class:`LimitsMiddleware`, outermost), and counted while the body is read when there is none (chunked
transfer) or it understates (:class:`BodyMiddleware`, innermost: after auth, so an unauthenticated client never
makes us read a body). The body is read whole there, then replayed to the route: a cap hit while FastAPI itself
reads the body would be turned into its 400 "error parsing the body". 503 + Retry-After when a request runs past
``request_timeout_s`` -- answered, never hung.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from . import state


def _too_large(max_bytes: int):
    return error_response(f"Request body too large: the limit is {max_bytes} bytes", 413)


class LimitsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes, timeout = state.current.max_body_bytes, state.current.request_timeout_s
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await _too_large(max_bytes)(scope, receive, send)

        started = False

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), timeout)
        except asyncio.TimeoutError:
            if not started:
                resp = error_response(f"The request took longer than {timeout:g} s; the server is busy, retry shortly", 503)
                await resp(scope, receive, send)


class BodyMiddleware:
    """Reads the request body whole, counting its bytes (413 past ``max_body_bytes``), then hands the route the same
    body as one message. Later ``receive`` calls reach the server again (a streamed reply listens there for the
    client going away)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = state.current.max_body_bytes
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away while sending
                return
            body = msg.get("body", b"")
            seen += len(body)
            if seen > max_bytes:
                return await _too_large(max_bytes)(scope, receive, send)
            if body:
                chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replayed, send)
