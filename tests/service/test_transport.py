"""The request path's calls between replicas (deployments.transport) on the real app: over gRPC by default, a
ModelDeployment to SAEShard call with large activations by reference, and a message gRPC refuses for its size sent
again by reference. Each variant answers as the main app does (tests.compare: the same request, computed in
other processes)."""

from __future__ import annotations

import httpx
import pytest

from ingress.args import REPLICA_ENV
from tests.compare import assert_same_answer

from .conftest import MODEL_ID

# 40 feature rows of ~20 positions: the model's reply to the ingress is well over 4 kB, as are the activations
# (~20 x 128 float32 per SAE, 4 SAEs) that the model sends to the shard
BODY = {"prompt": "the cat sat on the mat and the dog sat on the log while it rained outside all day",
        "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [], "sort_by_token_indexes": [],
        "ignore_bos": True, "num_results": 40}
SMALL = {name: {"ray_actor_options": {"num_cpus": 0.05}} for name in ("SAEServeIngress", "ModelDeployment", "SAEShard")}


def _model_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelDeployment", app_name=app).capture_stats.remote().result(timeout_s=60)


def _served(pack_dir, name: str, **args):
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    serve.run(build_app(AppArgs(model=str(pack_dir), sae_sets=["res-demo"], secret=None, deployment_options=SMALL,
                                **args)), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def main_answer(http):
    r = http.post("/v1/activation/all", json=BODY)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_main_app_sends_no_shard_call_by_reference(http, main_answer):
    before = _model_stats("saeserve")["calls"]
    assert http.post("/v1/activation/all", json=BODY).status_code == 200
    after = _model_stats("saeserve")
    assert after["calls"].get("shard_run", 0) > before.get("shard_run", 0)
    assert after["calls"].get("shard_run_by_reference", 0) == before.get("shard_run_by_reference", 0)
    assert after["resent"] == {}  # the replicas' environment lifts gRPC's 4 MB cap


def test_large_activations_go_by_reference(serve_app, pack_dir, main_answer):
    from ray import serve

    _served(pack_dir, "byref", grpc_max_bytes=0)  # every shard call's activations count as large
    try:
        r = httpx.post(f"{serve_app}/byref/v1/activation/all", json=BODY, timeout=120)
        assert r.status_code == 200, r.text
        assert_same_answer(r.json(), main_answer)
        calls = _model_stats("byref")["calls"]
        assert calls["shard_run"] >= 1 and calls["shard_run_by_reference"] == calls["shard_run"], calls
    finally:
        serve.delete("byref")


def test_a_message_too_large_for_grpc_is_sent_again_by_reference(serve_app, pack_dir, main_answer):
    """Replicas whose gRPC messages are capped at 4 kB (a replica environment without the app's setting): the
    model's reply and the shard call's activations are refused over gRPC, go again by reference, and the answer is
    the same. That they were refused shows that they went over gRPC first."""
    from ray import serve

    env = {**REPLICA_ENV, "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "4096"}
    _served(pack_dir, "tinygrpc", replica_env=env)
    try:
        r = httpx.post(f"{serve_app}/tinygrpc/v1/activation/all", json=BODY, timeout=120)
        assert r.status_code == 200, r.text
        assert_same_answer(r.json(), main_answer)
        stats = _model_stats("tinygrpc")
        assert stats["resent"].get("run", 0) >= 1, stats  # model -> shard, refused by the shard's gRPC server
        # ingress -> model: the model answered over gRPC, the ingress's channel refused the reply, the call came again
        assert stats["calls"]["features"] == 2, stats["calls"]
        small = httpx.post(f"{serve_app}/tinygrpc/v1/activation/all", json={**BODY, "prompt": "hi", "num_results": 1},
                           timeout=120)
        assert small.status_code == 200, small.text
    finally:
        serve.delete("tinygrpc")


def test_the_transport_bench_measures_both_transports(ray_session):
    """benchmarks.transport_bench at a tiny size on the session's Ray: every cell, both transports, sane figures."""
    from benchmarks import transport_bench

    cells = transport_bench.measure([1000, 64000], calls=4, name="transportbench", num_cpus=0.05)
    assert {(c["bytes"], c["in_flight"], c["transport"]) for c in cells} == {
        (b, f, t) for b in (1000, 64000) for f in (1, 16) for t in ("ray", "grpc")}
    for c in cells:
        assert c["calls"] == 4 and c["p50_ms"] > 0 and c["calls_per_s"] > 0 and c["caller_cpu_ms"] >= 0, c


def _shard_calls(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("SAEShard", app_name=app).metrics.remote().result(timeout_s=60)["calls"]


def test_the_main_app_goes_direct_once_serve_has_found_the_replicas(http, main_answer):
    """After the first calls (through Serve, which routes and loads), activation/all's calls go on direct lanes
    (deployments.direct): ingress to model and model to shard. Same answer as the first request's."""
    import time

    before_model, before_shard = _model_stats("saeserve")["calls"], _shard_calls("saeserve")
    deadline = time.monotonic() + 60
    while True:
        r = http.post("/v1/activation/all", json=BODY)
        assert r.status_code == 200, r.text
        assert_same_answer(r.json(), main_answer)
        model, shard = _model_stats("saeserve")["calls"], _shard_calls("saeserve")
        if (model.get("features_direct", 0) > before_model.get("features_direct", 0)
                and shard.get("direct_run", 0) > before_shard.get("direct_run", 0)):
            break
        assert time.monotonic() < deadline, (model, shard)
        time.sleep(0.2)  # the ingress looks for model replicas at most once a second
    assert model.get("shard_run_direct", 0) > before_model.get("shard_run_direct", 0), model


def test_with_direct_calls_off_every_call_goes_through_serve(serve_app, pack_dir, main_answer):
    from ray import serve

    _served(pack_dir, "nodirect", direct_calls=False)
    try:
        for _ in range(4):
            r = httpx.post(f"{serve_app}/nodirect/v1/activation/all", json=BODY, timeout=120)
            assert r.status_code == 200, r.text
            assert_same_answer(r.json(), main_answer)
        model, shard = _model_stats("nodirect")["calls"], _shard_calls("nodirect")
        assert model["features"] == 4 and "features_direct" not in model and "shard_run_direct" not in model, model
        # the first request's SAEs were not placed yet: a call each; then one call a request
        assert shard["run"] == model["shard_run"] >= 4 and "direct_run" not in shard, (model, shard)
    finally:
        serve.delete("nodirect")
