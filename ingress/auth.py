"""X-SECRET-KEY auth, checked before any body is read, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import FastAPI, Request

from .endpoints import BODY_SECRET_PATHS, PUBLIC_PATHS
from .errors import error_response
from . import state

AUTH_ERROR = "Invalid or missing X-SECRET-KEY header"


def secret_matches(given: Optional[str], secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def install_auth(app: FastAPI) -> None:
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        secret = state.current.secret
        path = request.url.path
        if secret and path not in PUBLIC_PATHS and path not in BODY_SECRET_PATHS:
            if not secret_matches(request.headers.get("x-secret-key"), secret):
                return error_response(AUTH_ERROR, 401)
        return await call_next(request)
