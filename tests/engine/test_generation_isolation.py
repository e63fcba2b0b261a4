"""Failure isolation per row: a hostile row in a batch fails alone (a 400 or 503 for its request), and every other
row produces exactly the tokens and logprobs it produces alone. Also what is refused before a row joins."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.protocol import METHODS
from deployments.engine.errors import Overloaded, RequestError
from deployments.engine.generate import GenerationEngine, GenerationRequest, GenerationScheduler, generate, tokens_of
from deployments.engine.pack import load_model_dir

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    pack = write_random_pack(tmp_path_factory.mktemp("isopack"), n_layers=2, d_model=32, n_heads=4, n_ctx=96, d_sae=64,
                             vocab_size=300, seed=3)
    return load_model_dir(pack)


def prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [model.tokenizer.bos_token_id] + torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()


def normal_rows(model, n=5):
    vec = (np.random.RandomState(1).randn(model.cfg.d_model)).astype(np.float32)
    return [GenerationRequest(tokens=prompt(model, 3 + 2 * i, 50 + i), max_new_tokens=8, temperature=0.8 * (i % 2),
                              freq_penalty=0.3 * (i % 3), seed=i, n_logprobs=2, stop_tokens=[],
                              steering=[St.SteerVector(HOOK, vec, 2.0, METHODS[i % 3])] if i % 2 == 0 else [])
            for i in range(n)]


def run_engine(eng: GenerationEngine, requests):
    ids = eng.add(requests)
    events: dict[int, list] = {i: [] for i in ids}
    failed = {}
    while not eng.idle:
        res = eng.step()
        for e in res.events:
            events[e.row].append(e)
        failed.update(res.failed)
    return ids, events, failed


def assert_like_alone(model, req, events):
    alone = generate(model, [req])[0]
    assert tokens_of(events) == tokens_of(alone)
    assert [e.logprob for e in events] == [e.logprob for e in alone]  # bit for bit
    assert [e.top_logprobs for e in events] == [e.top_logprobs for e in alone]


def hostile_rows(model):
    d = model.cfg.d_model
    v = np.random.RandomState(3).randn(d).astype(np.float32)
    z_width = model.cfg.n_heads * model.cfg.d_head
    return {
        # finite in float32 when checked, infinite once (coeff - 1) * h.v is formed at run time
        "orthogonal overflow": (GenerationRequest(tokens=prompt(model, 4, 1), max_new_tokens=8, stop_tokens=[],
                                                  steering=[St.SteerVector(HOOK, v, 3e38, St.ORTHOGONAL_DECOMP)]), HOOK),
        # a huge additive vector after the MLP's activation: the W_out matmul overflows downstream of the hook
        "mlp overflow": (GenerationRequest(tokens=prompt(model, 5, 2), max_new_tokens=8, stop_tokens=[],
                                           steering=[St.SteerVector("blocks.0.mlp.hook_post",
                                                                    np.full(model.cfg.d_mlp, 1e36, np.float32), 3.0)]),
                         "blocks.0.mlp.hook_post"),
        # not a residual stream: the attention heads' outputs
        "hook_z overflow": (GenerationRequest(tokens=prompt(model, 6, 3), max_new_tokens=8, stop_tokens=[],
                                              steering=[St.SteerVector("blocks.1.attn.hook_z",
                                                                       np.full(z_width, 3e37, np.float32), 9.0)]),
                            "blocks.1.attn.hook_z"),
    }


@pytest.mark.parametrize("case", ["orthogonal overflow", "mlp overflow", "hook_z overflow"])
def test_a_non_finite_row_fails_alone(model, case):
    hostile, hook = hostile_rows(model)[case]
    normal = normal_rows(model)
    ids, events, failed = run_engine(GenerationEngine(model, capacity=8), [normal[0], normal[1], hostile, *normal[2:]])
    err = failed.pop(ids[2])
    assert isinstance(err, RequestError) and err.status == 400 and hook in err.message and "lower the strength" in err.message
    assert not failed and not events[ids[2]]
    for req, rid in zip(normal, [ids[0], ids[1], *ids[3:]]):
        assert_like_alone(model, req, events[rid])


def test_extreme_sampling_numbers_are_contained(model):
    """A temperature of 1e-300 (0 in float32) is greedy; a freq_penalty of -1e30 is finite arithmetic; neither
    produces NaN or disturbs its neighbours."""
    p = prompt(model, 6, 7)
    tiny_t = GenerationRequest(tokens=p, max_new_tokens=8, temperature=1e-300, seed=3, stop_tokens=[])
    greedy = GenerationRequest(tokens=p, max_new_tokens=8, stop_tokens=[])
    neg_pen = GenerationRequest(tokens=p, max_new_tokens=8, temperature=1.0, freq_penalty=-1e30, seed=3, stop_tokens=[])
    normal = normal_rows(model, 3)
    ids, events, failed = run_engine(GenerationEngine(model, capacity=8), [tiny_t, neg_pen, *normal])
    assert not failed
    assert tokens_of(events[ids[0]]) == tokens_of(generate(model, [greedy])[0])
    pen = tokens_of(events[ids[1]])
    assert len(pen) == 8 and len(set(pen)) == 1  # a huge negative penalty repeats the first sample
    for req, rid in zip(normal, ids[2:]):
        assert_like_alone(model, req, events[rid])


def test_numbers_that_leave_float32_are_refused_before_joining(model):
    eng = GenerationEngine(model, capacity=8)
    d = model.cfg.d_model
    p = prompt(model, 3, 0)
    v = np.ones(d, np.float32)
    bad = [
        (dict(freq_penalty=-1e37, temperature=1.0), "freq_penalty"),
        (dict(steering=[St.SteerVector(HOOK, v, 1e39)]), "beyond float32"),
        (dict(steering=[St.SteerVector(HOOK, v * 1e30, 1e9)]), "overflows float32"),
        (dict(steering=[St.SteerVector(HOOK, np.zeros(d, np.float32), 2.0, St.PROJECTION_CAP)]), "zero vector"),
        (dict(steering=[St.SteerVector("blocks.0.attn.hook_pattern", np.ones(1, np.float32), 1.0)]), "not supported"),
        (dict(steering=[St.SteerVector(HOOK, np.ones(d + 1, np.float32), 1.0)]), "width"),
        (dict(steering=[St.SteerVector(HOOK, np.full(d, np.nan, np.float32), 1.0)]), "NaN"),
        (dict(max_new_tokens=96), "positions"),
        (dict(n_logprobs=11), "n_logprobs"),
    ]
    for patch, message in bad:
        req = GenerationRequest(**{**dict(tokens=p, max_new_tokens=4), **patch})
        with pytest.raises(RequestError, match=message) as e:
            eng.add([req])
        assert e.value.status == 400
    assert eng.idle
    # a tiny (but non-zero in float32) vector for a projection method is fine: only its direction counts
    tiny = GenerationRequest(tokens=p, max_new_tokens=4, steering=[St.SteerVector(HOOK, v * 1e-30, 0.5, St.PROJECTION_CAP)])
    unit = GenerationRequest(tokens=p, max_new_tokens=4, steering=[St.SteerVector(HOOK, v / np.sqrt(d), 0.5, St.PROJECTION_CAP)])
    assert tokens_of(generate(model, [tiny])[0]) == tokens_of(generate(model, [unit])[0])


def inject_oom(eng: GenerationEngine, victim: dict):
    """Fault injection: the decoder raises out-of-memory whenever the victim row's slot is in the batch."""
    real = eng.decoder.forward

    def forward(tokens, positions, rows, write_rows, *a, **k):
        slot = victim.get("slot")
        if slot is not None and (write_rows == slot).any():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(tokens, positions, rows, write_rows, *a, **k)

    eng.decoder.forward = forward


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_out_of_memory_fails_that_row_with_a_503_and_the_rest_continue(model, when):
    normal = normal_rows(model)
    hostile = GenerationRequest(tokens=prompt(model, 7, 9), max_new_tokens=8, stop_tokens=[])
    eng = GenerationEngine(model, capacity=8)
    victim: dict = {}
    inject_oom(eng, victim)
    ids = eng.add([normal[0], normal[1]])
    (hid,) = eng.add([hostile])
    ids += eng.add(normal[2:])
    events: dict[int, list] = {i: [] for i in [*ids, hid]}
    failed = {}
    steps = 0
    while not eng.idle:
        row = eng.rows.get(hid)
        if row is not None and row.slot is not None and (when == "prefill" or steps >= 2):
            victim["slot"] = row.slot
        if when == "prefill" and steps == 0:
            victim["slot"] = 2  # the slot it will get: the third row admitted
        res = eng.step()
        steps += 1
        for e in res.events:
            events[e.row].append(e)
        failed.update(res.failed)
    err = failed.pop(hid)
    assert isinstance(err, Overloaded) and err.status == 503
    assert not failed and eng.stats["isolated_reruns"] >= 1
    assert len(tokens_of(events[hid])) == (0 if when == "prefill" else 3)  # prefill + one decode, then it failed
    for req, rid in zip(normal, ids):
        assert_like_alone(model, req, events[rid])


def test_a_failing_request_surfaces_from_its_own_stream_only(model):
    """Through the scheduler: the hostile submission's stream raises (after any events it already had); the others
    finish normally with their alone tokens."""
    hostile, _ = hostile_rows(model)["orthogonal overflow"]
    normal = normal_rows(model, 3)

    async def run():
        sched = GenerationScheduler(model, max_rows=8)
        subs = [sched.submit([r]) for r in (normal[0], hostile, normal[1], normal[2])]

        async def collect(sub):
            got = []
            try:
                async for events in sub:
                    got += events
            except RequestError as e:
                return got, e
            return got, None

        out = await asyncio.gather(*(collect(s) for s in subs))
        return out, sched.stats

    out, stats = asyncio.run(run())
    (_, err) = out[1]
    assert err is not None and err.status == 400 and "non-finite" in err.message
    for req, (got, e) in zip(normal, [out[0], out[2], out[3]]):
        assert e is None
        assert_like_alone(model, req, got)
    assert stats["failed_rows"] == 1 and stats["active_rows"] == 0


def test_the_scheduler_survives_a_step_that_fails_outright(model):
    """A failure that is not one row's (here injected into the step itself) fails what is in flight, with that
    error, and the next request is served as usual."""
    normal = normal_rows(model, 2)

    async def run():
        sched = GenerationScheduler(model, max_rows=8)
        real, calls = sched.engine.step, {"n": 0}

        def step():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected step failure")
            return real()

        sched.engine.step = step
        first = sched.submit([normal[0]])
        with pytest.raises(RuntimeError, match="injected"):
            async for _ in first:
                pass
        got = [e for events in [ev async for ev in sched.submit([normal[1]])] for e in events]
        return got, sched.stats

    got, stats = asyncio.run(run())
    assert_like_alone(model, normal[1], got)
    assert stats["active_rows"] == 0
