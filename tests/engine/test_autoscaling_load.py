"""deployments.autoscaling: the computing replicas scale on the work they hold. The policy runs on Serve's own
AutoscalingContext and AutoscalingConfig; the replicas' load comes from the real ModelDeployment and SAEShard
classes on the demo pack (in process, no Ray cluster), counted while their calls are in flight."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments import protocol as P
from deployments.autoscaling import LOAD_METRIC, POLICY, load_policy, with_load_policy
from tests.engine.local_replicas import demo_model, demo_shard


def _ctx(replicas: int, serve_count: float, reported: list[float] | None, target: float = 16):
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target)
    metrics = None if reported is None else {LOAD_METRIC: {f"r{i}": v for i, v in enumerate(reported)}}
    return AutoscalingContext(
        deployment_id=None, deployment_name="ModelDeployment", app_name="saeserve", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=serve_count, total_queued_requests=0,
        aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=config)


def test_the_policy_scales_on_the_larger_of_the_reported_load_and_serves_count():
    # one replica holding 40 prompts in two batched calls: Serve counts 2, the replica reports 40
    assert load_policy(_ctx(1, 2, [40.0]))[0] == pytest.approx(40 / 16)
    # several replicas: their loads add up
    assert load_policy(_ctx(2, 3, [10.0, 30.0]))[0] == pytest.approx(40 / 16)
    # no report yet (a replica just started), or a smaller one: Serve's count, by Serve's default rule
    assert load_policy(_ctx(2, 24, None))[0] == pytest.approx(24 / 16)
    assert load_policy(_ctx(2, 24, [1.0, 2.0]))[0] == pytest.approx(24 / 16)
    assert load_policy(_ctx(1, 0, [0.0]))[0] == 0  # idle: Serve's bounds keep min_replicas
    assert load_policy(_ctx(0, 5, None))[0] == 0  # no replica running: left to Serve's cold start


def test_every_computing_deployment_gets_the_policy_unless_it_names_one():
    from deployments.model import ModelDeployment
    from deployments.sae_shard import SAEShard

    for d in (ModelDeployment, SAEShard):
        policy = d._deployment_config.autoscaling_config.policy
        assert policy.policy_function == POLICY
    assert with_load_policy({"max_replicas": 3}) == {"max_replicas": 3, "policy": {"policy_function": POLICY}}
    own = {"max_replicas": 3, "policy": {"policy_function": "mine:policy"}}
    assert with_load_policy(own) is own and with_load_policy(None) is None
    # Serve resolves the path (its controller imports it the same way)
    assert AutoscalingConfig(**with_load_policy({"max_replicas": 2})).policy.get_policy() is not None


@pytest.fixture(scope="module")
def model(pack_dir):
    with demo_model(pack_dir, capture_batch_wait_s=0.05) as m:
        yield m


def test_the_model_replica_reports_the_prompts_it_holds(model):
    tok = model.runner.tokenizer
    jobs = [P.FeatureJob(tok(t)["input_ids"]) for t in ("the cat sat", "a dog ran far", "one")]

    async def go():
        assert await model.record_autoscaling_stats() == {LOAD_METRIC: 0.0}
        call = asyncio.ensure_future(model.features(jobs))  # one call, three prompts
        cap = asyncio.ensure_future(model.capture(P.CaptureRequest(jobs[0].tokens, ["blocks.0.hook_resid_post"])))
        att = asyncio.ensure_future(model.attention(P.AttentionRequest(jobs[1].tokens, 0, 0)))
        await asyncio.sleep(0.01)  # all wait for company (capture_batch_wait_s)
        during = await model.record_autoscaling_stats()
        await asyncio.gather(call, cap, att)
        return during, await model.record_autoscaling_stats()

    during, after = asyncio.run(go())
    assert during == {LOAD_METRIC: 5.0} and after == {LOAD_METRIC: 0.0}


@pytest.fixture(scope="module")
def shard(pack_dir):
    with demo_shard(pack_dir) as s:
        yield s


def test_the_shard_replica_reports_the_prompts_of_its_calls_in_flight(shard):
    seen, started, both = [], [], None

    async def fake_run(batch, routed):  # the real accounting around a stand-in for the SAE work, observed mid-call
        started.append((batch, routed))
        if len(started) == 2:
            both.set()
        await both.wait()  # both calls in flight
        seen.append(await shard.record_autoscaling_stats())
        await asyncio.sleep(0)  # neither leaves before both have looked
        return P.ShardReply([], "local")

    acts = np.zeros((3, 128), dtype=np.float32)
    two_saes = P.ShardBatch([P.ShardItem(s, acts, P.RankOp(5)) for s in ("0-res-demo", "1-res-demo") for _ in range(3)])
    one_sae = P.ShardBatch([P.ShardItem("2-res-demo", acts, P.TopkOp(2))])
    shard._run = fake_run
    try:
        async def go():
            nonlocal both
            both = asyncio.Event()
            assert await shard.record_autoscaling_stats() == {LOAD_METRIC: 0.0}
            # one call through Serve, one on a direct lane (deployments.direct): both count
            await asyncio.gather(shard.run(two_saes), shard._direct_call(("run", one_sae)))
            return await shard.record_autoscaling_stats()
        after = asyncio.run(go())
    finally:
        del shard._run
    assert seen == [{LOAD_METRIC: 4.0}] * 2  # 6 items over 2 SAEs = 3 prompts, and 1
    assert sorted(routed for _, routed in started) == [False, True]  # the direct call serves held SAEs only
    assert after == {LOAD_METRIC: 0.0}


def test_direct_calls_on_the_real_replica_classes(pack_dir, shard):
    """deployments.direct on the replica classes, over a real socket: ModelDeployment's features() on its lane
    answers as the method does (a projection job: the model's own arithmetic); SAEShard's lane serves only the SAEs
    its replica holds (none here: every item comes back NotHere for the caller to send through Serve); a method
    that is not the lane's comes back as the caller's RequestError."""

    with demo_model(pack_dir) as model:  # its own: a replica's batcher lives in one event loop, as in Serve
        _direct_calls(model, shard)


def _direct_calls(model, shard):
    from deployments.direct import DirectClient
    from deployments.engine.errors import RequestError

    tok = model.runner.tokenizer
    vec = [float(i % 7 - 3) for i in range(128)]
    jobs = [P.FeatureJob(tok(t)["input_ids"], project=("blocks.1.hook_resid_post", vec)) for t in ("the cat sat", "one")]

    async def go():
        replica, address = await model.direct_address()
        assert replica == "local" and address is not None and await model.direct_address() == (replica, address)
        client = DirectClient(address)
        direct = await client.call(("features", jobs))
        served = await model.features(jobs)
        with pytest.raises(RequestError, match="Unknown direct call"):
            await client.call(("capture", jobs))
        acts = np.zeros((3, 128), dtype=np.float32)
        batch = P.ShardBatch([P.ShardItem(s, acts, P.RankOp(5)) for s in ("0-res-demo", "1-res-demo")])
        reply = await shard._direct_call(("run", batch))
        with pytest.raises(RequestError, match="Unknown direct call"):
            await shard._direct_call(("vectors", batch))
        client.close()
        return direct, served, reply

    direct, served, reply = asyncio.run(go())
    assert model._calls["features_direct"] >= 1
    for d, s in zip(direct, served):
        assert d.projection.values == pytest.approx(s.projection.values, rel=1e-6, abs=1e-6)
        assert d.projection.max_value == pytest.approx(s.projection.max_value, rel=1e-6, abs=1e-6)
    assert [type(r).__name__ for r in reply.results] == ["NotHere", "NotHere"]
    assert reply.replica == "local" and reply.direct is not None
