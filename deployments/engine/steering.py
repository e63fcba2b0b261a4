"""Steering: the three methods as pure torch functions, and TransformerLens hooks that apply them per batch row.

Every function takes activations ``h`` of shape ``[batch, pos, d]`` and, per row, one vector ``v [batch, d]``, a
coefficient ``coeff [batch]`` and an ``active [batch]`` flag (rows without steering are returned bit for bit
unchanged), plus an optional ``positions [batch, pos]`` mask of the positions to steer.

- ``SIMPLE_ADDITIVE``   h <- h + coeff * v
- ``ORTHOGONAL_DECOMP`` h <- (I - P) h + coeff * P h,  P = v v^T / |v|^2
- ``PROJECTION_CAP``    h <- h - max(0, h.v_hat - coeff) * v_hat   (the component along v_hat is capped at coeff)

Per-row reductions are ``(h * v).sum(-1)``: a row's result never depends on the other rows of its batch.
Each steering vector is applied once, at its own hook; several vectors at one hook are applied in request order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..protocol import ORTHOGONAL_DECOMP, PROJECTION_CAP, SIMPLE_ADDITIVE, SteerVector


def _expand(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.to(h.dtype).view(x.shape[0], *([1] * (h.dim() - 1)))


def additive(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    return h + _expand(h, coeff) * v.to(h.dtype)[:, None, :]


def orthogonal_decomp(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """(I - P) h + coeff P h = h + (coeff - 1) P h, with P the projector onto span(v)."""
    v = v.to(h.dtype)
    vv = (v * v).sum(-1)  # [batch]
    proj = (h * v[:, None, :]).sum(-1, keepdim=True) / vv[:, None, None]  # [batch, pos, 1]
    ph = proj * v[:, None, :]
    return h - ph + _expand(h, coeff) * ph


def projection_cap(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    v = v.to(h.dtype)
    unit = v / v.norm(dim=-1, keepdim=True)
    comp = (h * unit[:, None, :]).sum(-1, keepdim=True)  # [batch, pos, 1]
    excess = torch.clamp(comp - _expand(h, coeff), min=0)
    return h - excess * unit[:, None, :]


_FUNCS: dict[str, Callable] = {SIMPLE_ADDITIVE: additive, ORTHOGONAL_DECOMP: orthogonal_decomp, PROJECTION_CAP: projection_cap}


def apply(h: torch.Tensor, method: str, v: torch.Tensor, coeff: torch.Tensor, active: Optional[torch.Tensor] = None,
          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``h`` steered with ``method`` on the rows in ``active`` and the positions in ``positions``; the rest unchanged."""
    out = _FUNCS[method](h, v, coeff)
    keep = None
    if active is not None:
        keep = active.view(-1, 1).expand(h.shape[0], h.shape[1])
    if positions is not None:
        keep = positions if keep is None else keep & positions
    if keep is None:
        return out
    return torch.where(keep[..., None], out, h)


@dataclass
class _Slot:
    """The k-th vector at one hook, for every row of a batch (rows without one are inactive)."""

    method: list[Optional[str]]
    vectors: torch.Tensor  # [batch, d]
    coeff: torch.Tensor  # [batch]


class BatchSteering:
    """Hook functions for a batch whose row ``i`` is steered by ``rows[i]`` (a list of SteerVectors, maybe empty).

    ``positions`` (``[batch, pos]`` bool, or None for every position) is read at call time, so the generation loop
    sets it before each forward pass (e.g. to skip special tokens when ``steer_special_tokens`` is false).
    """

    def __init__(self, rows: list[list[SteerVector]], device="cpu", dtype=torch.float32):
        self.n = len(rows)
        self.positions: Optional[torch.Tensor] = None
        per_hook: dict[str, list[list[Optional[SteerVector]]]] = {}
        for i, vecs in enumerate(rows):
            counts: dict[str, int] = {}
            for sv in vecs:
                k = counts.get(sv.hook, 0)
                counts[sv.hook] = k + 1
                slots = per_hook.setdefault(sv.hook, [])
                while len(slots) <= k:
                    slots.append([None] * self.n)
                slots[k][i] = sv
        self.slots: dict[str, list[_Slot]] = {}
        for hook, slots in per_hook.items():
            built = []
            for slot in slots:
                d = next(sv.vector.shape[-1] for sv in slot if sv is not None)
                vecs = torch.zeros(self.n, d, dtype=dtype)
                coeff = torch.zeros(self.n, dtype=dtype)
                for i, sv in enumerate(slot):
                    if sv is not None:
                        vecs[i] = torch.as_tensor(sv.vector, dtype=dtype)
                        coeff[i] = sv.coeff
                built.append(_Slot([sv.method if sv else None for sv in slot], vecs.to(device), coeff.to(device)))
            self.slots[hook] = built

    def select(self, rows: list[int]) -> "BatchSteering":
        """The same steering for a subset (or a re-ordering) of the rows."""
        out = object.__new__(BatchSteering)
        out.n = len(rows)
        out.positions = None
        idx = torch.tensor(rows, dtype=torch.long)
        out.slots = {h: [_Slot([s.method[r] for r in rows], s.vectors[idx.to(s.vectors.device)], s.coeff[idx.to(s.coeff.device)])
                         for s in slots] for h, slots in self.slots.items()}
        return out

    def hook_fn(self, hook_name: str):
        slots = self.slots[hook_name]

        def fn(act: torch.Tensor, hook=None) -> torch.Tensor:
            shape = act.shape
            h = act.reshape(shape[0], shape[1], -1)  # hook_z etc.: [batch, pos, head, d_head] -> [batch, pos, head*d_head]
            pos = self.positions
            if pos is not None:
                pos = pos.to(h.device)
            for s in slots:
                for method in dict.fromkeys(m for m in s.method if m is not None):
                    active = torch.tensor([m == method for m in s.method], device=h.device)
                    h = apply(h, method, s.vectors, s.coeff, active, pos)
            return h.reshape(shape)

        return fn

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self.hook_fn(name)) for name in self.slots]
