"""One error shape for every failure: ``{"error": "<message a person can act on>"}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine.errors import RequestError, is_ray_unavailable

log = logging.getLogger("saeserve.ingress")

RETRY_AFTER_S = "5"

# For OpenAPI: every route may answer with the error shape.
ERROR_RESPONSES = {
    400: {"description": "Bad input", "content": {"application/json": {"example": {"error": "Invalid SAE ID or type: 99-res-demo"}}}},
    401: {"description": "Missing or wrong X-SECRET-KEY", "content": {"application/json": {"example": {"error": "Invalid or missing X-SECRET-KEY header"}}}},
    503: {"description": "Overloaded or not ready; retry after Retry-After seconds"},
}


def error_response(message: str, status: int, extra: dict | None = None) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return error_response(e.message, e.status, e.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        # Never echo inputs back: a body may carry a secret.
        detail = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()]
        return JSONResponse({"error": _describe_validation(detail), "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(str(e.detail), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        if is_ray_unavailable(e):
            log.warning("backend unavailable: %s", type(e).__name__)
            return error_response("A backend replica is unavailable; retry shortly", 503)
        log.exception("unhandled error")
        return error_response("Internal server error", 500)
