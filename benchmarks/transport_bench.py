"""Serve handle calls between two replicas by payload size: Ray actor calls (``_by_reference=True``, the default in
a process that does not turn on Serve's gRPC) against Serve's gRPC transport between replicas
(``_by_reference=False``). What ``batching.grpc_calls`` and ``batching.grpc_max_bytes`` rest on.

    python -m benchmarks.transport_bench [--sizes 1e3,6.4e4,1e6,4e6,1.6e7,6.4e7] [--calls 200] [--out FILE]

A caller replica sends ``--calls`` calls carrying a float32 numpy array of each size to a callee replica that
answers with a few bytes, one call at a time and then 16 at a time; the two transports alternate per size. Per
cell: median wall ms per call, and CPU ms per call in the caller and in the callee (each process's own
``time.process_time``, which counts its background threads too). The replicas get the app's replica environment
(``ingress.args.REPLICA_ENV``, in their ``ray_actor_options``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import numpy as np
from ray import serve

from ingress.args import REPLICA_ENV

# the app's replica environment (its gRPC message cap included), whichever Ray the replicas start on
ACTOR_OPTIONS = {"num_cpus": 0.25, "runtime_env": {"env_vars": dict(REPLICA_ENV)}}


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, max_ongoing_requests=64)
class Callee:
    async def take(self, arr: np.ndarray) -> int:
        return int(arr.nbytes)

    async def cpu(self) -> float:
        return time.process_time()


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, max_ongoing_requests=4)
class Caller:
    def __init__(self, callee):
        self.by_ref = callee
        self.grpc = callee.options(_by_reference=False)

    async def run(self, transport: str, nbytes: int, calls: int, in_flight: int) -> dict:
        h = self.grpc if transport == "grpc" else self.by_ref
        arr = np.random.default_rng(0).standard_normal(max(1, nbytes // 4), dtype=np.float32)
        for _ in range(3):  # warm the channel / the object store
            await h.take.remote(arr)
        callee0, cpu0, t0 = await self.by_ref.cpu.remote(), time.process_time(), time.perf_counter()
        walls: list[float] = []

        async def one():
            s = time.perf_counter()
            assert await h.take.remote(arr) == arr.nbytes
            walls.append(time.perf_counter() - s)

        for i in range(0, calls, in_flight):
            await asyncio.gather(*(one() for _ in range(min(in_flight, calls - i))))
        wall = time.perf_counter() - t0
        cpu, callee = time.process_time() - cpu0, await self.by_ref.cpu.remote() - callee0
        return {"transport": transport, "bytes": arr.nbytes, "in_flight": in_flight, "calls": calls,
                "p50_ms": statistics.median(walls) * 1e3, "calls_per_s": calls / wall,
                "caller_cpu_ms": cpu / calls * 1e3, "callee_cpu_ms": callee / calls * 1e3}


def measure(sizes: list[int], calls: int, name: str = "transport", num_cpus: float = 0.25) -> list[dict]:
    """Every cell (size x 1 and 16 in flight x both transports) on the Ray this process is connected to; the two
    replicas (``num_cpus`` each) are deleted afterwards."""
    opts = {"ray_actor_options": {**ACTOR_OPTIONS, "num_cpus": num_cpus}}
    handle = serve.run(Caller.options(**opts).bind(Callee.options(**opts).bind()), name=name, route_prefix=None)
    cells = []
    try:
        for size in sizes:
            n = calls if size <= 4e6 else max(16, calls // 8)
            for in_flight in (1, 16):
                for transport in ("ray", "grpc"):
                    c = handle.run.remote(transport, size, n, in_flight).result(timeout_s=600)
                    cells.append(c)
                    print(f"{c['bytes']:>10} B  {transport:4}  in flight {in_flight:2}  p50 {c['p50_ms']:8.2f} ms  "
                          f"{c['calls_per_s']:8.1f} calls/s  CPU ms/call caller {c['caller_cpu_ms']:6.2f} "
                          f"callee {c['callee_cpu_ms']:6.2f}", flush=True)
    finally:
        serve.delete(name)
    return cells


def main() -> None:
    import ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e3,6.4e4,1e6,4e6,1.6e7,6.4e7", help="payload bytes, comma-separated")
    p.add_argument("--calls", type=int, default=200, help="calls per cell (fewer for payloads over 4 MB)")
    p.add_argument("--out", default=None, help="write the cells as JSON here")
    a = p.parse_args()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        cells = measure([int(float(s)) for s in a.sizes.split(",")], a.calls)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"machine": os.uname().nodename, "cells": cells}, f, indent=1)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
