"""Decoder geometry: cosine of a query against every decoder row, and feature vectors.

The decoder's row norms are computed once per loaded SAE (``DecoderIndex``), never per request.
"""

from __future__ import annotations

import torch

from .errors import RequestError

MAX_COSSIM_RESULTS = 128


class DecoderIndex:
    """Cosine queries against every row of ``W_dec``, in float32.

    A float32 decoder is used in place (no copy): ``cos = (W_dec @ q) / |W_dec row| / |q|`` with the row norms
    kept as a ``[d_sae]`` vector. A bfloat16/float16 decoder is copied to float32 once: a product in half
    precision would round every cosine to 8 (bfloat16) or 11 (float16) bits, enough to reorder near-ties, and
    up-casting per request would copy the whole decoder per request. ``nbytes_for`` is what the index adds to
    its SAE's memory; the SAE shard counts it in the replica's byte budget from the moment the SAE loads.
    """

    def __init__(self, W_dec: torch.Tensor):
        with torch.no_grad():
            self.rows = W_dec.detach().float()  # the decoder itself when it is float32 (.float() is then a no-op)
            self.inv_norm = 1.0 / self.rows.norm(dim=1).clamp_min(1e-12)
        self.nbytes = self.nbytes_for(W_dec.shape[0], W_dec.shape[1], W_dec.dtype)

    @staticmethod
    def nbytes_for(d_sae: int, d_in: int, dtype: torch.dtype) -> int:
        """Bytes the index holds beyond the SAE's own weights, for a decoder of this shape and dtype."""
        copy = 0 if dtype == torch.float32 else d_sae * d_in * 4
        return copy + d_sae * 4  # + the row norms

    @torch.no_grad()
    def top_cosine(self, query: torch.Tensor, num_results: int) -> tuple[list[int], list[float]]:
        q = query.detach().to(device=self.rows.device, dtype=torch.float32).reshape(-1)
        if q.shape[0] != self.rows.shape[1]:
            raise RequestError(f"vector has length {q.shape[0]} but this SAE's decoder rows have length {self.rows.shape[1]}")
        norm = q.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise RequestError("vector must be finite and non-zero to compare by cosine similarity")
        cos = (self.rows @ (q / norm)) * self.inv_norm
        cos = torch.where(torch.isfinite(cos), cos, torch.full_like(cos, -float("inf")))  # non-finite ranks lowest
        k = max(0, min(num_results, MAX_COSSIM_RESULTS, cos.shape[0]))
        order = torch.sort(cos, descending=True, stable=True).indices[:k]
        return order.tolist(), cos[order].tolist()


def encoder_vector(W_enc: torch.Tensor, index: int) -> list[float]:
    """``W_enc[:, index]`` (after folding): ``activation/single`` with it reproduces the feature's pre-activation."""
    return W_enc[:, index].detach().float().tolist()


def decoder_rows(W_dec: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return W_dec[indices].detach().float().cpu()
