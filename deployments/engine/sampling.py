"""Batched next-token choice on the model's device: greedy, temperature, frequency penalty, and log-probabilities.

Each row's randomness is a pure function of its seed and how many tokens it has sampled (a counter-based
generator), so a seeded row draws the same numbers alone or among any other rows, with no per-row generator
objects and no Python per row. A row samples by inverse CDF with one uniform draw per step:

    z = (logits - max) / temperature - freq_penalty * counts      (float32, one exact op at a time)
    token = #{j : cdf_j < u * cdf_last},  cdf = cumsum(softmax(z))  (float64, in blocks: inverse_cdf)

Every op here is row-local (elementwise, or a reduction along the vocabulary of one row), so a row's token does not
depend on its neighbours; the count picks the first token whose cdf reaches ``u * cdf_last``, never one of
probability 0. Writing the temperature as a factor on ``logits - max`` keeps every value finite: the largest
logit maps to 0 and the rest to ``<= 0`` (``-inf`` at worst, which softmax maps to 0).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFF_FFFF
BLOCK = 256  # inverse_cdf's block of the vocabulary
#: Temperatures below this are greedy: float32 logits closer than 1e-30 apart do not exist at useful scales, so the
#: distribution is one-hot on the largest logit (and 1/T would overflow float32).
MIN_TEMPERATURE = 1e-30


def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves of ``c``); ``x`` an int64
    tensor or a Python int."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a bijection on [0, 2**32) that mixes every input bit into every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A row's 32-bit key from its (64-bit) seed, computed once when it joins."""
    return _fmix32((_fmix32((seed >> 32) & MASK32) ^ (seed & MASK32)) + 0x9E3779B9 & MASK32)


def uniform(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One float64 draw in (0, 1) per row from its key and counter (int64 tensors), 32 bits of randomness."""
    h = _fmix32(_fmix32((counter * 0x9E37 + key) & MASK32) ^ key)
    return (h.double() + 0.5) * 2.0 ** -32


def choose(logits: torch.Tensor, greedy: torch.Tensor, inv_temp: torch.Tensor, u: torch.Tensor,
           freq_penalty: torch.Tensor | None = None, counts: torch.Tensor | None = None, any_sampled: bool = True) -> torch.Tensor:
    """The next token of each row (int64 ``[rows]``) from float32 ``logits [rows, vocab]``.

    ``greedy [rows]`` bool; ``inv_temp``, ``freq_penalty [rows]`` float32 (ignored on greedy rows); ``counts``
    ``[rows, vocab]`` float32 occurrences so far (prompt included); ``u [rows]`` float64 draws.
    """
    best = logits.argmax(-1)
    if not any_sampled:
        return best
    z = (logits - logits.max(-1, keepdim=True).values) * inv_temp[:, None]
    if freq_penalty is not None:
        z = z - freq_penalty[:, None] * counts
    return torch.where(greedy, best, inverse_cdf(torch.softmax(z, dim=-1), u))


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's first index whose cumulative probability reaches ``u`` of the row's total, never one of probability
    0; ``p [rows, vocab]`` float32 (non-negative, each row with a positive total), ``u [rows]`` float64 in (0, 1).

    In two levels rather than one float64 cumsum over the vocabulary (sequential, and a float64 copy of ``p``:
    36 ms of a 64-row decode step at GPT-2's 50,257 tokens on a CPU core): float64 sums of blocks of BLOCK entries,
    their cumsum, the block where the threshold falls, then a cumsum within that block only. Row-local throughout."""
    R, V = p.shape
    nb = -(-V // BLOCK)
    if nb * BLOCK != V:
        p = torch.nn.functional.pad(p, (0, nb * BLOCK - V))  # zeros: never chosen
    blocks = p.view(R, nb, BLOCK)
    bcdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [R, nb]
    thr = u * bcdf[:, -1]
    # the first block whose cdf reaches thr: it holds a token of positive probability (bcdf[b] > bcdf[b-1])
    b = (bcdf < thr[:, None]).sum(-1).clamp_(max=nb - 1)
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(thr))
    block = blocks[torch.arange(R, device=p.device), b]  # [R, BLOCK]
    within = block.cumsum(-1, dtype=torch.float64)
    live = block > 0
    # the first live entry that reaches the rest of the threshold; float64 rounding between the block's sum and its
    # cumsum can leave none (then the block's last live entry)
    hit = (within >= (thr - before)[:, None]) & live
    last_live = (live * torch.arange(1, BLOCK + 1, device=p.device)).argmax(-1)
    j = torch.where(hit.any(-1), hit.int().argmax(-1), last_live)
    return (b * BLOCK + j).clamp_(max=V - 1)  # (only a non-finite row, which fails, could point past V)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's log-probability of ``tokens`` and its ``k`` most likely tokens with theirs (raw logits, no
    temperature or penalty): ``(chosen [rows], values [rows, k], indices [rows, k])``."""
    lp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    return lp.gather(1, tokens[:, None])[:, 0], top.values, top.indices
