"""Shard-side merges (protocol.MergeGroup): an activation/all job's rankings on one SAEShard replica come back
merged, so only rows that can make the job's final ``num_results`` cross processes. The merge of partial merges
must be the merge of everything, ties and NaN scores included; the real replica class answers a call with merge
groups as merging its unmerged answers would, and as SAE Lens ranks by brute force."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random

import numpy as np
import pytest
import torch

from deployments import protocol as P
from deployments.engine import features as F
from deployments.model import shard_batch
from deployments.sae_shard import merge_answers
from tests import reference as R
from tests.compare import assert_same_answer
from tests.engine.local_replicas import demo_shard


def _row(rng: random.Random, index: int) -> P.FeatureActivation:
    # few distinct scores, so that ties (by source, then index) decide much of the order; now and then a NaN
    pick = lambda: rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, float("nan")] if rng.random() < 0.1 else [0.0, 0.5, 1.0, 2.0])  # noqa: E731
    return P.FeatureActivation(index=index, values=[pick()], max_value=pick(), max_value_index=0, sum_values=pick())


def _key(pair, by_sum):  # identity of a pair (NaN != NaN, so rows are not compared by value)
    return pair[0], pair[1].index, id(pair[1])


def test_merging_partial_merges_gives_the_merge_of_everything():
    rng = random.Random(0)
    for case in range(400):
        n_src, n, by_sum = rng.randint(1, 6), rng.randint(1, 12), rng.random() < 0.5
        per_source = [[_row(rng, i) for i in rng.sample(range(40), rng.randint(0, 10))] for _ in range(n_src)]
        whole = F.merge_ranked(per_source, n, by_sum)
        # any split of the sources into shares, each merged on its own (a shard replica's), then the shares merged
        shares: dict[int, list] = {}
        for src, rows in enumerate(per_source):
            shares.setdefault(rng.randrange(3), []).extend((src, r) for r in rows)
        parts = [p for share in shares.values() for p in F.merge_pairs(share, n, by_sum)]
        assert [_key(p, by_sum) for p in F.merge_pairs(parts, n, by_sum)] == [_key(p, by_sum) for p in whole], case
        # score descending, NaN first, ties by source then index
        keys = [(0, 0.0, s, r.index) if math.isnan(r.score(by_sum)) else (1, -r.score(by_sum), s, r.index) for s, r in whole]
        assert keys == sorted(keys) and len(whole) == min(n, sum(map(len, per_source)))


def test_a_call_merges_each_jobs_ranked_items_with_two_or_more_in_it():
    acts = np.zeros((3, 4), dtype=np.float32)
    item = lambda sae_id, op=None: P.ShardItem(sae_id, acts, op or P.RankOp(5))  # noqa: E731
    entries = [(0, 0, item("a")), (1, 0, item("a")), (0, 2, item("b")), (1, 1, item("c", P.TopkOp(2))), (2, 1, item("b")),
               (0, 1, item("c"))]
    batch = shard_batch(entries, {0: (7, False), 2: (3, True)})
    # job 0 has three ranked items here; job 1 merges nothing (not asked); job 2 has one item: nothing to merge
    assert batch.merges == [P.MergeGroup([0, 2, 5], [0, 2, 1], 7, False)]
    assert shard_batch(entries).merges == []


def test_merge_answers_keeps_failures_and_puts_the_merge_on_the_first_answered_item():
    rows = lambda *ix: [P.FeatureActivation(i, [float(i)], float(i), 0, 0.0) for i in ix]  # noqa: E731
    err = P.ItemError("bad", 400)
    answers = [err, rows(3, 1), P.NotHere(), rows(2), ("topk",)]
    out = merge_answers(answers, [P.MergeGroup([0, 1, 2, 3], [0, 1, 2, 3], 2, False)])
    assert out[0] is err and isinstance(out[2], P.NotHere) and out[4] == ("topk",)
    assert [(s, r.index) for s, r in out[1].pairs] == [(1, 3), (3, 2)] and out[3] == P.MergedRanking()
    assert merge_answers(answers, []) is answers
    # a handle caller's malformed group (positions out of range) merges what it can
    assert merge_answers(answers, [P.MergeGroup([9, 3], [0, 1], 2, False)])[3].pairs[0][1].index == 2


@pytest.mark.parametrize("dfa", [None, [0.5, -1.0]])
def test_a_feature_row_pickles_to_itself(dfa):
    row = P.FeatureActivation(index=7, values=[1.0, float("nan"), -0.0], max_value=1.0, max_value_index=0,
                              sum_values=2.5, dfa_values=dfa)
    back = pickle.loads(pickle.dumps(row, protocol=5))
    assert dataclasses.asdict(back) == {**dataclasses.asdict(row), "values": back.values}
    assert math.isnan(back.values[1]) and math.copysign(1, back.values[2]) == -1 and back.dfa_max_value == row.dfa_max_value


@pytest.fixture(scope="module")
def shard(pack_dir):
    with demo_shard(pack_dir) as s:
        yield s


def _json(answer):
    if dataclasses.is_dataclass(answer):
        return {k: _json(v) for k, v in dataclasses.asdict(answer).items() if v is not None}
    if isinstance(answer, (list, tuple)):
        return [_json(v) for v in answer]
    return answer


@pytest.mark.parametrize("sort_idx", [[], [1, 3]])
def test_the_real_shard_merges_as_the_model_would_and_as_sae_lens_ranks(pack_dir, shard, sort_idx):
    from deployments.engine.loading import load_sae
    from deployments.sae_shard import LoadedSAE

    ids = ["0-res-demo", "1-res-demo", "3-res-demo"]
    saes = {i: LoadedSAE(shard.specs[i], load_sae(shard.specs[i], "cpu", "float32")) for i in ids}
    texts = ["the cat sat on the mat and looked at the dog", "one two three four five", "the bird flew over the river"]
    n, by_sum = 9, bool(sort_idx)
    entries, acts_of = [], {}
    for k, text in enumerate(texts):
        for t, sae_id in enumerate(ids):
            _, acts = R.hook_acts(str(pack_dir), text, saes[sae_id].spec.hook_name)
            acts_of[k, t] = acts
            entries.append((k, t, P.ShardItem(sae_id, acts.numpy().copy(), P.RankOp(n, list(sort_idx), k != 1))))
    batch = shard_batch(entries, {k: (n, by_sum) for k in range(len(texts))})
    assert len(batch.merges) == len(texts)
    merged = shard.compute.call(shard._run_items, saes, batch.items, batch.merges)
    plain = shard.compute.call(shard._run_items, saes, batch.items)
    for k, text in enumerate(texts):
        mine = [(pos, e) for pos, e in enumerate(entries) if e[0] == k]
        got = [p for pos, _ in mine for p in merged[pos].pairs]
        assert sum(bool(merged[pos].pairs) for pos, _ in mine) == 1 and len(got) == n
        want = F.merge_pairs([(t, row) for pos, (_, t, _) in mine for row in plain[pos]], n, by_sum)
        assert [(s, r.index) for s, r in got] == [(s, r.index) for s, r in want]
        assert_same_answer(_json([r for _, r in got]), _json([r for _, r in want]))
        # SAE Lens by brute force on the same activations: scores strictly, identities away from near-ties
        with torch.no_grad():
            feats = [R.sae(str(pack_dir), "res-demo", int(i.split("-")[0])).encode(acts_of[k, t]) for t, i in enumerate(ids)]
        ref = R.ranked(feats, n, sort_idx, k != 1)
        for (s, row), (rs, rf, rmax, _, rsum, _) in zip(got, ref):
            assert math.isclose(row.score(by_sum), rsum if by_sum else rmax, rel_tol=1e-4, abs_tol=1e-5)


def _codes(rng: torch.Generator, rows: int, d_sae: int, dtype) -> torch.Tensor:
    # few distinct values, signed zeros among them: ties decide much of the order
    levels = torch.tensor([0.0, -0.0, 0.5, 1.0, 2.0, 3.0])
    return levels[torch.randint(0, len(levels), (rows, d_sae), generator=rng)].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merging_lazy_rankings_equals_merging_their_rows(dtype):
    """merge_rankings (one stable sort over the rankings' scores, rows built for the winners only) answers as
    merge_pairs does on every row: the same (source, row) pairs in the same order, ties by source then index."""
    rng = torch.Generator().manual_seed(0)
    prng = random.Random(0)
    for case in range(200):
        n, d_sae = prng.randint(1, 6), prng.choice([3, 8, 40])
        lengths = [prng.randint(0, 5) for _ in range(n)]
        ks = [prng.choice([0, 1, 3, 8, 50]) for _ in range(n)]
        bos = [prng.random() < 0.5 for _ in range(n)]
        lazy = F.rank_many(_codes(rng, sum(lengths), d_sae, dtype), lengths, ks, bos, lazy=True)
        assert all(isinstance(r, F.Ranking) for r in lazy)
        sources = prng.sample(range(10), n)  # task indices, in any order
        num = prng.randint(-3, 30)  # a negative count slices as merge_pairs slices
        got = F.merge_rankings(list(zip(sources, lazy)), num)
        want = F.merge_pairs([(s, row) for s, r in zip(sources, lazy) for row in r.rows()], num, False)
        assert got == want, case


def test_lazy_rankings_build_the_rows_rank_many_gives():
    rng = torch.Generator().manual_seed(1)
    lengths, ks, bos = [4, 0, 1, 6], [3, 2, 9, 40], [True, False, True, False]
    codes = _codes(rng, sum(lengths), 16, torch.float32)
    lazy = F.rank_many(codes, lengths, ks, bos, lazy=True)
    assert [r.rows() for r in lazy] == F.rank_many(codes, lengths, ks, bos)
    assert [len(r) for r in lazy] == [3, 2, 9, 16]


def test_the_rank_queue_answers_each_item_as_rank_features_alone(monkeypatch):
    """Plain rankings of several SAEs' chunks join in one rank_many call while their codes are small and alike
    (width, dtype), and each item's answer is what rank_features gives it alone, whatever was joined."""
    from deployments import sae_shard

    rng = torch.Generator().manual_seed(2)
    chunks = [(16, torch.float32, [3, 5]), (16, torch.float32, [2]), (8, torch.float32, [4, 1]),
              (16, torch.bfloat16, [2, 2]), (16, torch.bfloat16, [6])]
    calls = []
    real = F.rank_many
    monkeypatch.setattr(F, "rank_many", lambda codes, lengths, *a, **k: calls.append(len(lengths)) or real(codes, lengths, *a, **k))
    for join in (sae_shard.JOIN_RANK_ELEMENTS, 0):
        monkeypatch.setattr(sae_shard, "JOIN_RANK_ELEMENTS", join)
        calls.clear()
        items, parts_of, out = [], {}, []
        queue = sae_shard._RankQueue(items, out, "cpu")
        for d_sae, dtype, lengths in chunks:
            idx = []
            for ln in lengths:
                idx.append(len(items))
                parts_of[len(items)] = _codes(rng, ln, d_sae, dtype)
                items.append(P.ShardItem("x", np.zeros((ln, 2), np.float32), P.RankOp(4, [], len(items) % 2 == 0)))
                out.append(None)
            queue.add(None, idx, [parts_of[i] for i in idx])
        queue.flush()
        for i, it in enumerate(items):
            got = out[i].rows() if isinstance(out[i], F.Ranking) else out[i]
            assert got == F.rank_features(parts_of[i], 4, [], it.op.ignore_bos), (join, i)
        # joined: the two float32 width-16 chunks, then the width-8 one, then both bfloat16 ones; apart: each chunk
        # of two or more prompts (a lone prompt goes to rank_features)
        assert calls == ([3, 2, 3] if join else [2, 2, 2]), join
