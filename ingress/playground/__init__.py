"""The playground: one static page at ``/`` (``index.html`` beside this file: inline JS and CSS, no build step).

Public (``endpoints.PUBLIC_PATHS``): the page holds no data, and every API call it makes carries the secret the
person types. Its Content-Security-Policy lets it reach nothing but this server's own API, so it works offline and
cannot be made to load anything else.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi.responses import HTMLResponse

PATH = "/"
PAGE = Path(__file__).with_name("index.html")

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def _html() -> str:
    return PAGE.read_text(encoding="utf-8")


async def page() -> HTMLResponse:
    return HTMLResponse(_html(), headers=HEADERS)
