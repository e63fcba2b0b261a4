"""HTTP routes: parse, call the service, shape the reply. One module per area."""

from __future__ import annotations

from typing import Optional

from ..service import SAEService


class _Current:
    """The replica's service and secret. Ray Serve runs a pickled copy of the FastAPI app, so
    ``app.state`` set in the deployment's ``__init__`` is not the one requests see; this module is."""

    service: Optional[SAEService] = None
    secret: Optional[str] = None
    max_body_bytes: int = 4 << 20
    request_timeout_s: float = 300.0


current = _Current()


def service() -> SAEService:
    return current.service


def install(svc: SAEService) -> None:
    """Called by the ingress replica's constructor. A function, not attribute assignment there: Ray
    pickles the deployment class by value, and with it any module object its methods reference."""
    current.service = svc
    current.secret = svc.secret
    current.max_body_bytes = svc.args.max_body_bytes
    current.request_timeout_s = svc.args.request_timeout_s
