"""What the middleware needs before any route runs: the replica's ingress object and its limits.

Ray Serve runs a pickled copy of the FastAPI app in each replica (its route and middleware functions are pickled
by value, with copies of the objects they name), so ``app.state`` set in the deployment's ``__init__`` is not the one
requests see. A module is pickled by reference: code reads ``state.current`` at call time, and the replica's
constructor calls :func:`install`.
"""

from __future__ import annotations

from typing import Any, Optional


class ReplicaState:
    ingress: Any = None  # the SAEServeIngress instance of this replica
    secret: Optional[str] = None
    max_body_bytes: int = 4 << 20
    request_timeout_s: float = 300.0


current = ReplicaState()


def install(ingress, secret: Optional[str], max_body_bytes: int, request_timeout_s: float) -> None:
    """A function, not attribute assignment in the deployment: Ray pickles the deployment class by value, and
    with it any module object its methods reference."""
    current.ingress = ingress
    current.secret = secret
    current.max_body_bytes = max_body_bytes
    current.request_timeout_s = request_timeout_s
