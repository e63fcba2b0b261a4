"""Faults under load: kill a ModelDeployment replica, then an SAEShard replica (ray.kill on the actor).
In-flight requests get at most a 503, new requests succeed within 30 s, nothing stays wedged.

The replicas killed are the main app's (conftest.serve_app): these tests run last in the session
(tests/conftest.py orders them), so no other test meets a replica that was killed and started again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from .conftest import MODEL_ID, SECRET

APP = "saeserve"  # the main app's name (conftest.serve_app)
AUTH = {"X-SECRET-KEY": SECRET}
# Small CPU requests: the queue app shares the session's 2 CPUs with the main app.
SMALL = {name: {"ray_actor_options": {"num_cpus": 0.05}} for name in ("SAEServeIngress", "ModelDeployment", "SAEShard")}
BODY = {"prompt": "the cat sat on the mat", "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [],
        "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 5}


def _replica_actor(deployment: str):
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no live replica of {deployment}")


def _load(base: str, stop: threading.Event, statuses: Counter, lock: threading.Lock):
    with httpx.Client(timeout=60, headers=AUTH) as c:
        while not stop.is_set():
            try:
                code = c.post(f"{base}/v1/activation/all", json=BODY).status_code
            except httpx.HTTPError:
                code = -1
            with lock:
                statuses[code] += 1


def _recovers_within(base: str, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if httpx.post(f"{base}/v1/activation/all", json=BODY, headers=AUTH, timeout=30).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not recovered within {seconds}s")


def _goes_direct_again(base: str, seconds: float = 30) -> None:
    """The replacement replicas' direct lanes (deployments.direct) are found: activation/all's calls reach the new
    model replica and the new shard replica on them again, not only through Serve."""
    from ray import serve

    def counts():
        model = serve.get_deployment_handle("ModelDeployment", app_name=APP).capture_stats.remote().result(timeout_s=60)
        shard = serve.get_deployment_handle("SAEShard", app_name=APP).metrics.remote().result(timeout_s=60)
        return model["calls"].get("features_direct", 0), shard["calls"].get("direct_run", 0)

    before = counts()
    deadline = time.monotonic() + seconds
    while True:
        assert httpx.post(f"{base}/v1/activation/all", json=BODY, headers=AUTH, timeout=60).status_code == 200
        now = counts()
        if now[0] > before[0] and now[1] > before[1]:
            return
        assert time.monotonic() < deadline, f"no direct calls within {seconds}s of recovery: {before} -> {now}"
        time.sleep(0.25)


@pytest.mark.parametrize("deployment", ["ModelDeployment", "SAEShard"])
def test_killing_a_replica_under_load(serve_app, deployment):
    import ray

    assert httpx.post(f"{serve_app}/v1/activation/all", json=BODY, headers=AUTH, timeout=60).status_code == 200
    stop, lock, statuses = threading.Event(), threading.Lock(), Counter()
    workers = [threading.Thread(target=_load, args=(serve_app, stop, statuses, lock), daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        ray.kill(_replica_actor(deployment), no_restart=False)
        took = _recovers_within(serve_app, 30)
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=90)
    assert not any(w.is_alive() for w in workers), "a client is wedged"
    bad = {code: n for code, n in statuses.items() if code not in (200, 503)}
    assert not bad, f"in-flight requests got {bad} (only 200 or 503 allowed); all: {dict(statuses)}"
    # ...and afterwards everything is served again
    codes = [httpx.post(f"{serve_app}/v1/activation/all", json=BODY, headers=AUTH, timeout=60).status_code for _ in range(5)]
    assert codes == [200] * 5
    _goes_direct_again(serve_app)
    print(f"{deployment}: recovered in {took:.1f}s; statuses under load {dict(statuses)}")


def test_queue_full_is_503_with_retry_after(serve_app, pack_dir):
    """With max_queued_requests reached on the model, the excess is refused at once, not queued forever."""
    import concurrent.futures as cf

    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    opts = {**SMALL, "ModelDeployment": {**SMALL["ModelDeployment"], "max_ongoing_requests": 1, "max_queued_requests": 1}}
    # direct_calls off: Serve's queue limit counts handle calls, which a direct lane's calls are not
    # (cluster/README.md, "Calls between replicas"); a Ray job's handle calls to the model would meet it
    serve.run(build_app(AppArgs(model=str(pack_dir), sae_sets=["res-demo"], secret=None, capture_batch_size=1,
                                direct_calls=False, deployment_options=opts)), name="queue", route_prefix="/queue")
    try:
        body = {**BODY, "prompt": "the cat sat on the mat " * 8}
        with cf.ThreadPoolExecutor(24) as pool:
            rs = list(pool.map(lambda _: httpx.post(f"{serve_app}/queue/v1/activation/all", json=body, timeout=120), range(48)))
        codes = Counter(r.status_code for r in rs)
        assert set(codes) <= {200, 503}, codes
        assert codes[503] > 0 and codes[200] > 0, codes
        refused = next(r for r in rs if r.status_code == 503)
        assert refused.headers.get("retry-after") and "retry" in refused.json()["error"].lower(), (refused.headers, refused.text)
        assert httpx.post(f"{serve_app}/queue/v1/activation/all", json=BODY, timeout=60).status_code == 200
    finally:
        serve.delete("queue")
