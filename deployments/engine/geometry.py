"""Decoder geometry: cosine of a query against every decoder row, and feature vectors.

The unit-norm decoder is computed once per loaded SAE (``DecoderIndex``), never per request.
"""

from __future__ import annotations

import torch

from .errors import RequestError

MAX_COSSIM_RESULTS = 128


class DecoderIndex:
    """``W_dec`` rows normalised once, for cosine queries against the whole decoder."""

    def __init__(self, W_dec: torch.Tensor):
        with torch.no_grad():
            w = W_dec.detach().float()
            self.unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def top_cosine(self, query: torch.Tensor, num_results: int) -> tuple[list[int], list[float]]:
        q = query.detach().float().to(self.unit.device).reshape(-1)
        if q.shape[0] != self.unit.shape[1]:
            raise RequestError(f"vector has length {q.shape[0]} but this SAE's decoder rows have length {self.unit.shape[1]}")
        norm = q.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise RequestError("vector must be finite and non-zero to compare by cosine similarity")
        cos = self.unit @ (q / norm)
        cos = torch.where(torch.isfinite(cos), cos, torch.full_like(cos, -float("inf")))  # non-finite ranks lowest
        k = max(0, min(num_results, MAX_COSSIM_RESULTS, cos.shape[0]))
        order = torch.sort(cos, descending=True, stable=True).indices[:k]
        return order.tolist(), cos[order].tolist()


def encoder_vector(W_enc: torch.Tensor, index: int) -> list[float]:
    """``W_enc[:, index]`` (after folding): ``activation/single`` with it reproduces the feature's pre-activation."""
    return W_enc[:, index].detach().float().tolist()


def decoder_rows(W_dec: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return W_dec[indices].detach().float().cpu()
