"""Per-area request handlers: validate -> backend calls -> reply models. One object per area, one method per
endpoint (``ingress.endpoints`` names them)."""

from __future__ import annotations

from ..backend import Backend
from .activation import ActivationHandler
from .legacy import LegacyHandler
from .lens import LensHandler
from .steer import SteerHandler
from .util import UtilHandler


class Handlers:
    def __init__(self, backend: Backend, routes: list[str]):
        self.activation = ActivationHandler(backend)
        self.util = UtilHandler(backend, routes)
        self.steer = SteerHandler(backend)
        self.lens = LensHandler(backend)
        self.legacy = LegacyHandler(backend, self.activation, self.util, self.steer)

    def method(self, handler: str):
        """``"activation.all"`` -> the bound method."""
        area, _, name = handler.partition(".")
        return getattr(getattr(self, area), name)


__all__ = ["ActivationHandler", "Handlers", "LegacyHandler", "LensHandler", "SteerHandler", "UtilHandler"]
