"""Per-area request handlers: validate -> backend calls -> reply models. One object per area, one method per
endpoint (``ingress.endpoints`` names them)."""

from __future__ import annotations

from ..backend import Backend
from ..dialects import V1, Dialect
from .activation import ActivationHandler
from .legacy import LegacyHandler
from .lens import LensHandler
from .steer import SteerHandler
from .util import UtilHandler


class Handlers:
    """One set per wire dialect (``ingress.dialects``): the same code, reading that dialect's behaviour flags."""

    def __init__(self, backend: Backend, routes: list[str], dialect: Dialect = V1):
        self.activation = ActivationHandler(backend, dialect)
        self.util = UtilHandler(backend, routes, dialect)
        self.steer = SteerHandler(backend, dialect)
        self.lens = LensHandler(backend, dialect)
        self.legacy = LegacyHandler(backend, self.activation, self.util, self.steer)

    def method(self, handler: str):
        """``"activation.all"`` -> the bound method."""
        area, _, name = handler.partition(".")
        return getattr(getattr(self, area), name)


__all__ = ["ActivationHandler", "Handlers", "LegacyHandler", "LensHandler", "SteerHandler", "UtilHandler"]
