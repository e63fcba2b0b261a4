"""A normal request's latency beside hostile traffic, against its latency alone (issue 15's measure; not a test).

    python scripts/hostile_bench.py                      # starts the demo app here (Ray, HAProxy in front)
    python scripts/hostile_bench.py --url http://127.0.0.1:8000 --secret $SECRET
    python scripts/hostile_bench.py --out benchmarks/hostile/hostile.json --samples 30

For each hostile class, ``--attackers`` hostile clients (default 1) send that class in a closed loop while one normal client times its
requests one after another (activation/all and a seeded steer/completion, alternating); the same normal client is
timed alone just before, so each ratio compares neighbouring measurements on the same (possibly shared) machine.
Reported: medians (ms) and beside/alone ratios, and the statuses the hostile requests got. The goal is a ratio
within 2x for every class.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.compare import same_answer  # noqa: E402

MODEL_ID = "demo-lm"
D_MODEL = 128
HOOK = "blocks.0.hook_resid_post"
BIG_INT = "1" + "0" * 400

ALL = {"prompt": "the frog sat on a log by the pond", "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [],
       "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 10}
STEER = {"prompt": "the cat", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
         "types": ["STEERED", "DEFAULT"], "features": [{"model": MODEL_ID, "source": "0-res-demo", "index": 3, "strength": 8}],
         "n_completion_tokens": 8, "temperature": 0.8, "strength_multiplier": 1, "freq_penalty": 0.2, "seed": 7}
NORMAL = [("/v1/activation/all", ALL), ("/v1/steer/completion", STEER)]


def _raw(body: dict, old: str, new: str) -> str:
    return json.dumps(body).replace(old, new, 1)


def _vec(value: float) -> list[float]:
    return [value if i % 2 == 0 else -value for i in range(D_MODEL)]


# Each class: a function (client, i) -> status, sending the i-th hostile request of its kind.
def _post(path: str, body) -> Callable:
    text = body if isinstance(body, str) else json.dumps(body)

    def send(c: httpx.Client, i: int) -> int:
        return c.post(path, content=text, headers={"content-type": "application/json"}).status_code
    return send


def _rotate(*senders: Callable) -> Callable:
    return lambda c, i: senders[i % len(senders)](c, i)


def _chunked_over_cap(c: httpx.Client, i: int) -> int:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(70):
            yield b"a" * 65536
        yield b'"}'
    return c.post("/v1/activation/all", content=chunks(), headers={"content-type": "application/json"}).status_code


def _slow_headers(c: httpx.Client, i: int) -> int:
    """Opens 20 connections whose headers never finish and waits until the server closes them."""
    u = httpx.URL(str(c.base_url))
    socks = []
    for _ in range(20):
        s = socket.create_connection((u.host, u.port))
        s.sendall(b"POST /v1/activation/all HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    status = 0
    for s in socks:
        s.settimeout(60)
        try:
            data = s.recv(200)
            status = int(data.split()[1]) if data else 0
        except (OSError, IndexError, ValueError):
            status = 0
        s.close()
    return status


def hostile_classes(limits: dict) -> dict[str, Callable]:
    many = limits.get("max_steer_vectors", 64)
    feat = STEER["features"][0]
    vec_steer = {**STEER, "features": None}
    return {
        "float32 numbers (strength 1e39, temperature 1e-320, freq_penalty -1e308)": _rotate(
            _post("/v1/steer/completion", {**STEER, "features": [{**feat, "strength": 1e39}]}),
            _post("/v1/steer/completion", {**STEER, "temperature": 1e-320}),
            _post("/v1/steer/completion", {**STEER, "freq_penalty": -1e308})),
        "JSON integers beyond float range": _rotate(
            _post("/v1/steer/completion", _raw(STEER, '"seed": 7', f'"seed": {BIG_INT}')),
            _post("/v1/activation/single", _raw({"prompt": "hi", "model": MODEL_ID, "hook": HOOK, "vector": [0.5] * D_MODEL},
                                                "[0.5", f"[{BIG_INT}"))),
        "tiny and huge directions (ORTHOGONAL_DECOMP 1e-42, PROJECTION_CAP 1e36: served)": _rotate(
            _post("/v1/steer/completion", {**vec_steer, "steer_method": "ORTHOGONAL_DECOMP",
                                           "vectors": [{"steering_vector": _vec(1e-42), "strength": 3, "hook": HOOK}]}),
            _post("/v1/steer/completion", {**vec_steer, "steer_method": "PROJECTION_CAP",
                                           "vectors": [{"steering_vector": _vec(1e36), "strength": -1, "hook": HOOK}]})),
        "projection onto a +-1e38 vector (served)": _post(
            "/v1/activation/single", {"prompt": "the fish swam", "model": MODEL_ID, "hook": HOOK, "vector": _vec(1e38)}),
        "invalid Unicode (lone surrogates)": _rotate(
            _post("/v1/activation/all", _raw(ALL, '"the frog', '"the \\ud800frog')),
            _post("/v1/steer/completion", _raw(STEER, '"the cat"', '"\\udfff"'))),
        f"most steering features allowed ({many}, served)": _post(
            "/v1/steer/completion", {**STEER, "features": [{**feat, "index": k % 1000, "strength": 0.5} for k in range(many)]}),
        "10,000 steering features (over the cap)": _post(
            "/v1/steer/completion", {**STEER, "features": [{**feat, "index": k % 1000} for k in range(10_000)]}),
        "20,000 entries in types": _post("/v1/steer/completion", {**STEER, "types": ["STEERED", "DEFAULT"] * 10_000}),
        "4 MB prompt (over the token limit)": _post("/v1/activation/all", {**ALL, "prompt": "word " * 800_000}),
        "3.5 MB vector (wrong length)": _post(
            "/v1/activation/single", {"prompt": "hi", "model": MODEL_ID, "hook": HOOK, "vector": [0.123456] * 400_000}),
        "chunked body over max_body_bytes": _chunked_over_cap,
        "slow headers (20 connections each)": _slow_headers,
    }


def timed_normal(c: httpx.Client, n: int) -> list[float]:
    out = []
    for i in range(n):
        path, body = NORMAL[i % len(NORMAL)]
        t0 = time.perf_counter()
        r = c.post(path, json=body)
        out.append((time.perf_counter() - t0) * 1e3)
        if r.status_code != 200:
            raise SystemExit(f"a normal request failed: {path} -> {r.status_code} {r.text[:300]}")
    return out


def run(url: str, secret: str | None, samples: int, warmup: int, attackers: int = 1) -> dict:
    headers = {"X-SECRET-KEY": secret} if secret else {}
    client = lambda: httpx.Client(base_url=url, headers=headers, timeout=120)  # noqa: E731
    with client() as c:
        limits = c.get("/v1/capabilities").json()["limits"]
        timed_normal(c, warmup)
        expected = {path: c.post(path, json=body).json() for path, body in NORMAL}
    results = []
    for name, send in hostile_classes(limits).items():
        with client() as c:
            alone = timed_normal(c, samples)
        stop = threading.Event()
        statuses: dict[int, int] = {}

        def attacker():
            with client() as hc:
                i = 0
                while not stop.is_set():
                    try:
                        s = send(hc, i)
                    except httpx.HTTPError as e:
                        s = type(e).__name__
                    statuses[s] = statuses.get(s, 0) + 1
                    i += 1

        threads = [threading.Thread(target=attacker, daemon=True) for _ in range(attackers)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the attack under way
        with client() as c:
            beside = timed_normal(c, samples)
            # The same answer as before the attack: seeded steering exactly, activations up to float32 batch drift.
            same = all(same_answer(expected[path], c.post(path, json=body).json()) for path, body in NORMAL)
        stop.set()
        for t in threads:
            t.join(120)
        row = {"class": name, "alone_p50_ms": statistics.median(alone), "beside_p50_ms": statistics.median(beside),
               "hostile_statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}, "normal_unchanged": same}
        row["ratio"] = row["beside_p50_ms"] / row["alone_p50_ms"]
        results.append(row)
        print(f"{name:78s} alone {row['alone_p50_ms']:7.1f} ms  beside {row['beside_p50_ms']:7.1f} ms  "
              f"x{row['ratio']:.2f}  hostile {row['hostile_statuses']}  same answers: {same}", flush=True)
    return {"url": url, "samples": samples, "attackers": attackers, "load_average_end": list(os.getloadavg()),
            "cpus": os.cpu_count(), "results": results}


def start_app(http_proxy: str) -> tuple[str, str]:
    """The demo app on this machine (Ray started here, with the header timeout), like the test suite's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if http_proxy == "haproxy" else "0"
    if http_proxy == "haproxy":
        from ingress import haproxy_env

        haproxy_env.isolate()  # its own HAProxy files and side ports: another Ray's HAProxy here stays apart
        haproxy_env.defaults()
    from ingress.header_timeout import ray_env

    os.environ.update(ray_env(http_proxy == "haproxy"))
    import ray
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    secret = "bench-secret"
    serve.run(build_app(AppArgs(model=str(REPO / "models" / "demo-lm"), sae_sets=["res-demo"], secret=secret)),
              name="saeserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url, secret
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the app did not become healthy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running app (default: start the demo app here)")
    p.add_argument("--secret", default=os.environ.get("SECRET"))
    p.add_argument("--http-proxy", choices=("python", "haproxy"), default="haproxy", help="the proxy of the app started "
                   "here (default: HAProxy, the default ingress)")
    p.add_argument("--samples", type=int, default=20, help="normal requests timed per phase")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--attackers", type=int, default=1, help="hostile clients, each sending its class in a closed loop "
                   "(1: always one hostile request beside the normal one)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = p.parse_args()
    url, secret = (a.url, a.secret) if a.url else start_app(a.http_proxy)
    report = run(url, secret, a.samples, a.warmup, a.attackers)
    report["http_proxy"] = a.http_proxy if not a.url else "given"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
