"""Capture split between lanes (ModelDeployment's wide capture tasks, on the real replica class and engine without
a Ray cluster): the prompts of a batch cut into runs of like length (engine.capture.lane_parts), each run captured on
its own thread, the answers those of TransformerLens called on each prompt alone."""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest
import torch

from deployments import protocol as P
from deployments.engine.capture import lane_parts
from tests import reference as R
from tests.engine.tolerances import capture_tolerance


def _cost(lengths, parts):
    return max(len(p) * max(lengths[i] for i in p) for p in parts)


def test_lane_parts_cover_every_prompt_in_runs_of_like_length_at_the_least_cost():
    rng = random.Random(0)
    for _ in range(300):
        n, lanes = rng.randint(1, 9), rng.randint(1, 4)
        lengths = [rng.randint(1, 40) for _ in range(n)]
        parts = lane_parts(lengths, lanes)
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert 1 <= len(parts) <= min(lanes, n) and all(parts)
        # runs of the length order: every prompt of a part is at most as long as every prompt of the next
        assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(parts, parts[1:]))
        # no cut of the sorted prompts into at most ``lanes`` runs has a cheaper costliest part
        order = sorted(range(n), key=lambda i: lengths[i])
        best = min(_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))])
                   for k in range(min(lanes, n)) for cuts in itertools.combinations(range(1, n), k))
        assert _cost(lengths, parts) == best, (lengths, lanes, parts)
    assert lane_parts([7], 4) == [[0]] and lane_parts([], 2) == [[]]


@pytest.fixture(scope="module")
def replica(pack_dir):
    from deployments.model import ModelDeployment

    cls = getattr(ModelDeployment, "func_or_class", ModelDeployment)
    r = cls(str(pack_dir), device="cpu", torch_threads=1, burst_torch_threads=2, generate_rows=8)
    assert r.compute.max_lanes == 2
    return r


@pytest.fixture(scope="module")
def ref_model(pack_dir):
    return R.model(str(pack_dir))


def test_a_batch_split_between_lanes_equals_transformer_lens_per_prompt(replica, ref_model):
    texts = ["a", "the cat sat on the mat and looked at the dog", "red blue", "one two three four five six",
             "the bird flew over the river to the tall green tree by the old house", "x y"]
    tok = replica.runner.tokenizer
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    reqs = [P.CaptureRequest([tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]], hooks) for t in texts]
    assert replica.runner.thread_safe(reqs)
    threads, real = [], replica.runner.capture

    def spy(requests):  # the real capture, noting the thread and prompts of each call
        threads.append((threading.get_ident(), len(requests)))
        return real(requests)

    def wide():  # what a wide task given two lanes runs (engine.compute: lanes are set only inside such a task)
        replica.compute.lanes = 2
        try:
            return replica._locked_capture(reqs)
        finally:
            replica.compute.lanes = 1

    before = replica._capture_counts["lane_batches"]
    replica.runner.capture = spy
    try:
        got = replica.compute.call(wide)
    finally:
        del replica.runner.capture
    assert replica._capture_counts["lane_batches"] == before + 1
    parts = lane_parts([len(r.tokens) for r in reqs], 2)
    assert len(parts) == 2 and len({t for t, _ in threads}) == 2, threads  # two calls, on two threads
    assert sorted(n for _, n in threads) == sorted(len(p) for p in parts)
    with torch.no_grad():
        for r, g in zip(reqs, got):
            _, cache = ref_model.run_with_cache(torch.tensor([r.tokens]))
            for h in hooks:
                _close(g[h], cache[h][0].numpy(), h)
    # one lane (outside a wide task): the same batch in one forward pass, the same answers to float32 rounding
    for a, b in zip(replica.compute.call(replica._locked_capture, reqs), got):
        for h in hooks:
            _close(a[h], b[h], h)


def _close(got: np.ndarray, want: np.ndarray, hook: str) -> None:
    """Within float32 rounding of a forward pass up to ``hook`` (tests/engine/tolerances.py), per position."""
    assert got.shape == want.shape
    scale = np.abs(want).max(axis=1, keepdims=True)
    err = np.abs(got - want).max(axis=1, keepdims=True)
    assert (err <= capture_tolerance(hook, "float32") * scale).all(), (hook, float((err / scale).max()))


def test_only_batches_worth_two_lanes_and_safe_on_threads_go_wide(replica):
    tok = replica.runner.tokenizer
    reqs = [P.CaptureRequest([tok.bos_token_id, 5, 6, 7], ["blocks.1.hook_resid_post"])] * 4
    saved = replica._token_s
    try:
        replica._token_s = None  # nothing measured yet
        assert not replica._worth_lanes(reqs)
        replica._token_s = 2 * replica.min_lane_work_s / 16  # 16 tokens: exactly two lanes' least work
        assert replica._worth_lanes(reqs) and not replica._worth_lanes(reqs[:3])
    finally:
        replica._token_s = saved
    # attention patterns go through TransformerLens's hooks, registered on the shared model: never on two threads
    assert not replica.runner.thread_safe([P.CaptureRequest([tok.bos_token_id, 5], ["blocks.1.attn.hook_pattern"])])
