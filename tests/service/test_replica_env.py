"""The replicas' default environment (AppArgs resources.replica_env) reaches the replica processes themselves, where
glibc and Serve read it at start: the real app's processes, found by their titles (benchmarks.service)."""

from __future__ import annotations

import psutil

from benchmarks.service import replica_pids
from ingress.args import REPLICA_ENV

DEPLOYMENTS = ("SAEServeIngress", "ModelDeployment", "SAEShard")


def test_every_replica_process_starts_with_the_default_env(serve_app):
    checked = set()
    # a title names the replica's app and deployment, and while it handles a call the method too
    # ("ServeReplica-saeserve-SAEServeIngress.handle_request_with_rejection")
    for title, pid in replica_pids().items():
        deployment = next((d for d in DEPLOYMENTS if title.startswith(f"ServeReplica-saeserve-{d}")), None)
        if deployment is None:
            continue
        try:
            env = psutil.Process(pid).environ()
        except psutil.NoSuchProcess:  # a replica scaled down meanwhile
            continue
        assert {k: env.get(k) for k in REPLICA_ENV} == REPLICA_ENV, title
        checked.add(deployment)
    assert checked == set(DEPLOYMENTS)
    assert "MALLOC_MMAP_MAX_" not in psutil.Process().environ()  # the test driver's own allocator is untouched
