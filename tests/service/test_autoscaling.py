"""Autoscaling: a burst of concurrent requests scales ModelDeployment and SAEShard out, idling scales them back.

They scale on the load their replicas report (deployments.autoscaling), not on Serve's count of their calls: the
ingress here has at most one ModelDeployment call out (``model_calls_in_flight=1``), so Serve never counts more than
one request there, below ModelDeployment's target of 1.5; the prompts the replica holds pass it.

A second app on the demo pack, with short autoscaling delays set through AppArgs.deployment_options (the
same keys as serve_config.yaml's `deployments:`) and tiny CPU requests so the extra replicas fit on 2 CPUs.
Replica counts come from ``serve.status()``. Every loop is bounded; the app is deleted at the end.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.compare import assert_same_answer, same_answer

from .conftest import MODEL_ID, SECRET

APP = "autoscale"
SMALL = {"num_cpus": 0.05}
UP_WITHIN_S = 90  # a new replica imports torch + TransformerLens: ~10-20 s on a busy 2-core machine
DOWN_WITHIN_S = 60
CLIENTS = 16
WARM_WITHIN_S = 180
REQUEST_TIMEOUT_S = 120  # generous: other Ray sessions may share these 2 cores


def autoscaling(max_replicas: int, target: float = 1) -> dict:
    return {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target,  # load per replica the autoscaler aims for (deployments.autoscaling)
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 4,  # longer than a dip in load while new replicas start (else they are cancelled)
        "metrics_interval_s": 0.2,  # how often handles/replicas report (deprecated knob, still honoured)
        "look_back_period_s": 1,  # the window those reports are averaged over
    }


def running(name: str) -> tuple[int, int]:
    """(RUNNING replicas, all replicas in any state) of deployment ``name`` in the autoscale app."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or name not in app.deployments:
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in app.deployments[name].replica_states.items()}
    return states.get("RUNNING", 0), sum(states.values())


def test_burst_scales_out_and_idle_scales_back(serve_app, http, pack_dir):
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    args = AppArgs(
        model=str(pack_dir), sae_sets=["res-demo"], secret=SECRET, token_limit=64, max_batch_prompts=4,
        capture_batch_wait_s=0.05,  # a forward pass waits 50 ms to fill its batch: captures stay in flight, as on a big model
        model_calls_in_flight=1,  # Serve counts at most 1 request at ModelDeployment, under its target of 1.5
        deployment_options={
            "SAEServeIngress": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": SMALL},
            "ModelDeployment": {"autoscaling_config": autoscaling(2, 1.5), "max_ongoing_requests": 8, "ray_actor_options": SMALL},
            "SAEShard": {"autoscaling_config": autoscaling(2), "max_ongoing_requests": 8, "ray_actor_options": SMALL},
        },
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        assert running("ModelDeployment") == (1, 1) and running("SAEShard") == (1, 1)

        prompts = [f"the {w} runs to the {v} park and eats {x} bread" for w, v, x in
                   zip(("cat", "dog", "bird", "fish"), ("red", "big", "one", "blue"), ("apple", "rice", "soup", "apple"))]
        body = dict(prompts=prompts, model=MODEL_ID, source_set="res-demo", selected_sources=[],
                    sort_by_token_indexes=[], ignore_bos=True, num_results=5)
        main = http.post("/v1/activation/all-batch", json=body)  # the main app's answer
        assert main.status_code == 200, main.text
        want = main.json()

        with httpx.Client(base_url=f"{serve_app}/{APP}", timeout=REQUEST_TIMEOUT_S, headers={"X-SECRET-KEY": SECRET}) as c:
            ok, end = 0, time.monotonic() + WARM_WITHIN_S
            while ok < 3:  # warm up: the ingress has its tokenizer and both SAEs are loaded before the burst
                assert time.monotonic() < end, f"the new app did not answer within {WARM_WITHIN_S}s"
                try:
                    r = c.post("/v1/activation/all-batch", json=body)
                except httpx.TimeoutException:
                    continue  # a first request on a badly oversubscribed machine; non-200 answers still fail
                assert r.status_code == 200, r.text
                ok += 1

        stop = threading.Event()
        codes: dict[int, int] = {}
        wrong = []
        lock = threading.Lock()

        def client(c: httpx.Client):
            while not stop.is_set():
                try:
                    r = c.post("/v1/activation/all-batch", json=body)
                    code = r.status_code
                    if code == 200:
                        got = r.json()
                        if not same_answer(got, want):  # other replicas, other batches: up to float32 drift
                            wrong.append(got)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        peak = {"ModelDeployment": 1, "SAEShard": 1}
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        with httpx.Client(base_url=f"{serve_app}/{APP}", timeout=REQUEST_TIMEOUT_S, limits=limits,
                          headers={"X-SECRET-KEY": SECRET}) as c, ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(CLIENTS):
                pool.submit(client, c)
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < UP_WITHIN_S and not all(p > 1 for p in peak.values()):
                    for name in peak:
                        peak[name] = max(peak[name], running(name)[0])
                    time.sleep(0.25)
            finally:
                stop.set()
            t_up = time.monotonic() - t0
        print(f"scaled out to {peak} in {t_up:.1f}s; responses {codes} ({sum(codes.values()) / t_up:.1f}/s)")
        assert peak["ModelDeployment"] > 1 and peak["SAEShard"] > 1, f"no scale-out within {UP_WITHIN_S}s: {peak}"
        assert set(codes) == {200}, codes  # scaling out never fails a request
        assert not wrong

        t0 = time.monotonic()
        while time.monotonic() - t0 < DOWN_WITHIN_S:
            if running("ModelDeployment") == (1, 1) and running("SAEShard") == (1, 1):
                break
            time.sleep(0.5)
        print(f"back to one replica each {time.monotonic() - t0:.1f}s after the burst")
        assert running("ModelDeployment") == (1, 1) and running("SAEShard") == (1, 1), \
            f"still {running('ModelDeployment')} / {running('SAEShard')} after {DOWN_WITHIN_S}s idle"

        with httpx.Client(base_url=f"{serve_app}/{APP}", timeout=REQUEST_TIMEOUT_S, headers={"X-SECRET-KEY": SECRET}) as c:
            r = c.post("/v1/activation/all-batch", json=body)  # and still serves after scaling in
            assert r.status_code == 200
            assert_same_answer(r.json(), want)
    finally:
        serve.delete(APP)
