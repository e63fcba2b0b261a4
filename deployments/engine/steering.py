"""Steering: the three methods as pure torch functions, and per-slot steering tables for the generation engine.

Every function takes activations ``h`` of shape ``[batch, pos, d]`` and, per row, one vector ``v [batch, d]``, a
coefficient ``coeff [batch]`` and an ``active [batch]`` flag (rows without steering are returned bit for bit
unchanged), plus an optional ``positions [batch, pos]`` mask of the positions to steer.

- ``SIMPLE_ADDITIVE``   h <- h + coeff * v
- ``ORTHOGONAL_DECOMP`` h <- (I - P) h + coeff * P h,  P = v v^T / |v|^2
- ``PROJECTION_CAP``    h <- h - max(0, h.v_hat - coeff) * v_hat   (the component along v_hat is capped at coeff)

The arithmetic is float32 whatever the model's dtype (a float16 coefficient above 65504 would be inf, bfloat16
would round it by ~0.4% and run the projections at 8 bits of mantissa); the result is cast back to the
activations' dtype. Per-row reductions are ``(h * v).sum(-1)``: a row's result never depends on the other rows of
its batch. Each steering vector is applied once, at its own hook; several vectors at one hook are applied in
request order.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..protocol import ORTHOGONAL_DECOMP, PROJECTION_CAP, SIMPLE_ADDITIVE, SteerVector

def _expand(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.to(h.dtype).view(x.shape[0], *([1] * (h.dim() - 1)))


def _f32(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype in (torch.float32, torch.float64) else h.float()


def additive(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    x = _f32(h)
    return (x + _expand(x, coeff) * v.to(x.dtype)[:, None, :]).to(h.dtype)


def orthogonal_decomp(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """(I - P) h + coeff P h = h + (coeff - 1) P h, with P the projector onto span(v)."""
    x = _f32(h)
    v = v.to(x.dtype)
    vv = (v * v).sum(-1)  # [batch]
    proj = (x * v[:, None, :]).sum(-1, keepdim=True) / vv[:, None, None]  # [batch, pos, 1]
    ph = proj * v[:, None, :]
    return (x - ph + _expand(x, coeff) * ph).to(h.dtype)


def projection_cap(h: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    x = _f32(h)
    v = v.to(x.dtype)
    unit = v / v.norm(dim=-1, keepdim=True)
    comp = (x * unit[:, None, :]).sum(-1, keepdim=True)  # [batch, pos, 1]
    excess = torch.clamp(comp - _expand(x, coeff), min=0)
    return (x - excess * unit[:, None, :]).to(h.dtype)


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


# --- per-slot tables for the generation engine ------------------------------------------------------------------

_CODE = {SIMPLE_ADDITIVE: 1, ORTHOGONAL_DECOMP: 2, PROJECTION_CAP: 3}


class _Layer:
    """The k-th vector at one hook for every slot: its method code (0 = none), the additive term ``coeff * v``, the
    unit direction (projection methods) and the coefficient, all float32."""

    def __init__(self, n: int, d: int, device):
        self.code = torch.zeros(n, dtype=torch.long, device=device)
        self.add = torch.zeros(n, d, dtype=torch.float32, device=device)
        self.unit = torch.zeros(n, d, dtype=torch.float32, device=device)
        self.coeff = torch.zeros(n, dtype=torch.float32, device=device)
        self.users = [0, 0, 0, 0]  # slots per method code (host side: which terms a batch needs)

    def tensors(self):
        return (self.code, self.add, self.unit, self.coeff)

    def grow(self, n: int) -> None:
        for name in ("code", "add", "unit", "coeff"):
            t = getattr(self, name)
            new = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
            new[: t.shape[0]] = t
            setattr(self, name, new)


class SlotSteering:
    """Steering vectors per engine slot, applied as one batched update per hook (no hooks added to the model).

    ``set_row(slot, vectors)`` when a row joins, ``clear_row`` when it leaves, ``move_row`` when the engine packs
    its slots. ``apply(name, h, rows, positions, bad)`` steers activations ``h [batch, pos, ...]`` of the slots
    ``rows`` (a slice or index tensor) at the positions in ``positions [batch, pos]`` (None: all), and records in
    ``bad [batch]`` (0 = fine) the 1-based id of the first hook whose steered output is not finite.
    """

    def __init__(self, n_slots: int, widths: dict[str, int], device):
        self.n = n_slots
        self.widths = widths
        self.device = device
        self.layers: dict[str, list[_Layer]] = {}
        self.hook_ids: dict[str, int] = {}
        self.rows_at: dict[str, int] = {}  # hook -> slots steered there
        self._placed: dict[int, list[tuple[str, int, int]]] = {}

    @property
    def active_hooks(self) -> set[str]:
        return {h for h, n in self.rows_at.items() if n > 0}

    def hook_name(self, hook_id: int) -> str:
        return next(h for h, i in self.hook_ids.items() if i == hook_id)

    def grow(self, n_slots: int) -> None:
        for layers in self.layers.values():
            for layer in layers:
                layer.grow(n_slots)
        self.n = n_slots

    def set_row(self, slot: int, vectors: list[SteerVector]) -> None:
        self.clear_row(slot)
        k_at: dict[str, int] = {}
        placed: list[tuple[str, int, int]] = []  # (hook, k, method code), kept on the host
        for sv in vectors:
            k = k_at.get(sv.hook, 0)
            k_at[sv.hook] = k + 1
            layers = self.layers.setdefault(sv.hook, [])
            self.hook_ids.setdefault(sv.hook, len(self.hook_ids) + 1)
            while len(layers) <= k:
                layers.append(_Layer(self.n, self.widths[sv.hook], self.device))
            layer = layers[k]
            code = _CODE[sv.method]
            v = np.asarray(sv.vector, dtype=np.float64).reshape(-1)
            if code == 1:
                layer.add[slot] = torch.as_tensor((sv.coeff * v).astype(np.float32), device=self.device)
            else:  # the unit direction in float64: a tiny vector's |v|^2 would underflow in float32
                layer.unit[slot] = torch.as_tensor((v / np.linalg.norm(v)).astype(np.float32), device=self.device)
                layer.coeff[slot] = float(np.float32(sv.coeff))
            layer.code[slot] = code
            layer.users[code] += 1
            placed.append((sv.hook, k, code))
        for h in dict.fromkeys(h for h, _, _ in placed):
            self.rows_at[h] = self.rows_at.get(h, 0) + 1
        if placed:
            self._placed[slot] = placed

    def clear_row(self, slot: int) -> None:
        placed = self._placed.pop(slot, None)
        if not placed:
            return
        for h in dict.fromkeys(h for h, _, _ in placed):
            self.rows_at[h] -= 1
        for h, k, code in placed:
            layer = self.layers[h][k]
            layer.users[code] -= 1
            for t in layer.tensors():
                t[slot] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Slot ``dst`` (free) takes over ``src``'s vectors; ``src`` becomes free."""
        placed = self._placed.pop(src, None)
        if not placed:
            return
        for h, k, _ in placed:
            for t in self.layers[h][k].tensors():
                t[dst] = t[src]
                t[src] = 0
        self._placed[dst] = placed

    def hooks_of(self, slot: int) -> list[str]:
        return list(dict.fromkeys(h for h, _, _ in self._placed.get(slot, [])))

    def apply(self, name: str, h: torch.Tensor, rows, positions: Optional[torch.Tensor], bad: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(shape[0], shape[1], -1)  # hook_z etc.: [batch, pos, head, d_head] -> [batch, pos, head*d_head]
        xf = _f32(x)
        steered = None
        for layer in self.layers[name]:
            if not any(layer.users[1:]):
                continue
            code = layer.code[rows]
            on = code != 0
            delta = layer.add[rows][:, None, :]  # coeff * v on additive rows, 0 elsewhere
            if layer.users[2] or layer.users[3]:
                unit = layer.unit[rows][:, None, :]  # 0 on additive rows
                c = layer.coeff[rows][:, None]
                comp = (xf * unit).sum(-1)  # [batch, pos]: the component along the unit direction
                g = torch.where(code[:, None] == 2, (c - 1) * comp,
                                torch.where(code[:, None] == 3, -torch.clamp(comp - c, min=0), torch.zeros_like(comp)))
                delta = delta + g[..., None] * unit
            keep = on[:, None].expand(shape[0], shape[1])
            if positions is not None:
                keep = keep & positions
            xf = torch.where(keep[..., None], xf + delta, xf)
            steered = on if steered is None else steered | on
        if steered is None:
            return h
        out = xf.to(h.dtype)
        broken = steered & ~torch.isfinite(out).flatten(1).all(-1)
        bad.copy_(torch.where((bad == 0) & broken, torch.full_like(bad, self.hook_ids[name]), bad))
        return out.reshape(shape)
