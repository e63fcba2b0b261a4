"""The batched sampler: counter-based draws, inverse-CDF sampling against the softmax it should follow, temperature
and frequency penalty, logprobs (deterministic: fixed seeds, so the statistical checks cannot flake)."""

from __future__ import annotations

import numpy as np
import torch

from deployments.engine import sampling as S


def test_draws_are_uniform_and_a_pure_function_of_key_and_counter():
    key = torch.tensor([S.seed_key(7)])
    u = S.uniform(key, torch.arange(20000))
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert torch.all((hist - 2000).abs() < 4 * np.sqrt(2000 * 0.9))  # 4 sigma of a binomial count
    again = S.uniform(torch.tensor([S.seed_key(7)] * 3), torch.tensor([5, 17, 5]))
    assert again[0] == again[2] == u[5] and again[1] == u[17]
    assert S.uniform(torch.tensor([S.seed_key(8)]), torch.arange(5)).tolist() != u[:5].tolist()
    assert S.seed_key(2**64 - 1) != S.seed_key(0)  # every bit of a 64-bit seed counts


def sample_many(logits, n, inv_temp=1.0, penalty=None, counts=None):
    rows = logits.expand(n, -1).contiguous()
    u = S.uniform(torch.full((n,), S.seed_key(3)), torch.arange(n))
    pen = None if penalty is None else torch.full((n,), penalty)
    cnt = None if counts is None else counts.expand(n, -1)
    return S.choose(rows, torch.zeros(n, dtype=torch.bool), torch.full((n,), inv_temp), u, pen, cnt)


def check_follows(tokens, probs):
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=probs.numel()).double()
    sigma = torch.sqrt(n * probs * (1 - probs)) + 1e-9
    assert torch.all((freq - n * probs).abs() <= 4 * sigma + 1), (freq / n, probs)


def test_samples_follow_the_softmax_with_temperature_and_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, -30.0]])
    n = 20000
    check_follows(sample_many(logits, n), torch.softmax(logits[0].double(), -1))
    check_follows(sample_many(logits, n, inv_temp=1 / 0.5), torch.softmax(logits[0].double() / 0.5, -1))
    counts = torch.tensor([[0.0, 3.0, 0.0, 1.0, 2.0, 0.0]])
    want = torch.softmax(logits[0].double() / 1.5 - 0.7 * counts[0].double(), -1)
    check_follows(sample_many(logits, n, inv_temp=1 / 1.5, penalty=0.7, counts=counts), want)


def test_greedy_rows_and_no_zero_probability_token():
    logits = torch.tensor([[0.0, 5.0, float("-inf"), 1.0]] * 4)
    greedy = torch.tensor([True, False, True, False])
    u = torch.tensor([0.999999, 0.999999, 1e-9, 1e-9], dtype=torch.float64)
    out = S.choose(logits, greedy, torch.ones(4), u)
    assert out[0] == 1 and out[2] == 1 and out[1] != 2 and out[3] != 2
    # a huge temperature is uniform over the finite logits, a tiny inverse one is the argmax: never NaN
    flat = S.choose(logits[:1], torch.tensor([False]), torch.tensor([0.0]), torch.tensor([0.6], dtype=torch.float64))
    assert flat.item() in (0, 1, 3)


def test_logprobs_are_a_log_softmax_of_the_raw_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4
    tokens = torch.tensor([4, 10, 49])
    chosen, vals, idx = S.top_logprobs(logits, tokens, 5)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(chosen.double(), ref[torch.arange(3), tokens], atol=1e-5)
    top = torch.topk(ref, 5)
    assert torch.equal(idx, top.indices) and torch.allclose(vals.double(), top.values, atol=1e-5)


def _one_level(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The definition inverse_cdf computes in blocks: one float64 cumsum over the whole vocabulary."""
    cdf = p.cumsum(-1, dtype=torch.float64)
    return (cdf < (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=p.shape[-1] - 1)


def test_inverse_cdf_in_blocks_picks_what_one_cumsum_picks():
    g = torch.Generator().manual_seed(1)
    for vocab in (7, S.BLOCK, S.BLOCK + 1, 3 * S.BLOCK + 81):
        logits = torch.randn(512, vocab, generator=g) * 3
        logits[::3, ::5] = float("-inf")  # zero-probability tokens, some at block edges
        p = torch.softmax(logits, -1)
        u = S.uniform(torch.full((512,), S.seed_key(vocab)), torch.arange(512))
        got = S.inverse_cdf(p, u)
        assert torch.equal(got, _one_level(p, u))
        assert bool((p.gather(1, got[:, None]) > 0).all())
    # thresholds at the very ends: the first and the last token of positive probability
    p = torch.zeros(2, 3 * S.BLOCK)
    p[:, 5], p[:, 2 * S.BLOCK + 7] = 0.25, 0.75
    u = torch.tensor([1e-12, 1 - 2.0**-32], dtype=torch.float64)
    assert S.inverse_cdf(p, u).tolist() == [5, 2 * S.BLOCK + 7]
    # a row that is not finite (it fails elsewhere) still yields a token inside the vocabulary
    nan = torch.full((1, S.BLOCK + 3), float("nan"))
    assert 0 <= S.inverse_cdf(nan, torch.tensor([0.5], dtype=torch.float64)).item() < S.BLOCK + 3
