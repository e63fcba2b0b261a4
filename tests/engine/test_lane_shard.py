"""A shard call split between lanes (SAEShard's wide tasks, on the real replica class, the demo pack's SAEs and no
Ray cluster): the call's items in groups of about equal multiply-adds (engine.compute.lane_groups), each group
answered on its own thread, every answer that of the item alone and of SAE Lens."""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading

import numpy as np
import pytest
import torch

from deployments import protocol as P
from deployments.engine.compute import lane_groups
from tests import reference as R
from tests.compare import assert_same_answer
from tests.engine.local_replicas import demo_shard


def test_lane_groups_cover_every_item_within_4_3_of_the_best_split():
    rng = random.Random(0)
    for _ in range(300):
        n, lanes = rng.randint(1, 7), rng.randint(1, 3)
        costs = [rng.choice([rng.randint(1, 9), rng.random() * 50]) for _ in range(n)]
        groups = lane_groups(costs, lanes)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert 1 <= len(groups) <= min(lanes, n) and all(groups) and all(g == sorted(g) for g in groups)
        # brute force: every assignment of the items to ``lanes`` groups
        m = min(lanes, n)
        best = min(max(sum(c for c, a in zip(costs, assign) if a == g) for g in range(m))
                   for assign in itertools.product(range(m), repeat=n))
        worst = max(sum(costs[i] for i in g) for g in groups)
        assert worst <= (4 / 3 - 1 / (3 * m)) * best + 1e-9, (costs, lanes, groups)
    assert lane_groups([], 2) == [] and lane_groups([5.0], 3) == [[0]]
    assert lane_groups([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]  # equal work, evenly


@pytest.fixture(scope="module")
def shard(pack_dir):
    with demo_shard(pack_dir, burst_torch_threads=2) as r:
        assert r.compute.max_lanes == 2
        yield r


def _loaded(shard, sae_id):
    from deployments.engine.loading import load_sae
    from deployments.sae_shard import LoadedSAE

    spec = shard.specs[sae_id]
    return LoadedSAE(spec, shard.compute.call(load_sae, spec, "cpu", "float32"))


def _json(answer):
    """An answer as the JSON tree tests.compare reads (FeatureActivation rows, top-k pairs, sparse maps)."""
    if dataclasses.is_dataclass(answer):
        return {k: _json(v) for k, v in dataclasses.asdict(answer).items() if v is not None}
    if isinstance(answer, dict):
        return {str(k): _json(v) for k, v in answer.items()}
    if isinstance(answer, (list, tuple)):
        return [_json(v) for v in answer]
    if isinstance(answer, (np.ndarray, torch.Tensor)):
        return _json(answer.tolist())
    return answer


def test_a_call_split_between_lanes_answers_each_item_as_alone_and_as_sae_lens(pack_dir, shard):
    texts = ["the cat sat on the mat and looked at the dog", "red blue", "one two three four five six seven",
             "the bird flew over the river to the tall green tree by the old house", "x y", "a"]
    ids = ["0-res-demo", "2-res-demo"]
    saes = {i: _loaded(shard, i) for i in ids}
    ops = [P.RankOp(8), P.TopkOp(3), P.SingleOp(5, drop_first=True), P.ActiveOp(), P.RankOp(4, ignore_bos=True)]
    items = []
    for k, (text, sae_id) in enumerate(itertools.product(texts, ids)):
        _, acts = R.hook_acts(str(pack_dir), text, saes[sae_id].spec.hook_name)
        items.append(P.ShardItem(sae_id, acts.numpy().copy(), ops[k % len(ops)]))

    threads, real = [], shard._answer_items

    def spy(saes_, items_, sizes):  # the real answering, noting the thread and items of each call
        threads.append((threading.get_ident(), len(items_)))
        return real(saes_, items_, sizes)

    def wide():  # what a wide task given two lanes runs (engine.compute sets lanes only inside such a task)
        shard.compute.lanes = 2
        try:
            return shard._run_items(saes, items)
        finally:
            shard.compute.lanes = 1

    before = shard.stats["lane_batches"]
    shard._answer_items = spy
    try:
        split = shard.compute.call(wide)
    finally:
        del shard._answer_items
    assert shard.stats["lane_batches"] == before + 1
    groups = lane_groups([shard._madds(saes, it) for it in items], 2)
    assert len({t for t, _ in threads}) == 2, threads  # two calls, on two threads
    assert sorted(n for _, n in threads) == sorted(len(g) for g in groups)
    assert shard._madd_s is not None and shard._madd_s > 0  # measured, for the next call's choice

    for it, got in zip(items, split):
        alone = shard.compute.call(shard._answer_items, saes, [it], [])[0]
        assert_same_answer(_json(got), _json(alone))
    # SAE Lens on the same activations: activation/all's ranking by max, top features and their values
    for it, got in zip(items, split):
        if not isinstance(it.op, P.RankOp):
            continue
        layer = int(it.sae_id.split("-")[0])
        with torch.no_grad():
            feats = R.sae(str(pack_dir), "res-demo", layer).encode(torch.as_tensor(it.acts))
        want = R.ranked([feats], it.op.num_results, [], it.op.ignore_bos)
        keys = ("index", "values", "max_value", "max_value_index")
        assert_same_answer([{k: v for k, v in _json(row).items() if k in keys} for row in got],
                           [dict(zip(keys, (feat, vals, mx, at))) for _, feat, mx, at, _, vals in want])


def test_only_calls_worth_two_lanes_go_wide(shard):
    saes = {"1-res-demo": _loaded(shard, "1-res-demo")}
    d_in, d_sae = shard.specs["1-res-demo"].d_in, shard.specs["1-res-demo"].d_sae
    item = P.ShardItem("1-res-demo", np.zeros((4, d_in), dtype=np.float32), P.RankOp(5))
    single = P.ShardItem("1-res-demo", np.zeros((4, d_in), dtype=np.float32), P.SingleOp(3))
    saved = shard._madd_s
    try:
        shard._madd_s = None  # nothing measured yet
        assert not shard._worth_lanes(saes, [item] * 4)
        shard._madd_s = 2 * shard.min_lane_work_s / (4 * 4 * d_in * d_sae)  # four items: exactly two lanes' least work
        assert shard._worth_lanes(saes, [item] * 4) and not shard._worth_lanes(saes, [item] * 3)
        assert not shard._worth_lanes(saes, [item])  # one item never splits
        # activation/single on a separable SAE encodes one column: its work is d_sae times smaller
        assert shard._madds(saes, single) * d_sae == shard._madds(saes, item)
        assert not shard._worth_lanes(saes, [single] * 4)
    finally:
        shard._madd_s = saved
