"""Error bounds for comparing a computation in float32, bfloat16 or float16 with float32 TransformerLens + SAE
Lens, derived from each dtype's machine epsilon (tests/engine/test_dtype_matrix.py, tests/gpu).

``eps`` is ``torch.finfo(dtype).eps`` (2**-23 float32, 2**-7 bfloat16, 2**-10 float16) and ``u = eps/2`` the unit
roundoff (the largest relative error of one rounding). ``U32 = 2**-24`` is float32's: products of half precision
inputs accumulate in float32 on the CPU (and on CUDA), so a length-``n`` dot product adds at most ``n * U32``
relative to the sum of its terms' magnitudes. Where an answer is a selection (top-k, ranking), values may be
within tolerance of each other and swap; ``check_selection`` then accepts any selection that is right up to the
tolerance.
"""

from __future__ import annotations

import math

import torch

from deployments.engine.loading import parse_dtype

U32 = 2.0**-24
SECOND_ORDER = 1.01  # the bounds below are first order in u; u**2 terms are < 1% of them for u <= 2**-8


def eps(dtype: str) -> float:
    return torch.finfo(parse_dtype(dtype)).eps


def unit_roundoff(dtype: str) -> float:
    return eps(dtype) / 2


def _blocks_before(hook: str) -> int:
    """How many transformer blocks a hook's value has passed through (hooks inside block L count L + 1)."""
    if not hook.startswith("blocks."):
        return 0
    layer = int(hook.split(".")[1])
    return layer if hook.endswith("hook_resid_pre") else layer + 1


def capture_tolerance(hook: str, dtype: str, widest: int = 512) -> float:
    """Relative to the position's largest |activation| (to 1 for attention probabilities).

    The weights are rounded once (u) and each block rounds its ~8 sequential results (layer norm, attention,
    softmax, MLP, the residual adds) once each; LayerNorm rescales, so errors do not shrink with depth. Measured
    here: 0.3 eps at the embedding, 1-3 eps after 1-4 blocks. Allowed: 2 eps for the input plus 2 eps per
    block. The float32 model differs from the reference only in the order of its float32 sums (another batch
    shape), a random walk of ~sqrt(n) roundings for a length-n reduction, n <= ``widest`` (the demo model's
    d_mlp): that term is sqrt(n) eps32 in the same units."""
    per_stage = eps(dtype) + math.sqrt(widest) * 2 * U32
    return (2 + 2 * _blocks_before(hook)) * per_stage


def encode_tolerance(ref_sae, x: torch.Tensor, dtype: str, partial_sum_roundings: int = 0) -> torch.Tensor:
    """Elementwise bound on |encode in dtype - float32 SAE Lens encode| for input ``x`` [seq, d_in].

    ``pre = (x - b_dec?) @ W_enc + b_enc`` then ReLU (1-Lipschitz). In the dtype: x is rounded (u |x|), the
    subtraction rounded (u), W_enc rounded once by the cast (u |W|; load_sae folds in float32 first), the matmul
    output rounded (u) after a float32 accumulation (n U32), b_enc rounded (u) and the add rounded (u). With
    S = |x - b_dec?| @ |W_enc| >= |x @ W_enc|: |error| <= (4u + n U32) S + 2u |b_enc|.

    ``partial_sum_roundings``: cuBLAS may split a half-precision product's reduction and round the partial sums
    to the dtype (torch's allow_bf16/fp16_reduced_precision_reduction, on by default); k levels of those add k u S."""
    u = unit_roundoff(dtype)
    sae_in = x - ref_sae.b_dec.detach() * float(ref_sae.cfg.apply_b_dec_to_input)
    W = ref_sae.W_enc.detach()
    S = sae_in.abs() @ W.abs()
    return SECOND_ORDER * (((4 + partial_sum_roundings) * u + W.shape[0] * U32) * S + 2 * u * ref_sae.b_enc.detach().abs())


def check_selection(chosen: list[int], got_scores: list[float], ref_scores: torch.Tensor, tol: torch.Tensor,
                    candidates: list[int], what: str) -> None:
    """``chosen`` (best first, scores ``got_scores``) is a top-len(chosen) of ``candidates`` by ``ref_scores``,
    up to each score's tolerance: none left out is better by more than both tolerances, each score is within
    its tolerance, and the order is by the computed scores, index order among equal ones (a stable sort)."""
    assert len(chosen) == len(set(chosen)) and set(chosen) <= set(candidates), what
    for f, s in zip(chosen, got_scores):
        assert abs(s - float(ref_scores[f])) <= float(tol[f]), f"{what}: feature {f} score {s} vs {float(ref_scores[f])}"
    pairs = list(zip(got_scores, chosen))
    assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1])), f"{what}: not in (score desc, index) order"
    left_out = torch.zeros(ref_scores.shape[0], dtype=torch.bool)
    left_out[candidates] = True
    left_out[chosen] = False
    if chosen and left_out.any():
        worst_in = min(float(ref_scores[f] + tol[f]) for f in chosen)
        best_out = float((ref_scores - tol)[left_out].max())
        assert worst_in >= best_out, f"{what}: left out a feature better by more than the tolerance"
