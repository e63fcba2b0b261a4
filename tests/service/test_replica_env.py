"""The replicas' default environment (AppArgs resources.replica_env) reaches the replica processes themselves, where
glibc and Serve read it at start: the real app's processes, found by their titles (benchmarks.service)."""

from __future__ import annotations

import psutil

from benchmarks.service import replica_pids
from ingress.args import REPLICA_ENV


def test_every_replica_process_starts_with_the_default_env(serve_app):
    procs = {name.rsplit("-", 1)[-1]: pid for name, pid in replica_pids().items() if name.startswith("ServeReplica-saeserve-")}
    assert set(procs) == {"SAEServeIngress", "ModelDeployment", "SAEShard"}, procs
    for name, pid in procs.items():
        env = psutil.Process(pid).environ()
        assert {k: env.get(k) for k in REPLICA_ENV} == REPLICA_ENV, name
    assert "MALLOC_MMAP_MAX_" not in psutil.Process().environ()  # the test driver's own allocator is untouched
