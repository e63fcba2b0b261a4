"""How the request path's replicas call each other (AppArgs ``batching.grpc_calls`` and ``grpc_max_bytes``).

Serve sends a handle call either as a Ray actor call (``_by_reference=True``: arguments over 100 kB go through the
object store) or over the gRPC server that every replica runs for calls between deployments
(``_by_reference=False``: the arguments pickled into the message). On 2 CPUs (``python -m
benchmarks.transport_bench``, benchmarks/README.md) gRPC took about half the CPU and half the latency of an actor
call for payloads up to 1 MB, the two were even near 4 MB, and from 16 MB on the object store cost a fraction of
gRPC's copies. So small calls go over gRPC and a ModelDeployment to SAEShard call whose activations are large goes
by reference.

Serve's throughput-optimised mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED``) makes gRPC the default only for handles
created in a process that runs in that mode. The app's handles are created by ``build_app`` in the driver and
handed to the replicas, so they keep the driver's default (actor calls) unless a replica asks, as it does here.
Streams (steering, lens) stay on actor calls, as do the handle calls of Ray jobs: a driver's synchronous
``.result()`` needs them.

activation/all's two hot calls leave Serve's handles altogether once Serve has routed one (deployments.direct); what
is here applies to the first of them, to any a direct lane drops, and to every other call.

Nothing here imports Ray or torch.
"""

from __future__ import annotations

import collections
import logging
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger("saeserve.transport")

T = TypeVar("T")

# gRPC status codes (by name) of a call that may succeed when tried again: the replica went away, the call was cut
# short, or the channel was busy.
_RETRYABLE = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED"}


def grpc_status(e: BaseException) -> str | None:
    """The gRPC status code's name of a failed gRPC call (``grpc.aio.AioRpcError``, by duck type: this module
    imports no grpc), else None."""
    if not (type(e).__module__ or "").startswith("grpc"):
        return None
    code = getattr(e, "code", None)
    try:
        return getattr(code(), "name", None) if callable(code) else None
    except Exception:
        return None


def is_grpc_unavailable(e: BaseException) -> bool:
    """A gRPC call that failed on the way (not in the replica's code, whose errors come back as Ray's): the next
    try may succeed."""
    return grpc_status(e) in _RETRYABLE


# Calls sent again by reference after gRPC refused them for their size, per method (this process's).
RESENT: collections.Counter = collections.Counter()


def resent() -> dict[str, int]:
    """:data:`RESENT` so far. A replica class reads it through this function: Serve pickles a deployment's class by
    value, with a copy of each module global its methods name, but a function of an importable module by name."""
    return dict(RESENT)


async def send(over_grpc_call: Callable[[], Awaitable[T]], by_reference_call: Callable[[], Awaitable[T]],
               method: str = "call") -> T:
    """``await over_grpc_call()``; a message gRPC refused for its size (``RESOURCE_EXHAUSTED``: over the replicas'
    ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``, which the app's replica environment raises to gRPC's largest)
    goes again by reference, so a replica environment without that setting costs a second try, not the request."""
    try:
        return await over_grpc_call()
    except Exception as e:
        if grpc_status(e) != "RESOURCE_EXHAUSTED":
            raise
        RESENT[method] += 1
        log.warning("%s over gRPC was too large (%s): sent again through Ray's object store; set "
                    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in the replicas' environment to avoid the second try",
                    method, e)
        return await by_reference_call()


class Handle:
    """A DeploymentHandle with both transports. ``h.method.remote(...)`` goes over gRPC (``grpc`` on), and again by
    reference if gRPC refuses the message for its size (:func:`send`); ``h.by_reference`` is the plain handle, for
    streams and large payloads. ``options(...)`` applies to both, as a DeploymentHandle's does."""

    def __init__(self, handle, grpc: bool = True):
        self.by_reference = handle
        self.grpc = handle.options(_by_reference=False) if grpc else None

    def options(self, **kwargs) -> "Handle":
        h = Handle.__new__(Handle)
        h.by_reference = self.by_reference.options(**kwargs)
        h.grpc = self.grpc.options(**kwargs) if self.grpc is not None else None
        return h

    def __getattr__(self, method: str) -> "_Method":
        if method.startswith("_"):
            raise AttributeError(method)
        return _Method(self, method)


class _Method:
    def __init__(self, handle: Handle, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs) -> Awaitable:
        by_reference = getattr(self.handle.by_reference, self.name)
        if self.handle.grpc is None:
            return by_reference.remote(*args, **kwargs)
        over_grpc = getattr(self.handle.grpc, self.name)
        return send(lambda: over_grpc.remote(*args, **kwargs), lambda: by_reference.remote(*args, **kwargs), self.name)


def payload_bytes(arrays) -> int:
    """Bytes of the arrays (anything with ``nbytes``; None skipped) a call would carry."""
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)
