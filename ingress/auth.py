"""X-SECRET-KEY auth, checked before any body is read, compared in constant time. A plain ASGI middleware (no
per-request task or response wrapping: it runs on every request)."""

from __future__ import annotations

import hmac
from typing import Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from . import state
from .endpoints import BODY_SECRET_PATHS, PUBLIC_PATHS
from .errors import error_response

AUTH_ERROR = "Invalid or missing X-SECRET-KEY header"


def secret_matches(given: Optional[str], secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


class AuthMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        secret = state.current.secret
        if scope["type"] == "http" and secret:
            path = scope.get("path", "")
            if path not in PUBLIC_PATHS and path not in BODY_SECRET_PATHS:
                given = next((v for k, v in scope.get("headers") or () if k == b"x-secret-key"), None)
                if given is None or not hmac.compare_digest(given, secret.encode()):
                    return await error_response(AUTH_ERROR, 401)(scope, receive, send)
        await self.app(scope, receive, send)
