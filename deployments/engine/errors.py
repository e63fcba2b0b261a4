"""The one exception type the engine raises for a request it cannot serve as asked."""

from __future__ import annotations


class RequestError(Exception):
    """Bad input: becomes ``{"error": message}`` with a 4xx status at the ingress."""

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
