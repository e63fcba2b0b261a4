"""The one exception type the engine raises for a request it cannot serve as asked."""

from __future__ import annotations

from ..transport import grpc_status, is_grpc_unavailable


class RequestError(Exception):
    """Bad input: becomes ``{"error": message}`` with a 4xx status at the ingress."""

    extra: dict = {}  # more fields of the error body (Busy's ``busy: true``)

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):  # survives pickling across Ray with its status
        return (RequestError, (self.message, self.status))


class Overloaded(RequestError):
    """Out of memory or queue full: the client may retry (503 + Retry-After)."""

    def __init__(self, message: str = "The server is busy; retry shortly", status: int = 503):
        super().__init__(message, status)

    def __reduce__(self):
        return (Overloaded, (self.message, self.status))


class Busy(RequestError):
    """The model is busy and the caller asked not to wait (lens/prompt's ``fail_if_busy``): 429 ``busy: true``, so
    a client with several servers tries another one."""

    extra = {"busy": True}

    def __init__(self, message: str = "Server is busy with another request", status: int = 429):
        super().__init__(message, status)

    def __reduce__(self):
        return (Busy, (self.message, self.status))


# Ray's errors for a replica that died, a queue that is full or a call cut short: the next try may succeed.
_RAY_UNAVAILABLE = {
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "BackPressureError", "DeploymentUnavailableError",
    "GetTimeoutError", "TaskCancelledError", "RequestCancelledError", "ObjectLostError", "WorkerCrashedError",
}


def is_ray_unavailable(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith("ray.") and type(e).__name__ in _RAY_UNAVAILABLE


def unwrap_remote_error(e: BaseException | None) -> RequestError | None:
    """The RequestError a replica raised, if that is what this (Ray-wrapped) exception carries. Ray re-raises a
    replica's exception as a subclass of its type whose ``cause`` is the original: prefer the original."""
    found, seen = None, 0
    while e is not None and seen < 8:
        if isinstance(e, RequestError):
            if type(e) in (RequestError, Overloaded, Busy):
                return e
            found = found or e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return found


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA or otherwise), by name: this module imports no torch."""
    return "OutOfMemory" in type(e).__name__ or "out of memory" in str(e).lower()


def translate_remote_error(e: BaseException) -> BaseException:
    """The one translation of what a handle call raised: the replica's RequestError as it was raised (with its
    status), an unavailable replica, a full queue or a gRPC call cut short as Overloaded (503: retry), out of memory
    as Overloaded, and anything else unchanged (a bug: 500)."""
    inner = unwrap_remote_error(e)
    if inner is not None:
        return inner
    if is_ray_unavailable(e):
        return Overloaded(f"The server is busy ({type(e).__name__}); retry shortly")
    if is_grpc_unavailable(e):  # a call between replicas over gRPC (deployments.transport) that failed on the way
        return Overloaded(f"The server is busy (gRPC {grpc_status(e)}); retry shortly")
    if is_out_of_memory(e):
        return Overloaded("Out of memory while serving this request; retry shortly")
    return e
