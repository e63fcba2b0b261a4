"""Prefill shares the blocks before the first steered one between rows of one prompt (a request's STEERED and
DEFAULT, or one prompt sent several times): every row's tokens and logprobs stay bit-identical to its run alone
and equal to TransformerLens's ``generate`` with the same hook (Ray-free, 4-layer random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.engine.generate import GenerationEngine, GenerationRequest, generate, tokens_of
from deployments.engine.pack import load_model_dir
from deployments.protocol import METHODS

N_NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    pack = write_random_pack(tmp_path_factory.mktemp("sharedpack"), n_layers=4, d_model=32, n_heads=4, n_ctx=96,
                             d_sae=64, vocab_size=300, seed=5)
    m = load_model_dir(pack)
    m.eval()
    return m


@pytest.fixture(scope="module")
def vec(model):
    return (np.random.RandomState(1).randn(model.cfg.d_model) * 3).astype(np.float32)


def prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [model.tokenizer.bos_token_id] + torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()


def run(model, reqs, **kw):
    """Every request added at once (one prefill); events per request, and the engine's stats."""
    eng = GenerationEngine(model, capacity=16, **kw)
    ids = eng.add(reqs)
    got = {i: [] for i in ids}
    while not eng.idle:
        res = eng.step()
        assert not res.failed
        for e in res.events:
            got[e.row].append(e)
    return [got[i] for i in ids], eng.stats


def same_events(a, b):
    assert tokens_of(a) == tokens_of(b)
    assert [e.logprob for e in a] == [e.logprob for e in b]  # bit for bit
    assert [e.top_logprobs for e in a] == [e.top_logprobs for e in b]


def pair(model, p, hook, vec, method=St.SIMPLE_ADDITIVE, coeff=3.0, **kw):
    common = dict(tokens=p, max_new_tokens=N_NEW, n_logprobs=3, stop_tokens=[], **kw)
    return [GenerationRequest(**common, steering=[St.SteerVector(hook, vec, coeff, method)]), GenerationRequest(**common)]


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_post", "blocks.3.attn.hook_z", "blocks.1.hook_resid_pre",
                                  "ln_final.hook_normalized"])
def test_steered_and_default_share_the_blocks_before_the_hook(model, vec, hook):
    width = model.cfg.d_model if "hook_z" not in hook else model.cfg.n_heads * model.cfg.d_head
    v = np.resize(vec, width).astype(np.float32)
    reqs = [*pair(model, prompt(model, 9, 0), hook, v, temperature=0.8, seed=4),
            *pair(model, prompt(model, 5, 1), hook, v, St.ORTHOGONAL_DECOMP, 2.0)]
    together, stats = run(model, reqs)
    assert stats["prefill_rows_shared"] == 2
    for r, ev in zip(reqs, together):
        same_events(generate(model, [r])[0], ev)
    assert tokens_of(together[0]) != tokens_of(together[1])  # the steering did something


def test_shared_prefill_matches_transformer_lens_generate(model, vec):
    hook = "blocks.2.hook_resid_post"
    p = prompt(model, 7, 2)
    reqs = pair(model, p, hook, vec, coeff=4.0)
    together, stats = run(model, reqs)
    assert stats["prefill_rows_shared"] == 1
    vt = torch.as_tensor(vec)
    for steer, ev in zip((True, False), together):
        hooks = [(hook, lambda act, hook: act + 4.0 * vt)] if steer else []
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            ref = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False,
                                 verbose=False, use_past_kv_cache=True)[0, len(p):].tolist()
        assert tokens_of(ev) == ref


def test_one_prompt_sent_several_times_and_rows_of_their_own(model, vec):
    """Three requests of one prompt (unsteered, different seeds) share every block; beside them, two rows of another
    prompt steered at block 0 share nothing, and their steering is applied while the first three are one stream."""
    p = prompt(model, 6, 3)
    same = [GenerationRequest(tokens=p, max_new_tokens=N_NEW, temperature=1.0, seed=s, n_logprobs=2, stop_tokens=[])
            for s in (1, 2, 3)]
    own = [GenerationRequest(tokens=prompt(model, 11, 4), max_new_tokens=N_NEW, n_logprobs=2, stop_tokens=[],
                             steering=[St.SteerVector("blocks.0.hook_resid_post", vec, 2.0, m)]) for m in METHODS[:2]]
    own.append(GenerationRequest(tokens=prompt(model, 3, 5), max_new_tokens=N_NEW, stop_tokens=[]))
    reqs = [same[0], own[0], same[1], own[1], same[2], own[2]]
    together, stats = run(model, reqs)
    assert stats["prefill_rows_shared"] == 2  # not own[1]: its prompt's group steers at block 0
    for r, ev in zip(reqs, together):
        same_events(generate(model, [r])[0], ev)


def test_a_row_steered_before_the_split_leaves_its_prompt_unshared(model, vec):
    """A prompt whose STEERED row steers at the embedding shares nothing; the engine still matches rows alone."""
    reqs = pair(model, prompt(model, 8, 6), "hook_embed", vec)
    together, stats = run(model, reqs)
    assert stats["prefill_rows_shared"] == 0
    for r, ev in zip(reqs, together):
        same_events(generate(model, [r])[0], ev)


def test_a_row_failing_in_a_shared_stream_fails_alone(model, vec):
    """Steering that overflows at block 3 fails the STEERED row; its DEFAULT twin, prefilled in the same stream up to
    block 3, and a row steered (finitely) at block 0 finish as they would alone."""
    p = prompt(model, 6, 7)
    v = (vec / np.linalg.norm(vec)).astype(np.float32)  # finite when checked, infinite once (coeff - 1) * h.v is formed
    huge = pair(model, p, "blocks.3.hook_resid_post", v, St.ORTHOGONAL_DECOMP, coeff=3e38)
    early = GenerationRequest(tokens=prompt(model, 4, 8), max_new_tokens=N_NEW, stop_tokens=[],
                              steering=[St.SteerVector("blocks.0.hook_resid_post", vec, 2.0)])
    eng = GenerationEngine(model, capacity=8)
    ids = eng.add([*huge, early])
    got = {i: [] for i in ids}
    failed = {}
    while not eng.idle:
        res = eng.step()
        failed.update(res.failed)
        for e in res.events:
            got[e.row].append(e)
    assert set(failed) == {ids[0]} and "blocks.3.hook_resid_post" in str(failed[ids[0]])
    assert eng.stats["prefill_rows_shared"] == 1
    same_events(generate(model, [huge[1]])[0], got[ids[1]])
    same_events(generate(model, [early])[0], got[ids[2]])


def test_groups_split_at_their_own_blocks(model, vec):
    """Three groups in one prefill, split at blocks 1, 3 and after the last, and a row of its own steered at block 2
    in between: four phases of streams, every row as it is alone."""
    reqs = [*pair(model, prompt(model, 7, 10), "blocks.1.hook_resid_post", vec),
            *pair(model, prompt(model, 7, 11), "blocks.3.mlp.hook_post", np.resize(vec, model.cfg.d_mlp)),
            GenerationRequest(tokens=prompt(model, 4, 12), max_new_tokens=N_NEW, stop_tokens=[],
                              steering=[St.SteerVector("blocks.2.hook_resid_pre", vec, 2.0, St.PROJECTION_CAP)]),
            *[GenerationRequest(tokens=prompt(model, 9, 13), max_new_tokens=N_NEW, temperature=0.9, seed=s,
                                n_logprobs=1, stop_tokens=[]) for s in (5, 6)]]
    eng = GenerationEngine(model, capacity=16)
    share = eng.decoder.shared_prefix([r.tokens for r in reqs], [[sv.hook for sv in r.steering] for r in reqs])
    assert [(p.start, p.end, p.lead.shape[0]) for p in share.phases] == [(0, 1, 4), (1, 3, 5), (3, 4, 6)]
    together, stats = run(model, reqs)
    assert stats["prefill_rows_shared"] == 3
    for r, ev in zip(reqs, together):
        same_events(generate(model, [r])[0], ev)
