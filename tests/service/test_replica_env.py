"""The replicas' default environment (AppArgs resources.replica_env) reaches the replica processes themselves, where
glibc and Serve read it at start: the real app's processes, found by their titles."""

from __future__ import annotations

import psutil

from ingress.args import REPLICA_ENV


def _replicas() -> dict[str, psutil.Process]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for name in ("SAEServeIngress", "ModelDeployment", "SAEShard"):
            if title.startswith("ray::ServeReplica") and f":{name}" in title:
                out.setdefault(name, p)
    return out


def test_every_replica_process_starts_with_the_default_env(serve_app):
    procs = _replicas()
    assert set(procs) == {"SAEServeIngress", "ModelDeployment", "SAEShard"}, procs
    for name, p in procs.items():
        env = p.environ()
        assert {k: env.get(k) for k in REPLICA_ENV} == REPLICA_ENV, name
    assert "MALLOC_MMAP_MAX_" not in psutil.Process().environ()  # the test driver's own allocator is untouched
