"""The steering methods: their names and properties, defined once, torch-free.

The wire enum (``ingress.schemas.SteerMethod``), ``/v1/capabilities``' ``steer_methods``, the numeric checks of
``deployments.steer_vectors`` and the tests derive from ``REGISTRY``. The torch functions live in
``deployments.engine.steering``, which binds one to each name with ``bind`` (the ingress never imports torch).

Adding a method: an entry here, its function (and slot-table term) in ``engine/steering.py``; ``bind`` refuses an
engine that lacks one, and ``tests/ingress/test_steer_registry.py`` checks that everything else agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, TypeVar


@dataclass(frozen=True)
class SteerMethodSpec:
    name: str  # the wire value of ``steer_method``
    needs_direction: bool  # projects on v (only its direction matters): the zero vector is refused
    summary: str  # what it does to the activations h, for documentation

    @property
    def adds_vector(self) -> bool:
        """Adds ``coeff * v`` to h: the product must stay within float32."""
        return not self.needs_direction


REGISTRY: tuple[SteerMethodSpec, ...] = (
    SteerMethodSpec("SIMPLE_ADDITIVE", False, "h <- h + coeff * v"),
    SteerMethodSpec("ORTHOGONAL_DECOMP", True, "h <- (I - P) h + coeff * P h,  P = v v^T / |v|^2"),
    SteerMethodSpec("PROJECTION_CAP", True, "the component of h along v / |v| is capped at coeff"),
)

BY_NAME: dict[str, SteerMethodSpec] = {m.name: m for m in REGISTRY}
METHODS: tuple[str, ...] = tuple(BY_NAME)
DEFAULT = METHODS[0]


def spec(name: str) -> SteerMethodSpec:
    """The method called ``name``; ``KeyError`` if none is."""
    return BY_NAME[name]


# Names that code refers to directly (the engine's slot tables, defaults); a KeyError here if one is dropped.
SIMPLE_ADDITIVE = spec("SIMPLE_ADDITIVE").name
ORTHOGONAL_DECOMP = spec("ORTHOGONAL_DECOMP").name
PROJECTION_CAP = spec("PROJECTION_CAP").name


T = TypeVar("T")


def bind(impls: Mapping[str, T], what: str) -> dict[str, T]:
    """``impls`` (one entry per method name) checked to cover the registry exactly, in registry order.

    Called at import by the engine for its functions: a method registered without one, or one bound to a name that
    is not registered, fails there and then, not at the first request that asks for it."""
    missing = [m for m in METHODS if m not in impls]
    unknown = [m for m in impls if m not in BY_NAME]
    if missing or unknown:
        raise RuntimeError(f"{what}: every steering method needs exactly one entry; missing {missing}, "
                           f"not registered {unknown}")
    return {m: impls[m] for m in METHODS}
