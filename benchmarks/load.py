"""Closed-loop load: ``concurrency`` clients send a bounded number of requests (and stop dispatching at a time
limit); per-request latency, then p50/p95, requests/s and tokens/s. Also the serialized baseline's loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable


@dataclass
class CellResult:
    """One (workload, concurrency) measurement."""

    workload: str
    target: str  # "baseline" or "service"
    concurrency: int
    requests: int = 0  # completed with 200
    errors: int = 0
    seconds: float = 0.0  # wall time from first dispatch to last completion
    units: int = 0  # tokens accounted for (prompt tokens, or new tokens for steer)
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str | None = None
    model: dict | None = None  # ModelDeployment's capture counters over the cell (service, activation workloads)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def tps(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
        return xs[k]

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("latencies_ms")
        d.update(p50_ms=self.pct(0.5), p95_ms=self.pct(0.95), rps=self.rps, tps=self.tps)
        return d


def pooled(a: CellResult, b: CellResult) -> CellResult:
    """Two measurements of the same cell as one: latencies, requests, units and seconds added up (the baseline
    measured before and after the service, so that the machine's drift over a run weighs on both sides)."""
    return CellResult(a.workload, a.target, a.concurrency, a.requests + b.requests, a.errors + b.errors,
                      a.seconds + b.seconds, a.units + b.units, a.latencies_ms + b.latencies_ms,
                      a.first_error or b.first_error)


def run_serial(workload: str, call: Callable[[int], int], n: int, max_seconds: float, warmup: int = 1) -> CellResult:
    """The baseline: ``call(i)`` one at a time (returns the units it accounts for)."""
    for i in range(warmup):
        call(i)
    res = CellResult(workload, "baseline", 1)
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        units = call(i)
        res.latencies_ms.append((time.perf_counter() - t) * 1e3)
        res.requests += 1
        res.units += units
        if time.perf_counter() - t0 > max_seconds:
            break
    res.seconds = time.perf_counter() - t0
    return res


async def run_concurrent(workload: str, send: Callable[[int], Awaitable[tuple[bool, int, str | None]]], n: int,
                         concurrency: int, max_seconds: float, warmup: int = 0,
                         on_measure: Callable[[], None] | None = None) -> CellResult:
    """``send(i)`` -> (ok, units, error text) from ``concurrency`` concurrent clients, ``n`` requests in all;
    ``on_measure()`` runs after the warm-up, just before the measured requests."""
    if warmup:
        await asyncio.gather(*(send(i) for i in range(warmup)))
    if on_measure:
        on_measure()
    res = CellResult(workload, "service", concurrency)
    next_i = 0
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def client():
        nonlocal next_i
        while next_i < n and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            ok, units, err = await send(warmup + i)
            if ok:
                res.latencies_ms.append((time.perf_counter() - t) * 1e3)
                res.requests += 1
                res.units += units
            else:
                res.errors += 1
                res.first_error = res.first_error or err

    await asyncio.gather(*(client() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t0
    return res
