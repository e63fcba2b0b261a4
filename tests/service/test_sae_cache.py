"""The SAE cache of SAEShard under small budgets: multiplexed routing, LRU eviction by count and by bytes,
one load for many concurrent misses, and correct answers while SAEs churn.

SAEShard is deployed on its own (a handle, no HTTP) over a seeded random 4-layer pack, and its answers are
checked against the engine run directly on the same weights; then the whole app on the demo pack with room
for one SAE is checked against the main app's answers over HTTP.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tests.compare import assert_same_answer, same_ranking

from .conftest import MODEL_ID, SECRET

pytestmark = pytest.mark.usefixtures("serve_app")  # Serve is started (on the session's port) before these apps

TIMEOUT_S = 60
SMALL = {"num_cpus": 0.05}  # these extra replicas must fit beside the main app on 2 CPUs


@pytest.fixture(scope="module")
def cache_pack(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    return write_random_pack(tmp_path_factory.mktemp("cache-pack"), n_layers=4, d_model=32, n_heads=4, d_sae=128,
                             vocab_size=400, seed=7)


@pytest.fixture(scope="module")
def specs(cache_pack):
    from deployments.specs import resolve_sae_specs

    s = resolve_sae_specs(str(cache_pack), ["res-demo"])
    assert [x.id for x in s] == [f"{i}-res-demo" for i in range(4)]
    return s


@pytest.fixture(scope="module")
def direct(specs):
    """The engine on the same SAEs, no Ray: ``direct(sae_id, acts, k)`` -> [(index, max_value, argmax)]."""
    from deployments.engine import features as F
    from deployments.engine.loading import load_sae

    saes = {s.id: load_sae(s, "cpu", "float32") for s in specs}

    def run(sae_id, acts, k):
        with torch.no_grad():
            rows = F.rank_features(F.encode(saes[sae_id], acts), k, [], False, None)
        return [(r.index, r.max_value, r.max_value_index) for r in rows]

    run.saes = saes
    return run


def acts_for(seed: int, seq: int = 6, d_in: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((seq, d_in)).astype(np.float32)


def shard_app(specs, *, replicas: int = 1, max_loaded_saes: int = 64, max_sae_bytes: int | None = None):
    from deployments.sae_shard import SAEShard

    d = SAEShard.options(num_replicas=replicas, autoscaling_config=None, ray_actor_options=SMALL)
    return d.bind([s.to_dict() for s in specs], "cpu", "float32", max_loaded_saes, max_sae_bytes)


def one_sae_bytes(specs, direct) -> int:
    """What a resident SAE counts: its weights and its cosine index (row norms, for a float32 decoder)."""
    from deployments.engine import geometry as G
    from deployments.engine.loading import sae_nbytes

    return sae_nbytes(direct.saes[specs[0].id]) + G.DecoderIndex.nbytes_for(specs[0].d_sae, specs[0].d_in, torch.float32)


def full_app_args(pack_dir):
    """The whole app on the demo pack with room for one SAE (test_full_app_with_room_for_one_sae_matches_main_app)."""
    from ingress.args import AppArgs

    fixed = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": SMALL}
    return AppArgs(model=str(pack_dir), sae_sets=["res-demo"], secret=SECRET, token_limit=64, max_loaded_saes=1,
                   deployment_options={"SAEServeIngress": fixed, "ModelDeployment": fixed, "SAEShard": fixed})


# The count test and the churn test share one app (room for two SAEs): the count test, first in the file, reads the
# replica's counters from zero; the churn test counts from where it finds them.
LRU_APP = "sae-cache-lru"


@pytest.fixture(scope="module")
def apps(request, serve_app, specs, direct, pack_dir):
    """The apps of the selected tests of this module, deployed together once Serve runs (serve_app): their seven
    replicas start side by side. ``{name: ingress handle}``; a test deletes an app only it uses, the rest go here."""
    from ray import serve

    from ingress.app import build_app

    builders = {
        "test_count_budget_evicts_lru": (LRU_APP, None, lambda: shard_app(specs, max_loaded_saes=2)),
        "test_byte_budget_and_concurrent_miss_loads_once":
            ("sae-cache-bytes", None, lambda: shard_app(specs, max_sae_bytes=one_sae_bytes(specs, direct))),  # room for one
        "test_mixed_concurrent_churn_stays_correct": (LRU_APP, None, lambda: shard_app(specs, max_loaded_saes=2)),
        "test_requests_go_to_the_replica_holding_the_sae":
            ("sae-cache-routing", None, lambda: shard_app(specs, replicas=2, max_loaded_saes=2)),
        "test_full_app_with_room_for_one_sae_matches_main_app":
            ("saecache", "/saecache", lambda: build_app(full_app_args(pack_dir))),
    }
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    wanted = {name: (prefix, build) for test, (name, prefix, build) in builders.items() if test in selected}
    targets = [serve.RunTarget(target=build(), name=name, route_prefix=prefix) for name, (prefix, build) in wanted.items()]
    handles = serve.run_many(targets) if targets else []
    yield {t.name: h for t, h in zip(targets, handles)}
    if LRU_APP in wanted:
        delete(LRU_APP)


def batch(sae_id: str, acts: np.ndarray, k: int):
    """A one-item SAEShard batch ranking ``acts``' top ``k`` features on ``sae_id`` (what ModelDeployment sends)."""
    from deployments import protocol as P

    return P.ShardBatch([P.ShardItem(sae_id, acts, P.RankOp(k))])


def rank(h, sae_id: str, acts: np.ndarray, k: int = 8):
    (rows,) = h.options(multiplexed_model_id=sae_id).run.remote(batch(sae_id, acts, k)).result(timeout_s=TIMEOUT_S).results
    return [(r.index, r.max_value, r.max_value_index) for r in rows]


def same(got, want) -> bool:
    """The same top features and maxima up to float32 batch drift (the shard may batch encodes; tests/compare.py)."""
    return same_ranking([(i, v) for i, v, _ in got], [(i, v) for i, v, _ in want])


def replica_metrics(h, n: int, tries: int = 60) -> dict[str, dict]:
    """metrics() of every replica (routing without an SAE id is random over replicas: ask until all answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        m = h.metrics.remote().result(timeout_s=TIMEOUT_S)
        seen[m["replica"]] = m
        if len(seen) == n:
            return seen
    raise AssertionError(f"only {len(seen)} of {n} replicas answered metrics()")


def delete(name: str) -> None:
    from ray import serve

    serve.delete(name)


def test_count_budget_evicts_lru(specs, direct, apps):
    ids = [s.id for s in specs]
    h = apps[LRU_APP]  # max_loaded_saes=2, fresh
    m0 = h.metrics.remote().result(timeout_s=TIMEOUT_S)
    assert (m0["loads"], m0["evictions"], m0["resident"]) == (0, 0, [])

    def step(sae_id, seed):
        a = acts_for(seed)
        assert same(rank(h, sae_id, a), direct(sae_id, a, 8)), sae_id
        return h.metrics.remote().result(timeout_s=TIMEOUT_S)

    m = step(ids[0], 1)
    assert (m["loads"], m["hits"], m["resident"]) == (1, 0, [ids[0]])
    m = step(ids[1], 2)
    assert (m["loads"], m["evictions"], m["resident"]) == (2, 0, [ids[0], ids[1]])  # least recently used first
    m = step(ids[0], 3)  # a hit: no load, and ids[0] becomes most recently used
    assert (m["loads"], m["hits"], m["resident"]) == (2, 1, [ids[1], ids[0]])
    m = step(ids[2], 4)  # over the count budget: ids[1] (LRU) goes
    assert (m["loads"], m["evictions"], m["resident"]) == (3, 1, [ids[0], ids[2]])
    m = step(ids[3], 5)
    assert (m["loads"], m["evictions"], m["resident"]) == (4, 2, [ids[2], ids[3]])
    m = step(ids[1], 6)  # evicted earlier: loaded again, same answers
    assert (m["loads"], m["evictions"], m["resident"]) == (5, 3, [ids[3], ids[1]])
    from deployments.sae_shard import LoadedSAE

    nbytes = {s.id: LoadedSAE(s, direct.saes[s.id]).nbytes for s in specs}  # weights + cosine index
    assert m["resident_bytes"] == nbytes[ids[3]] + nbytes[ids[1]]
    assert m["requests"] == 6 and m["hits"] == 1


def test_byte_budget_and_concurrent_miss_loads_once(specs, direct, apps):
    from deployments.sae_shard import estimated_nbytes

    ids = [s.id for s in specs]
    one = one_sae_bytes(specs, direct)
    assert estimated_nbytes(specs[0], "float32") == one  # the budget check before loading is exact here
    h = apps["sae-cache-bytes"]  # max_sae_bytes=one: room for one SAE
    try:
        for n, (sae_id, seed) in enumerate([(ids[0], 1), (ids[1], 2), (ids[0], 3), (ids[2], 4)], 1):
            a = acts_for(seed)
            assert same(rank(h, sae_id, a), direct(sae_id, a, 8)), sae_id
            m = h.metrics.remote().result(timeout_s=TIMEOUT_S)
            assert m["resident"] == [sae_id] and m["resident_bytes"] == one
            assert (m["loads"], m["evictions"]) == (n, n - 1)

        # 16 concurrent requests for an SAE that is not resident: one load, fifteen hits, sixteen right answers.
        before = h.metrics.remote().result(timeout_s=TIMEOUT_S)
        inputs = [acts_for(100 + i, seq=3 + i % 5) for i in range(16)]
        sh = h.options(multiplexed_model_id=ids[3])
        responses = [sh.run.remote(batch(ids[3], a, 8)) for a in inputs]
        results = [[(r.index, r.max_value, r.max_value_index) for r in resp.result(timeout_s=TIMEOUT_S).results[0]]
                   for resp in responses]
        for a, got in zip(inputs, results):
            assert same(got, direct(ids[3], a, 8))
        after = h.metrics.remote().result(timeout_s=TIMEOUT_S)
        assert after["loads"] - before["loads"] == 1
        assert after["requests"] - before["requests"] == 16
        assert after["hits"] - before["hits"] == 15
        assert after["evictions"] - before["evictions"] == 1 and after["resident"] == [ids[3]]
    finally:
        delete("sae-cache-bytes")


def test_mixed_concurrent_churn_stays_correct(specs, direct, apps):
    """Many requests at once over 4 SAEs with room for 2: evictions wait for SAEs in use; every answer is right."""
    ids = [s.id for s in specs]
    h = apps[LRU_APP]  # max_loaded_saes=2 (after the count test, when both run)
    m0 = h.metrics.remote().result(timeout_s=TIMEOUT_S)
    jobs = [(ids[i % 4], acts_for(200 + i, seq=2 + i % 7)) for i in range(48)]
    for start in range(0, len(jobs), 16):  # waves of 16 concurrent requests
        wave = jobs[start:start + 16]
        responses = [h.options(multiplexed_model_id=i).run.remote(batch(i, a, 8)) for i, a in wave]
        for (sae_id, a), resp in zip(wave, responses):
            got = [(r.index, r.max_value, r.max_value_index) for r in resp.result(timeout_s=TIMEOUT_S).results[0]]
            assert same(got, direct(sae_id, a, 8)), sae_id
    m = h.metrics.remote().result(timeout_s=TIMEOUT_S)
    assert len(m["resident"]) <= 2 and m["requests"] - m0["requests"] == 48
    # every SAE loaded since the replica started is either resident or was evicted
    assert m["evictions"] - m0["evictions"] >= 2 and m["loads"] == m["evictions"] + len(m["resident"])


def test_requests_go_to_the_replica_holding_the_sae(specs, direct, apps):
    """Two replicas with room for two SAEs each hold all four: once each is loaded, no request loads again."""
    ids = [s.id for s in specs]
    h = apps["sae-cache-routing"]  # two replicas, max_loaded_saes=2
    try:
        replica_metrics(h, 2)

        def wait_routed(sae_id):
            """Until routers know which replica holds sae_id (metrics routed by SAE id land on it 5 times running)."""
            run, deadline = 0, time.monotonic() + 30
            while run < 5:
                assert time.monotonic() < deadline, f"routing to {sae_id} never settled"
                m = h.options(multiplexed_model_id=sae_id).metrics.remote().result(timeout_s=TIMEOUT_S)
                run = run + 1 if sae_id in m["resident"] else 0
                time.sleep(0.2)

        for n, sae_id in enumerate(ids):
            a = acts_for(300 + n)
            assert same(rank(h, sae_id, a), direct(sae_id, a, 8))  # a miss: loaded where Serve routed it
            wait_routed(sae_id)
        per = replica_metrics(h, 2)
        assert sum(m["loads"] for m in per.values()) == 4
        assert sorted(len(m["resident"]) for m in per.values()) == [2, 2]  # new SAEs go to the emptier replica
        holder = {sae_id: r for r, m in per.items() for sae_id in m["resident"]}
        assert sorted(holder) == sorted(ids)

        for rnd in range(3):  # every SAE again, sequentially and then all at once: all hits, where they live
            for n, sae_id in enumerate(ids):
                a = acts_for(400 + 10 * rnd + n)
                assert same(rank(h, sae_id, a), direct(sae_id, a, 8))
        responses = [(sae_id, h.options(multiplexed_model_id=sae_id).metrics.remote()) for sae_id in ids]
        for sae_id, resp in responses:
            assert resp.result(timeout_s=TIMEOUT_S)["replica"] == holder[sae_id]
        per = replica_metrics(h, 2)
        assert sum(m["loads"] for m in per.values()) == 4
        assert sum(m["evictions"] for m in per.values()) == 0
        assert sum(m["requests"] for m in per.values()) == 16
    finally:
        delete("sae-cache-routing")


def test_full_app_with_room_for_one_sae_matches_main_app(serve_app, http, apps):
    """The whole app with max_loaded_saes=1 (every request over both SAEs churns the cache) answers exactly as
    the main app does, under concurrency."""
    import httpx
    from ray import serve

    assert "saecache" in apps  # deployed at /saecache (full_app_args)
    try:
        prompts = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird", "fish") for v in ("red", "big", "one")]
        bodies = [dict(prompt=p, model=MODEL_ID, source_set="res-demo", selected_sources=sel, sort_by_token_indexes=[],
                       ignore_bos=True, num_results=10)
                  for p in prompts for sel in ([], ["0-res-demo"], ["1-res-demo"])]
        want = [http.post("/v1/activation/all", json=b).json() for b in bodies]  # the main app's answers

        with httpx.Client(base_url=f"{serve_app}/saecache", timeout=TIMEOUT_S, headers={"X-SECRET-KEY": SECRET}) as c:
            def ask(b):
                r = c.post("/v1/activation/all", json=b)
                assert r.status_code == 200, r.text
                return r.json()

            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(ask, bodies))
        for g, w in zip(got, want):  # computed in other batches than the main app's: up to float32 drift
            assert_same_answer(g, w)

        m = serve.get_deployment_handle("SAEShard", app_name="saecache").metrics.remote().result(timeout_s=TIMEOUT_S)
        assert len(m["resident"]) == 1
        assert m["evictions"] >= 5 and m["loads"] == m["evictions"] + 1  # it churned, and never held two
    finally:
        delete("saecache")
