"""What ModelDeployment sends SAEShard: a call whose items are all one request's says so (the shard may then burst
its encodes on an idle CPU, engine.compute); a call carrying several requests' items does not."""

from __future__ import annotations

import numpy as np

from deployments import protocol as P
from deployments.model import shard_batch


def test_a_shard_call_says_whether_its_items_are_one_requests():
    acts = np.zeros((3, 4), dtype=np.float32)
    item = lambda sae_id: P.ShardItem(sae_id, acts, P.RankOp(5))  # noqa: E731
    lone = shard_batch([(0, 0, item("a")), (0, 1, item("b")), (0, 2, item("c"))])  # activation/all over 3 SAEs
    assert lone.one_request and [it.sae_id for it in lone.items] == ["a", "b", "c"]
    mixed = shard_batch([(0, 0, item("a")), (1, 0, item("a"))])  # two requests' prompts for one SAE
    assert not mixed.one_request and len(mixed.items) == 2
    assert not P.ShardBatch([item("a")]).one_request  # a handle caller's batch: not assumed
