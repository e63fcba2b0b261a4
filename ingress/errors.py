"""One error shape for every failure: ``{"error": "<message a person can act on>"}``, always JSON.

A message may quote what the client sent (an SAE id, an index), and what a client sends may hold anything JSON can
escape, lone UTF-16 surrogates included, which no UTF-8 encoder takes: error bodies are rendered by
:class:`ErrorJSONResponse`, which writes such code points as the text ``\\udXXX``, so rendering an error can never
itself fail (and turn into the server's text/plain 500).
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine.errors import RequestError, is_ray_unavailable

from .schemas import INVALID_UNICODE

log = logging.getLogger("saeserve.ingress")

RETRY_AFTER_S = "5"
MAX_QUOTED_CHARS = 200  # a value quoted in an error is cut to this many characters

# For OpenAPI: every route may answer with the error shape.
ERROR_RESPONSES = {
    400: {"description": "Bad input", "content": {"application/json": {"example": {"error": "Invalid SAE ID or type: 99-res-demo"}}}},
    401: {"description": "Missing or wrong X-SECRET-KEY", "content": {"application/json": {"example": {"error": "Invalid or missing X-SECRET-KEY header"}}}},
    503: {"description": "Overloaded or not ready; retry after Retry-After seconds"},
}


def _printable(x):
    """``x`` with every string made encodable as UTF-8 (a lone surrogate becomes the six characters ``\\ud800``)."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
            return x
        except UnicodeEncodeError:
            return x.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(x, dict):
        return {_printable(k): _printable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_printable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class ErrorJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(_printable(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def error_response(message: str, status: int, extra: dict | None = None) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return ErrorJSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)


def quoted(value, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a client may send megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_validation(errors: list[dict], total: int) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {total - len(parts)} more)" if total > len(parts) else ""
    return "Invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return error_response(e.message, e.status, e.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        # Never echo inputs back: a body may carry a secret. At most 20 entries: a list of a million bad numbers
        # makes a million errors.
        errors = e.errors()
        detail = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in errors[:20]]
        if errors and all(err.get("type") == INVALID_UNICODE for err in errors):
            # Well-formed JSON of the right types whose text no tokenizer can take: bad input, not a schema mismatch.
            return error_response(_describe_validation(detail, len(errors)), 400)
        return ErrorJSONResponse({"error": _describe_validation(detail, len(errors)), "detail": detail}, status_code=422)

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
