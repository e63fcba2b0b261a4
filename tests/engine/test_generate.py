"""Continuous batched generation against TransformerLens on the same weights: greedy tokens, logprobs, steering
methods, seeded sampling alone vs under load (rows joining mid-flight), EOS, cancellation (Ray-free)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.protocol import METHODS
from deployments.engine.generate import GenerationEngine, GenerationRequest, GenerationScheduler, generate, tokens_of
from deployments.engine.pack import load_model_dir

HOOK = "blocks.0.hook_resid_post"
N_NEW = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    pack = write_random_pack(tmp_path_factory.mktemp("genpack"), n_layers=2, d_model=32, n_heads=4, n_ctx=96, d_sae=64,
                             vocab_size=300, seed=3)
    m = load_model_dir(pack)
    m.eval()
    return m


def prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [model.tokenizer.bos_token_id] + torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def vec(model):
    return (np.random.RandomState(0).randn(model.cfg.d_model) * 3).astype(np.float32)


def tl_hook(method, v, coeff):
    """The same steering, written directly against a TL hook (no batching, every position), in float64."""
    vt = torch.as_tensor(v, dtype=torch.float64)

    def fn(act, hook):
        h = act.double()
        if method == St.SIMPLE_ADDITIVE:
            out = h + coeff * vt
        elif method == St.ORTHOGONAL_DECOMP:
            ph = (h @ vt)[..., None] * vt / (vt @ vt)
            out = h - ph + coeff * ph
        else:
            u = vt / vt.norm()
            out = h - torch.clamp(h @ u - coeff, min=0)[..., None] * u
        return out.to(act.dtype)

    return fn


@pytest.mark.parametrize("method", [None, *METHODS])
def test_greedy_matches_transformer_lens_generate(model, vec, method):
    p = prompt(model, 7, 0)
    coeff = 0.5 if method == St.PROJECTION_CAP else 4.0
    steering = [] if method is None else [St.SteerVector(HOOK, vec, coeff, method)]
    req = GenerationRequest(tokens=p, max_new_tokens=N_NEW, n_logprobs=5, steering=steering, stop_tokens=[])
    ev = generate(model, [req])[0]
    ours = tokens_of(ev)
    hooks = [] if method is None else [(HOOK, tl_hook(method, vec, coeff))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        ref = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False,
                             use_past_kv_cache=True)[0, len(p):].tolist()
        assert ours == ref
        # logprobs: the direct log-softmax of a full (uncached) hooked forward pass at each position
        logits = model(torch.tensor([p + ours]))[0]
    lp = torch.log_softmax(logits.double(), -1)
    for k, e in enumerate(ev):
        row = lp[len(p) - 1 + k]
        assert abs(e.logprob - float(row[e.token])) < 1e-4
        top = torch.topk(row, 5)
        assert e.top_tokens == top.indices.tolist()
        assert np.allclose(e.top_logprobs, top.values.numpy(), atol=1e-4)
        assert e.top_logprobs == sorted(e.top_logprobs, reverse=True)


def test_steering_changes_the_output_and_default_is_unsteered(model, vec):
    p = prompt(model, 5, 1)
    base = GenerationRequest(tokens=p, max_new_tokens=N_NEW, stop_tokens=[])
    steered = GenerationRequest(tokens=p, max_new_tokens=N_NEW, stop_tokens=[], steering=[St.SteerVector(HOOK, vec, 40.0)])
    both = generate(model, [steered, base])
    assert tokens_of(both[1]) == tokens_of(generate(model, [base])[0])
    assert tokens_of(both[0]) != tokens_of(both[1])


def mixed_requests(model, vec, n=8):
    methods = METHODS
    return [GenerationRequest(tokens=prompt(model, 3 + 5 * i % 17, 10 + i), max_new_tokens=N_NEW,
                              temperature=0.0 if i % 3 == 0 else 0.8, freq_penalty=0.5 * (i % 2), seed=100 + i,
                              n_logprobs=2, stop_tokens=[],
                              steering=[St.SteerVector(HOOK, vec, 3.0, methods[i % 3])] if i % 2 else [])
            for i in range(n)]


def same_events(a, b):
    assert tokens_of(a) == tokens_of(b)
    assert [e.logprob for e in a] == [e.logprob for e in b]  # bit for bit
    assert [e.top_logprobs for e in a] == [e.top_logprobs for e in b]


def test_batched_rows_equal_rows_alone_exactly(model, vec):
    reqs = mixed_requests(model, vec)
    together = generate(model, reqs, capacity=16)
    for r, ev in zip(reqs, together):
        same_events(generate(model, [r], capacity=16)[0], ev)


def test_rows_joining_mid_flight_equal_rows_alone_exactly(model, vec):
    """Rows arrive while others decode, leave at different steps, and reuse freed slots: every row's tokens and
    logprobs are bit-identical to its run alone."""
    reqs = mixed_requests(model, vec, n=12)
    for i, r in enumerate(reqs):
        r.max_new_tokens = 3 + (7 * i) % 11
    eng = GenerationEngine(model, capacity=8)
    got: dict[int, list] = {}
    owner = {}
    arrivals = {0: [0, 1, 2], 2: [3, 4], 3: [5], 5: [6, 7, 8], 9: [9, 10, 11]}
    step = 0
    while step <= max(arrivals) or not eng.idle:
        for i in arrivals.get(step, []):
            (rid,) = eng.add([reqs[i]])
            owner[rid] = i
        res = eng.step()
        assert not res.failed
        for e in res.events:
            got.setdefault(owner[e.row], []).append(e)
        step += 1
    st = eng.stats
    assert st["rows_joined_mid_flight"] > 0 and st["max_active_rows"] <= 8 and st["rows_finished"] == 12
    for i, r in enumerate(reqs):
        alone = generate(model, [r], capacity=8)[0]
        same_events(alone, got[i])


def test_a_long_row_widening_the_attention_span_changes_no_other_row(model, vec):
    """A 60-token prompt pushes the batch's attention span from 64 to 128 positions mid-flight: the short rows
    (whose own span stays 64 alone) keep bit-identical tokens and logprobs."""
    reqs = mixed_requests(model, vec, n=4)
    long = GenerationRequest(tokens=prompt(model, 58, 77), max_new_tokens=12, temperature=0.7, seed=3, n_logprobs=2,
                             stop_tokens=[])
    together = generate(model, [*reqs, long])
    for r, ev in zip([*reqs, long], together):
        same_events(generate(model, [r])[0], ev)


def test_prompts_prefilled_in_several_chunks_equal_rows_alone(model, vec):
    reqs = mixed_requests(model, vec, n=6)
    eng = GenerationEngine(model, capacity=8, prefill_tokens=24)  # two or three prompts per prefill batch
    ids = eng.add(reqs)
    got = {i: [] for i in ids}
    while not eng.idle:
        for e in eng.step().events:
            got[e.row].append(e)
    assert eng.stats["prefill_batches"] >= 3
    for r, i in zip(reqs, ids):
        same_events(generate(model, [r])[0], got[i])


def test_fixed_shapes_give_the_same_numbers_as_packed_rows(model, vec):
    """The fallback for devices whose kernels depend on the batch shape: same tokens and logprobs (on this CPU)."""
    reqs = mixed_requests(model, vec, n=5)
    packed = generate(model, reqs, capacity=8, fixed_shapes=False)
    fixed = generate(model, reqs, capacity=8, fixed_shapes=True)
    for a, b in zip(packed, fixed):
        same_events(a, b)


def collect_all(model, reqs_list, **kw):
    async def run():
        sched = GenerationScheduler(model, **kw)
        subs = [sched.submit([r]) for r in reqs_list]

        async def collect(sub):
            toks = []
            async for events in sub:
                toks += [e.token for e in events if e.token is not None]
            return toks

        out = await asyncio.gather(*(collect(s) for s in subs))
        return out, sched.stats

    return asyncio.run(run())


def test_seeded_sampling_is_reproducible_under_concurrent_load(model, vec):
    """The same request and seed: identical text alone and among 8 concurrent requests with other seeds."""
    target = GenerationRequest(tokens=prompt(model, 6, 42), max_new_tokens=N_NEW, temperature=1.0, seed=7, stop_tokens=[],
                               steering=[St.SteerVector(HOOK, vec, 2.0)])
    others = [GenerationRequest(tokens=prompt(model, 2 + 3 * i, i), max_new_tokens=N_NEW + i, temperature=1.2,
                                seed=1000 + i, stop_tokens=[]) for i in range(7)]
    (alone,), _ = collect_all(model, [target], max_rows=16)
    loaded, stats = collect_all(model, [others[0], others[1], others[2], target, *others[3:]], max_rows=16)
    assert stats["max_active_rows"] == 8  # they really shared a batch
    assert loaded[3] == alone
    assert len({tuple(t) for t in loaded}) == 8  # different seeds/prompts, different text
    # a different seed changes the sample
    other_seed = GenerationRequest(**{**target.__dict__, "seed": 8})
    assert tokens_of(generate(model, [other_seed])[0]) != alone


def test_a_short_request_joins_a_running_batch(model):
    """A request submitted while long ones decode joins at the next step and finishes long before them."""
    long = [GenerationRequest(tokens=prompt(model, 5, i), max_new_tokens=60, stop_tokens=[]) for i in range(4)]
    short = GenerationRequest(tokens=prompt(model, 4, 99), max_new_tokens=3, stop_tokens=[], temperature=0.9, seed=5)

    async def run():
        sched = GenerationScheduler(model, max_rows=8)
        subs = [sched.submit([r]) for r in long]
        steps = 0
        async for _ in subs[0]:
            steps += 1
            if steps == 5:
                break
        sub = sched.submit([short])
        got = [e for events in [ev async for ev in sub] for e in events]
        active_after = sched.stats["active_rows"]
        for s in subs:
            s.cancel()
        return got, active_after, sched.stats

    got, active_after, stats = asyncio.run(run())
    assert tokens_of(got) == tokens_of(generate(model, [short])[0]) and got[-1].finished == "length"
    assert active_after == 4  # the long rows were still running when it finished
    assert stats["rows_joined_mid_flight"] >= 1


def test_freq_penalty_counts_prompt_and_output(model):
    p = prompt(model, 8, 5)
    req = GenerationRequest(tokens=p, max_new_tokens=N_NEW, temperature=1.0, freq_penalty=1e6, seed=0, stop_tokens=[])
    out = tokens_of(generate(model, [req])[0])
    assert len(set(out)) == len(out) and not set(out) & set(p)


def test_stops_at_eos_and_budget(model):
    p = prompt(model, 4, 6)
    first = tokens_of(generate(model, [GenerationRequest(tokens=p, max_new_tokens=3, stop_tokens=[])])[0])
    assert len(first) == 3
    ev = generate(model, [GenerationRequest(tokens=p, max_new_tokens=5, stop_tokens=[first[1]])])[0]
    assert tokens_of(ev) == first[:1] and ev[-1].finished == "eos"


def test_cancelled_row_leaves_and_others_continue(model):
    reqs = [GenerationRequest(tokens=prompt(model, 4, i), max_new_tokens=N_NEW, stop_tokens=[]) for i in range(2)]
    eng = GenerationEngine(model, capacity=4)
    ids = eng.add(reqs)
    first = eng.step().events  # prefill + one decode step: two tokens each
    assert [e.row for e in first].count(ids[0]) == 2
    eng.cancel(ids[0])
    rest = []
    while not eng.idle:
        rest += eng.step().events
    assert [e.finished for e in rest if e.row == ids[0]] == ["cancelled"]
    assert len([e for e in rest if e.row == ids[1] and e.token is not None]) == N_NEW - 2
    assert eng.stats["cancelled_rows"] == 1 and eng.stats["active_rows"] == 0


def test_scheduler_cancellation_frees_the_slot(model):
    async def run():
        sched = GenerationScheduler(model, max_rows=4)
        sub = sched.submit([GenerationRequest(tokens=prompt(model, 4, 0), max_new_tokens=80, stop_tokens=[])])
        await sub.__anext__()
        sub.cancel()
        for _ in range(200):
            if sched.stats["active_rows"] == 0 and sched.stats["cancelled_rows"] == 1:
                break
            await asyncio.sleep(0.01)
        return sched.stats

    stats = asyncio.run(run())
    assert stats["active_rows"] == 0 and stats["cancelled_rows"] == 1 and stats["tokens"] < 80


def test_generation_stats_report_occupancy_and_step_time(model):
    reqs = [GenerationRequest(tokens=prompt(model, 3, i), max_new_tokens=4 + i, stop_tokens=[]) for i in range(3)]
    _, stats = collect_all(model, reqs, max_rows=8)
    assert stats["rows_joined"] == 3 and stats["rows_finished"] == 3 and stats["tokens"] == 4 + 5 + 6
    assert 0 < stats["slot_occupancy"] <= 1 and stats["mean_step_ms"] > 0 and stats["capacity"] == 8
    assert stats["active_rows"] == 0 and stats["pending_rows"] == 0


def test_slots_are_allocated_up_front_or_grown_where_memory_is_short(model, vec, monkeypatch):
    eng = GenerationEngine(model, capacity=16)
    assert eng.n_slots == 16 and eng.decoder.n_slots == 16  # no step later pays for fresh memory
    from deployments.engine.decoder import SlotDecoder

    real = SlotDecoder.ensure_slots

    def short(self, n):  # memory for 12 slots only
        if n > 12:
            raise RuntimeError("CPU: can't allocate memory")
        real(self, n)

    monkeypatch.setattr(SlotDecoder, "ensure_slots", short)
    lazy = GenerationEngine(model, capacity=16, fixed_shapes=False)
    assert lazy.n_slots == 8  # what the engine starts from
    reqs = mixed_requests(model, vec, n=14)
    ids = lazy.add(reqs)
    got = {i: [] for i in ids}
    while not lazy.idle:
        for e in lazy.step().events:
            got[e.row].append(e)
    for r, i in zip(reqs, ids):  # admission waited for memory; every row as alone
        same_events(generate(model, [r], capacity=16)[0], got[i])
