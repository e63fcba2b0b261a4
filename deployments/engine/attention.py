"""activation/attention: one head's attention pattern as the sparse rows Neuronpedia's head view draws.

Neuronpedia's HeadVis pipeline stores each head's top sequences in this form, and its web app draws custom-text
attention with the same code, so the constants must stay the pipeline's: per query row the top
``min(TOPK_PER_ROW, seq)`` keys whose weight is at least ``THRESHOLD``, rounded to ``DECIMALS`` places, each as the
flat index ``q * seq + k``, sorted. ``max_activation`` leaves out row and column 0 (the attention sink at the first
position), which would otherwise set every head's colour scale.
"""

from __future__ import annotations

import numpy as np
import torch

from ..protocol import AttentionPattern

TOPK_PER_ROW = 8
THRESHOLD = 0.005
DECIMALS = 4


@torch.no_grad()
def sparse_pattern(pattern: np.ndarray | torch.Tensor) -> AttentionPattern:
    """A ``[query, key]`` attention pattern (one head of ``hook_pattern``) in the head view's sparse form."""
    p = torch.as_tensor(pattern).float()
    if p.dim() != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"expected a square [query, key] pattern, got shape {tuple(p.shape)}")
    seq = int(p.shape[0])
    if seq < 2:  # the pipeline stores nothing for a one-token sequence: its only weight is the sink
        return AttentionPattern(seq_len=seq, indices=[], values=[], max_activation=0.0)
    k = min(TOPK_PER_ROW, seq)
    vals, keys = torch.topk(p, k, dim=-1)  # [seq, k]
    rows = torch.arange(seq, device=p.device).unsqueeze(1).expand(-1, k)
    keep = vals >= THRESHOLD
    flat = (rows * seq + keys)[keep]
    kept = vals[keep]
    order = torch.argsort(flat)  # flat index order is (query, key) order
    flat, kept = flat[order].cpu().tolist(), kept[order].cpu().tolist()
    interior = p[1:, 1:]
    return AttentionPattern(seq_len=seq, indices=flat, values=[round(v, DECIMALS) for v in kept],
                            max_activation=round(float(interior.max()), DECIMALS))
