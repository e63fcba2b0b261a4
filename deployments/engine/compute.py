"""ComputeThread: the one thread on which a replica runs all of its torch work.

Why one thread: on CPU, torch parallelises each op with OpenMP, and every Python thread that runs torch ops gets
its own OpenMP team, kept for the life of that thread. Once a process holds more OpenMP threads than it has CPUs
(two ``asyncio.to_thread`` workers with two torch threads each on a 2-core machine), libgomp stops spin-waiting
between parallel regions and each one pays a futex wake-up: measured here, ``gelu_new`` on [64, 768] went from
77 us to 730 us and a GPT-2-small forward pass from 127 ms to 200 ms. One thread keeps one team. It also
serialises the replica's model use, which is what a CPU (or one GPU stream) does anyway.

Bursts: a replica with a fractional ``num_cpus`` runs torch on one thread (Ray sets ``OMP_NUM_THREADS=1``), which
is right under load, when the model and SAE replicas compute side by side, but leaves cores idle for a lone
request: a GPT-2-small forward pass takes 160 ms on one thread and 98 ms on two. So a *light* task (one request's
work, nothing else queued on this thread) runs on ``burst_threads`` threads when no other replica on the machine
is computing, if tasks of its kind did at least ``min_burst_work_s`` of work before (a tiny model's millisecond
forward pass runs slower as a burst: the thread switch and the OpenMP team's wake-up cost more than they save). Who computes is known across processes through :class:`CPULock`, an ``flock`` on one file: ordinary
tasks hold it shared, a burst takes it exclusive without waiting (so only when nobody else holds it), and an
ordinary task that arrives during a burst waits for it to end rather than oversubscribe the cores (a preempted
OpenMP thread stalls its whole parallel region).

Generation never bursts: a forward pass on two threads differs from one on one thread in the last bits, and a
steered row's tokens must not depend on the load (engine.generate's batch invariance). Activations may differ
by that much (~1e-6), as they already do between batch shapes. Generation *widens* instead: a wide task (a
decode or prefill step) that finds no other replica computing and none waiting to (``CPULock.idle_exclusive``)
gets ``lanes`` > 1, and splits its rows between this thread and helper threads, each running torch on the same
narrow thread count. A row's arithmetic does not depend on which rows share its matmuls (engine.generate), so the
tokens are the same on one lane or several; only the wall time changes. Other replicas' work that arrives
meanwhile waits at most one step, and registers as waiting, so the next step runs narrow.

Shared lanes: a wide task that finds other replicas computing still splits, into at most ``shared_lanes`` lanes
(default 2), when each lane runs torch on one thread (a fractional ``num_cpus``: Ray's ``OMP_NUM_THREADS=1``). It
holds the lock shared, as ordinary work does, so the machine briefly runs more threads than it has cores; with no
OpenMP team in any lane a preempted thread stalls only its own rows, and the lanes fill the gaps the other
replicas leave (a model replica waiting on its Ray calls, a shard between batches). On this 2-core machine, for
GPT-2 small at 32 concurrent requests, it carried 1.3-1.7x the requests per second of the same code without it
(benchmarks/README.md). Wider teams (``torch_threads`` > 1) never split under the shared lock: there a preempted
thread would stall its whole team.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import logging
import math
import os
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger("saeserve.compute")

T = TypeVar("T")

DEFAULT_LOCK_PATH = os.path.join(tempfile.gettempdir(), "saeserve-cpu.lock")

# Lanes a wide task splits into while other replicas compute (each lane one torch thread): see "Shared lanes".
SHARED_LANES = 2

# A lane's least work for a wide task (a decode or prefill step, a capture batch) to split: a tiny model's
# millisecond step runs slower split, the hand-over costing more than it saves.
MIN_LANE_WORK_S = 0.02


def moving_average(old: float | None, new: float) -> float:
    """The running estimates of work here (per kind of task, per step, per token): recent tasks weigh most."""
    return new if old is None else 0.7 * old + 0.3 * new


def work_since(t0: float, lanes: int = 1) -> float:
    """On a compute thread: the CPU-seconds of work since ``t0`` (a ``time.thread_time()``), this thread's CPU time
    times its torch threads (a burst's team) and the ``lanes`` that each did about as much. Not wall time, which
    other processes' load inflates."""
    import torch

    return (time.thread_time() - t0) * torch.get_num_threads() * lanes


def lane_groups(costs: list[float], lanes: int) -> list[list[int]]:
    """Indexes of items of ``costs`` in at most ``lanes`` groups of about equal cost, none empty, each in index
    order: the costliest items first, each to the cheapest group so far (within 4/3 of the best split's costliest
    group). For work that splits at item boundaries, such as a shard call's encodes."""
    loads = [0.0] * max(1, min(lanes, len(costs)))
    groups: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = min(range(len(loads)), key=loads.__getitem__)
        groups[g].append(i)
        loads[g] += costs[i]
    return [sorted(g) for g in groups if g]


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by this process's cgroup quota (a container's CPU limit), or None when there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def burst_threads_for(device: str, setting: int | None) -> int | None:
    """The ``burst_threads`` for a replica on ``device``: off on accelerators and for ``setting`` 0; None means
    every CPU this process may use."""
    if not device.startswith("cpu") or setting == 0:
        return None
    return available_cpus() if setting is None else setting


class CPULock:
    """Which replicas on this machine are computing: an ``flock`` on a file every compute thread opens.

    ``shared()`` for ordinary work; ``try_exclusive()`` (never blocks) for a burst. ``flock`` locks belong to the
    open file, so two CPULocks in one process exclude each other as two processes' do, and a process that dies
    releases its lock. One that hangs mid-burst (stopped, or stuck in a debugger) does not: ``shared()`` waits
    for a burst at most ``max_wait_s`` and then runs without the lock, oversubscribing rather than stalling.
    """

    max_wait_s = 10.0

    def __init__(self, path: str = DEFAULT_LOCK_PATH):
        self.path = path
        # Read-only is enough for flock, and works on a file another user created.
        self._fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        # Beside it, held shared by whoever waits for a burst to end: a wide task backs off while anyone does.
        self._wait_fd = os.open(path + ".wait", os.O_RDONLY | os.O_CREAT, 0o644)
        # Closed when the last holder lets go, not by shutdown: a task may still be running with the lock.
        weakref.finalize(self, os.close, self._fd)
        weakref.finalize(self, os.close, self._wait_fd)

    def try_exclusive(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def idle_exclusive(self) -> bool:
        """``try_exclusive`` only when nobody is waiting for the lock either (a wide task runs step after step, and
        would otherwise keep a waiting replica out until it gives up waiting)."""
        try:
            fcntl.flock(self._wait_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._wait_fd, fcntl.LOCK_UN)
        return self.try_exclusive()

    def shared(self) -> bool:
        """Take the lock shared, waiting out a burst (at most ``max_wait_s``); False when it gave up waiting."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        fcntl.flock(self._wait_fd, fcntl.LOCK_SH)  # waiting: a wide task's next step stays narrow
        try:
            deadline, pause = time.monotonic() + self.max_wait_s, 0.0002
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("a burst elsewhere on this machine has held %s for over %g s: computing anyway",
                                    self.path, self.max_wait_s)
                        return False
                    time.sleep(min(pause, left))
                    pause = min(pause * 2, 0.005)  # a burst lasts one task: poll finely at first
        finally:
            fcntl.flock(self._wait_fd, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class ComputeThread:
    """A single worker thread for torch work; ``await run(fn, ...)`` from the event loop, ``call(fn, ...)`` from
    synchronous code (a replica's constructor).

    ``torch_threads``: torch's intra-op threads on this thread (None: keep the process's setting, which Ray
    derives from the replica's ``num_cpus``). ``burst_threads``: threads for a light task when no other replica on
    the machine computes (see the module docstring); None or not more than ``torch_threads`` turns bursts off, as
    does a lock file that cannot be opened. Use bursts on CPU only. ``shared_lanes``: the most lanes a wide task
    gets while other replicas compute (1: none), only where torch runs on one thread here.
    """

    def __init__(self, name: str = "compute", torch_threads: int | None = None, burst_threads: int | None = None,
                 lock_path: str = DEFAULT_LOCK_PATH, min_burst_work_s: float = 0.02, shared_lanes: int = SHARED_LANES):
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
        if shared_lanes < 1:
            raise ValueError(f"shared_lanes must be at least 1, got {shared_lanes}")
        self.torch_threads = torch_threads
        self.burst_threads = burst_threads
        self.shared_lanes = shared_lanes
        self.lock: CPULock | None = None
        self._narrow = 1
        self._queued = 0  # tasks submitted and not yet started
        self._count_lock = threading.Lock()
        self.stats = {"tasks": 0, "burst_tasks": 0, "wide_tasks": 0, "shared_wide_tasks": 0}
        self.min_burst_work_s = min_burst_work_s
        self._work: dict[str, float] = {}  # per kind of light task: a moving average of its CPU-seconds
        self.lanes = 1  # the running task's lanes (more than one only inside a wide task that got them)
        self._helpers: ThreadPoolExecutor | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init)
        self._executor.submit(self._setup_bursts, lock_path).result()
        if self.max_lanes > 1:
            self._helpers = ThreadPoolExecutor(max_workers=self.max_lanes - 1, thread_name_prefix=name + "-lane",
                                               initializer=self._init_lane)

    def _init(self) -> None:
        import torch

        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        self._narrow = torch.get_num_threads()

    def _init_lane(self) -> None:
        import torch

        torch.set_num_threads(self._narrow)  # a lane's team is as narrow as the compute thread's

    def _setup_bursts(self, lock_path: str) -> None:
        if self.burst_threads is None or self.burst_threads <= self._narrow:
            self.burst_threads = None
        else:
            try:
                self.lock = CPULock(lock_path)
            except OSError as e:
                log.warning("CPU bursts off: cannot open %s (%s)", lock_path, e)
                self.burst_threads = None
        log.info("compute thread: %d torch threads%s", self._narrow,
                 f", {self.burst_threads} for a lone request while no other replica computes" if self.burst_threads else "")

    @property
    def max_lanes(self) -> int:
        """Lanes a wide task gets when the machine is idle: the burst threads in narrow teams."""
        return max(1, (self.burst_threads or 0) // self._narrow)

    @property
    def max_shared_lanes(self) -> int:
        """Lanes a wide task gets while other replicas compute: ``shared_lanes`` (at most ``max_lanes``) where each
        lane is one torch thread, else 1."""
        return min(self.max_lanes, self.shared_lanes) if self._narrow == 1 else 1

    def parallel(self, fns: list[Callable[[], T]]) -> list[T]:
        """Inside a task: ``fns`` at once, the first on this thread and the rest on helper threads (at most
        ``lanes`` of them in all); their results in order."""
        if len(fns) == 1:
            return [fns[0]()]
        if len(fns) > self.lanes or self._helpers is None:
            raise RuntimeError(f"{len(fns)} functions for {self.lanes} lanes")
        futs = [self._helpers.submit(f) for f in fns[1:]]
        try:
            first = fns[0]()
        finally:  # never return (or raise) while a lane still computes: its caller may re-run the work at once
            concurrent.futures.wait(futs)
        return [first, *(f.result() for f in futs)]

    def _worth_a_burst(self, kind: str) -> bool:
        """Whether this kind of task did enough work last time for more threads to pay: a burst costs a thread-count
        change and an OpenMP team waking, which for a millisecond of work (the demo pack's forward pass) costs
        more than it saves (measured at concurrency 1: 66 ms p50 without bursts, 104 ms with them)."""
        if self.min_burst_work_s <= 0:
            return True
        work = self._work.get(kind)
        return work is not None and work >= self.min_burst_work_s

    def _record(self, kind: str, seconds: float, threads: int) -> None:
        # CPU-seconds of work: this thread's CPU time (not wall time, which other processes' load inflates) times
        # the threads that shared it (about right for a burst's evenly split ops)
        self._work[kind] = moving_average(self._work.get(kind), seconds * threads)

    def _task(self, fn: Callable[[], T], light: bool | str, wide: bool = False) -> T:
        with self._count_lock:
            self._queued -= 1
            alone = self._queued == 0  # nothing else waits on this replica
        self.stats["tasks"] += 1
        lock = self.lock
        if lock is None:
            return fn()
        if wide and self.max_lanes > 1 and lock.idle_exclusive():
            self.stats["wide_tasks"] += 1
            self.lanes = self.max_lanes
            try:
                return fn()
            finally:
                self.lanes = 1
                lock.release()
        kind = light if isinstance(light, str) else "light"
        t0 = time.thread_time()
        if light and alone and self._worth_a_burst(kind) and lock.try_exclusive():
            import torch

            self.stats["burst_tasks"] += 1
            torch.set_num_threads(self.burst_threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(self._narrow)
                lock.release()
                self._record(kind, time.thread_time() - t0, self.burst_threads)
        held = lock.shared()  # waits while another replica bursts
        lanes = self.max_shared_lanes if wide else 1
        if lanes > 1:
            self.stats["shared_wide_tasks"] += 1
            self.lanes = lanes
        try:
            t0 = time.thread_time()
            return fn()
        finally:
            self.lanes = 1
            if held:
                lock.release()
            if light and lanes == 1:
                self._record(kind, time.thread_time() - t0, self._narrow)

    def _unqueue(self) -> None:
        with self._count_lock:
            self._queued -= 1

    def _submit(self, fn: Callable[[], T], light: bool | str, wide: bool = False):
        with self._count_lock:
            self._queued += 1
        try:
            fut = self._executor.submit(self._task, fn, light, wide)
        except BaseException:
            self._unqueue()
            raise
        # A task cancelled before it started (its caller went away) never runs _task: count it out here.
        fut.add_done_callback(lambda f: self._unqueue() if f.cancelled() else None)
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, light: bool | str = False, wide: bool = False,
                  **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the compute thread. ``light``: one request's work, which may burst (a string
        names its kind: whether a burst pays is judged per kind, from the work such tasks did before). ``wide``:
        work that can split itself with :meth:`parallel` over ``lanes`` (all of them when the machine is otherwise
        idle, ``max_shared_lanes`` while other replicas compute)."""
        return await asyncio.wrap_future(self._submit(functools.partial(fn, *args, **kwargs), light, wide))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the compute thread and wait for it (not from the event loop: it would block it)."""
        return self._submit(functools.partial(fn, *args, **kwargs), False).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._helpers is not None:
            self._helpers.shutdown(wait=False, cancel_futures=True)
