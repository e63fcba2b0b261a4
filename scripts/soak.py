"""Soak test: mixed requests at a fixed concurrency for a fixed time against the real app on loopback.

Reports requests served, errors by status, p50/p95 latency, and each replica's memory (RSS) after warm-up
and at the end. Bounded in requests and time; stops by itself.

    python scripts/soak.py --seconds 300 --concurrency 16 --out benchmarks/soak/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "demo-lm"
PROMPTS = ["The cat sat on the mat.", "red blue green yellow", "one two three four five", "It is raining in the city.",
           "def add(a, b): return a + b", "I like bread and soup for lunch.", "The dog runs in the park."]


def requests_mix(rng: random.Random, steering: bool) -> tuple[str, dict]:
    p = rng.choice(PROMPTS)
    kind = rng.randrange(7 if steering else 6)
    if kind == 0:
        return "/v1/activation/all", {"prompt": p, "model": MODEL, "source_set": "res-demo", "selected_sources": [],
                                      "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 10}
    if kind == 1:
        return "/v1/activation/single", {"prompt": p, "model": MODEL, "source": "1-res-demo", "index": str(rng.randrange(64))}
    if kind == 2:
        return "/v1/activation/topk-by-token", {"prompt": p, "model": MODEL, "source": "0-res-demo", "ignore_bos": True, "top_k": 5}
    if kind == 3:
        return "/v1/activation/source", {"prompts": [p], "model": MODEL, "source": "2-res-demo"}
    if kind == 4:
        return "/v1/tokenize", {"model": MODEL, "text": p}
    if kind == 5:
        return "/v1/util/sae-topk-by-decoder-cossim", {"model": MODEL, "source": "1-res-demo", "num_results": 10,
                                                        "feature": {"model": MODEL, "source": "0-res-demo", "index": rng.randrange(64)}}
    return "/v1/steer/completion", {"prompt": p, "model": MODEL, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
                                    "types": ["STEERED", "DEFAULT"], "features": [{"model": MODEL, "source": "1-res-demo",
                                    "index": rng.randrange(64), "strength": 4.0}], "n_completion_tokens": 8, "temperature": 0.7,
                                    "strength_multiplier": 1.0, "freq_penalty": 0.0, "seed": rng.randrange(1000)}


def replica_rss(app: str) -> dict[str, int]:
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "memory_info", "pid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app}:" in cmd:
            name = cmd.split(f"ServeReplica:{app}:", 1)[1].split()[0].split(".")[0]
            out[f"{name}#{p.info['pid']}"] = p.info["memory_info"].rss
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--pack", default="models/demo-lm")
    ap.add_argument("--out", default="benchmarks/soak/soak.json")
    a = ap.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(build_app(AppArgs(model=a.pack, sae_sets=["res-demo"])), name="soak", route_prefix="/")
    base = "http://127.0.0.1:8765"
    caps = httpx.get(base + "/v1/capabilities", timeout=60).json()
    steering = any(r.startswith("/v1/steer") for r in caps["routes"])

    statuses: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    t_start = time.monotonic()
    t_end = t_start + a.warmup + a.seconds
    sent = 0
    rss_warm: dict[str, int] = {}

    def worker(seed: int):
        nonlocal sent
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=120) as c:
            while time.monotonic() < t_end:
                with lock:
                    if sent >= a.max_requests:
                        return
                    sent += 1
                route, body = requests_mix(rng, steering)
                t0 = time.monotonic()
                try:
                    code = c.post(route, json=body).status_code
                except httpx.HTTPError:
                    code = -1
                dt = time.monotonic() - t0
                if time.monotonic() - t_start > a.warmup:
                    with lock:
                        statuses[code] += 1
                        latencies.append(dt)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.concurrency)]
    for t in threads:
        t.start()
    time.sleep(a.warmup)
    rss_warm = replica_rss("soak")
    for t in threads:
        t.join(timeout=a.seconds + 300)
    rss_end = replica_rss("soak")
    serve.shutdown()
    ray.shutdown()

    growth = {k: (rss_end[k] - v) / v for k, v in rss_warm.items() if k in rss_end}
    lat = sorted(latencies)
    result = {
        "seconds": a.seconds, "concurrency": a.concurrency, "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500 or k < 0),
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None,
        "rss_after_warmup_mb": {k: round(v / 2**20, 1) for k, v in rss_warm.items()},
        "rss_end_mb": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        "rss_growth_pct": {k: round(100 * g, 2) for k, g in growth.items()},
        "steering_included": steering,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["errors_5xx"] == 0 and all(g < 0.10 for g in growth.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
