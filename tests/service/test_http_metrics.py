"""Serve's HTTP metrics while HAProxy's per-request log is not parsed (ingress.haproxy_env.DEFAULTS, as the service
runs): the ingress replicas record them instead, and Ray's metrics agent exports them with the others (Prometheus
text on the node's metrics export port) — what a dashboard of the service reads."""

from __future__ import annotations

import os
import re
import time

import httpx

from ingress import haproxy_env

from .conftest import MODEL_ID

SAMPLE = re.compile(r"^ray_serve_num_http_requests(?:_total)?\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")


def _posts_counted(nodes: list[tuple[str, int]]) -> float:
    """Serve's HTTP request count for this app's POSTs, over every route, replica and node."""
    total = 0.0
    for host, port in nodes:
        for line in httpx.get(f"http://{host}:{port}/metrics", timeout=10).text.splitlines():
            m = SAMPLE.match(line)
            if m and 'application="saeserve"' in m["labels"] and 'method="POST"' in m["labels"]:
                total += float(m["value"])
    return total


def test_http_requests_are_counted_by_the_ingress_replicas(http):
    import ray

    assert os.environ[haproxy_env.METRICS_VAR] == "0"  # the setting under test, as make serve and the manifests have it
    nodes = [(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]
    before = _posts_counted(nodes)
    n = 5
    for _ in range(n):
        r = http.post("/v1/tokenize", json={"text": "the cat sat", "model": MODEL_ID})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 90  # the agent exports what the replicas report every few seconds
    while (now := _posts_counted(nodes)) < before + n and time.monotonic() < deadline:
        time.sleep(1)
    assert now >= before + n, f"serve_num_http_requests for POSTs went {before} -> {now} after {n} requests"
