"""ComputeThread: all of a replica's torch work on one thread (one OpenMP team on CPU), and generation stepping
through it so that other model work interleaves between decode steps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from deployments.engine import compute as C
from deployments.engine.compute import ComputeThread, CPULock
from deployments.engine.generate import GenerationRequest, GenerationScheduler, generate, tokens_of


def test_every_call_runs_on_one_thread_with_its_torch_threads():
    c = ComputeThread("t", torch_threads=1)
    try:
        seen = {c.call(threading.get_ident)}

        async def main():
            ids = await asyncio.gather(*(c.run(threading.get_ident) for _ in range(8)))
            return set(ids), await c.run(torch.get_num_threads)

        ids, n = asyncio.run(main())
        seen |= ids
        assert len(seen) == 1 and threading.get_ident() not in seen
        assert n == 1
        assert c.call(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):  # errors reach the caller
            c.call(lambda: 1 / 0)
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from deployments.engine.pack import load_model_dir
    from scripts.make_random_pack import write_random_pack

    pack = write_random_pack(tmp_path_factory.mktemp("computepack"), n_layers=2, d_model=32, n_heads=4, n_ctx=64,
                             d_sae=64, vocab_size=300, seed=5)
    return load_model_dir(pack).eval()


def test_torch_threads_must_be_positive():
    with pytest.raises(ValueError, match="torch_threads"):
        ComputeThread("t", torch_threads=0)


def test_generation_steps_run_on_the_compute_thread_and_other_work_interleaves(random_model):
    """Each decode step is one task: work submitted meanwhile runs between steps, not after the whole wave."""
    model = random_model
    c = ComputeThread("gen")
    try:
        step_threads: set[int] = set()
        order: list[str] = []

        async def run(fn, *a, **k):
            def tagged():
                step_threads.add(threading.get_ident())
                order.append("gen")
                return fn(*a, **k)
            return await c.run(tagged)

        req = GenerationRequest(tokens=[1, 5, 9, 2], max_new_tokens=12, temperature=0.0, seed=0, stop_tokens=[])

        async def main():
            sched = GenerationScheduler(model, max_rows=4, run=run)
            sub = sched.submit([req])
            toks, other = [], None
            async for events in sub:
                toks += [e.token for e in events if e.token is not None]
                if other is None:  # after the first step: other work joins the same thread's queue
                    other = c.run(lambda: order.append("other"))
                    other = asyncio.ensure_future(other)
            await other
            return toks

        toks = asyncio.run(main())
        assert step_threads == {c.call(threading.get_ident)}
        assert toks == tokens_of(generate(model, [req])[0])  # same tokens as the direct call
        i = order.index("other")
        assert 0 < i < len(order) - 1  # it ran between decode steps
    finally:
        c.shutdown()


# --- bursts: a lone light task may use the machine's idle cores --------------------------------------------


@pytest.fixture
def lock_path(tmp_path):
    return str(tmp_path / "cpu.lock")


def threads_of(c: ComputeThread, light: bool) -> int:
    async def main():
        return await c.run(torch.get_num_threads, light=light)

    return asyncio.run(main())


def test_a_lone_light_task_bursts_and_everything_else_runs_narrow(lock_path):
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0)
    try:
        assert threads_of(c, light=True) == 2
        assert threads_of(c, light=False) == 1
        assert c.call(torch.get_num_threads) == 1  # constructors' work (loading) never bursts

        gate = threading.Event()

        async def crowd():  # queued behind a busy thread: each one but the last has company, so runs narrow
            blocker = asyncio.ensure_future(c.run(gate.wait, 10))
            light = [asyncio.ensure_future(c.run(torch.get_num_threads, light=True)) for _ in range(5)]
            await asyncio.sleep(0.05)
            gate.set()
            await blocker
            return await asyncio.gather(*light)

        assert asyncio.run(crowd()) == [1, 1, 1, 1, 2]
        assert threads_of(c, light=True) == 2
        assert c.stats == {"tasks": 10, "burst_tasks": 3, "wide_tasks": 0, "shared_wide_tasks": 0}
    finally:
        c.shutdown()


def test_no_burst_while_another_process_computes(lock_path):
    """The lock is an flock: a process holding it shared (computing) keeps others from bursting; once it is gone
    (even killed), the burst comes back."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({lock_path!r}, os.O_RDONLY | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert threads_of(c, light=True) == 1
        holder.kill()
        holder.wait()
        assert threads_of(c, light=True) == 2
    finally:
        holder.kill()
        c.shutdown()


def test_ordinary_work_waits_while_another_replica_bursts(lock_path):
    """Narrow work does not oversubscribe the cores under someone else's burst: it starts when the burst ends."""
    other = CPULock(lock_path)
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0)
    try:
        assert other.try_exclusive()
        started = threading.Event()
        fut = c._submit(started.set, False)
        assert not started.wait(0.3)  # blocked behind the other burst
        other.release()
        fut.result(timeout=10)
        assert started.is_set()
        # and while our narrow work holds the lock shared, the other cannot burst
        hold, go = threading.Event(), threading.Event()
        fut = c._submit(lambda: (hold.set(), go.wait(10)), False)
        assert hold.wait(10)
        assert not other.try_exclusive()
        go.set()
        fut.result(timeout=10)
        assert other.try_exclusive()
        other.release()
    finally:
        c.shutdown()


def test_a_burst_that_never_ends_does_not_stall_others(lock_path, monkeypatch):
    """A process stuck mid-burst (stopped, in a debugger) keeps its lock; ordinary work waits max_wait_s, then runs."""
    monkeypatch.setattr(CPULock, "max_wait_s", 0.2)
    stuck = CPULock(lock_path)
    assert stuck.try_exclusive()
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0)
    try:
        assert c.call(lambda: 7) == 7
        stuck.release()
        assert c.lock.shared() and not stuck.try_exclusive()  # and the lock still works afterwards
        c.lock.release()
    finally:
        c.shutdown()


def test_a_cancelled_queued_task_does_not_stop_bursts(lock_path):
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0)
    try:
        gate = threading.Event()

        async def main():
            blocker = asyncio.ensure_future(c.run(gate.wait, 10))
            queued = asyncio.ensure_future(c.run(torch.get_num_threads, light=True))
            await asyncio.sleep(0.05)
            queued.cancel()  # its caller went away before it started
            gate.set()
            await blocker
            return await c.run(torch.get_num_threads, light=True)

        assert asyncio.run(main()) == 2
    finally:
        c.shutdown()


def test_bursts_are_off_when_they_would_not_add_threads_or_off_cpu(lock_path):
    c = ComputeThread("b", torch_threads=2, burst_threads=2, lock_path=lock_path)
    try:
        assert c.burst_threads is None and c.lock is None
        assert threads_of(c, light=True) == 2
    finally:
        c.shutdown()
    assert C.burst_threads_for("cuda:0", None) is None
    assert C.burst_threads_for("cpu", 0) is None
    assert C.burst_threads_for("cpu", 3) == 3
    assert C.burst_threads_for("cpu", None) == C.available_cpus() >= 1


def test_available_cpus_reads_a_cgroup_quota(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert C._cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert C._cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert C._cgroup_cpu_quota(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert C._cgroup_cpu_quota(tmp_path / "v1") is None
    assert C._cgroup_cpu_quota(tmp_path / "nothing") is None
    monkeypatch.setattr(C, "_cgroup_cpu_quota", lambda: 1.5)
    assert C.available_cpus() == min(2, len(os.sched_getaffinity(0)))


def test_only_kinds_of_task_heavy_enough_burst(lock_path):
    """A kind of light task bursts once tasks of that kind did at least min_burst_work_s of work; a cheap kind
    stays narrow (a burst costs more than it saves there)."""
    c = ComputeThread("b", torch_threads=1, burst_threads=2, lock_path=lock_path, min_burst_work_s=0.02)

    def heavy():
        t = time.thread_time()
        while time.thread_time() - t < 0.03:  # 30 ms of CPU work on this thread (waiting would not count)
            pass
        return torch.get_num_threads()

    async def main():
        first = await c.run(heavy, light="heavy")  # its work is not known yet: narrow
        second = await c.run(heavy, light="heavy")
        cheap = [await c.run(torch.get_num_threads, light="cheap") for _ in range(3)]
        return first, second, cheap

    try:
        first, second, cheap = asyncio.run(main())
        assert (first, second, cheap) == (1, 2, [1, 1, 1])
    finally:
        c.shutdown()


def _lanes_seen(c: ComputeThread) -> tuple[int, list[int]]:
    """A wide task's lanes, and the narrow thread counts of the threads ``parallel`` ran its parts on."""
    def task():
        met = threading.Barrier(c.lanes)  # every part waits for the others: none can run on a thread another used

        def part():
            met.wait(10)
            return threading.get_ident(), torch.get_num_threads()

        got = c.parallel([part] * c.lanes)
        assert len({t for t, _ in got}) == len(got)  # each part on a thread of its own
        return c.lanes, [n for _, n in got]

    async def main():
        return await c.run(task, wide=True)

    return asyncio.run(main())


def test_a_wide_task_gets_every_lane_only_while_nobody_else_computes_or_waits(lock_path):
    other = CPULock(lock_path)
    c = ComputeThread("w", torch_threads=1, burst_threads=3, lock_path=lock_path)
    try:
        assert _lanes_seen(c) == (3, [1, 1, 1])  # idle machine: three lanes of one thread each
        assert c.lanes == 1 and c.call(lambda: c.lanes) == 1  # only inside the wide task
        assert other.shared()  # another replica computing: the shared lanes (2), holding the lock shared
        assert _lanes_seen(c) == (2, [1, 1])
        other.release()
        # another replica waiting for our lock (held by a wide task) registers, and the next wide task is narrower
        hold, go = threading.Event(), threading.Event()
        fut = c._submit(lambda: (hold.set(), go.wait(10)), False, True)
        assert hold.wait(10)
        waiter = threading.Thread(target=lambda: (other.shared(), other.release()))
        waiter.start()
        time.sleep(0.1)
        assert not other.idle_exclusive()  # its waiting is visible
        go.set()
        fut.result(timeout=10)
        waiter.join(10)
        assert other.idle_exclusive()  # nobody waits any more
        other.release()
        assert c.stats["wide_tasks"] == 2 and c.stats["shared_wide_tasks"] == 1
    finally:
        c.shutdown()


def test_shared_lanes_only_where_each_lane_is_one_torch_thread(lock_path):
    """While others compute, a wide task splits only into single-threaded lanes (a preempted one stalls only its
    own rows), at most ``shared_lanes`` of them; a wider team stays one lane (a preempted member stalls it all)."""
    other = CPULock(lock_path)
    assert other.shared()
    try:
        for kwargs, want in [({"torch_threads": 1, "burst_threads": 2}, (2, [1, 1])),
                             ({"torch_threads": 1, "burst_threads": 2, "shared_lanes": 1}, (1, [1])),
                             ({"torch_threads": 2, "burst_threads": 4}, (1, [2]))]:
            c = ComputeThread("s", lock_path=lock_path, **kwargs)
            try:
                assert _lanes_seen(c) == want, kwargs
                assert c.stats["shared_wide_tasks"] == (want[0] > 1)
            finally:
                c.shutdown()
    finally:
        other.release()
    with pytest.raises(ValueError):
        ComputeThread("s", shared_lanes=0)
    # and nobody computing: every lane, the wider team's too
    c = ComputeThread("s", torch_threads=2, burst_threads=4, lock_path=lock_path)
    try:
        assert _lanes_seen(c) == (2, [2, 2]) and c.stats["shared_wide_tasks"] == 0
    finally:
        c.shutdown()


def test_rows_split_between_lanes_give_the_tokens_of_one_lane(random_model, lock_path):
    """Decode and prefill steps split between two lanes (rows in separate matmuls on separate threads) produce
    bit-identical tokens and logprobs to one lane, and to each request alone."""
    from deployments.engine import steering as St
    import numpy as np

    model = random_model
    v = np.random.RandomState(2).randn(model.cfg.d_model).astype(np.float32)
    subs = []
    for i in range(10):
        p = [1] + [(7 * i + 3 * j) % 290 + 3 for j in range(3 + (5 * i) % 13)]
        common = dict(tokens=p, max_new_tokens=9, temperature=0.0 if i % 3 == 0 else 0.9, seed=i, n_logprobs=2,
                      stop_tokens=[])
        steered = GenerationRequest(**common, steering=[St.SteerVector("blocks.1.hook_resid_pre", v, 2.0)])
        # odd ones: a steer request's STEERED and DEFAULT rows (one prompt: prefilled as one stream up to block 1)
        subs.append([steered, GenerationRequest(**common)] if i % 2 else [GenerationRequest(**common)])
    reqs = [r for sub in subs for r in sub]
    c = ComputeThread("w", torch_threads=1, burst_threads=2, lock_path=lock_path)
    try:
        async def main(min_work):
            sched = GenerationScheduler(model, max_rows=16, compute=c)  # each step a wide task of c's
            sched.engine.min_lane_work_s = min_work
            submitted = [sched.submit(sub) for sub in subs]

            async def collect(sub, n):
                out = [[] for _ in range(n)]
                async for events in sub:
                    for e in events:
                        out[e.row].append((e.token, e.logprob, e.top_logprobs))
                return out

            got = await asyncio.gather(*(collect(s, len(sub)) for s, sub in zip(submitted, subs)))
            return [rows for g in got for rows in g], sched.stats

        wide, st = asyncio.run(main(0.0))
        narrow, st1 = asyncio.run(main(1e9))  # never worth splitting
        assert st["wide_steps"] >= st["decode_steps"] - 1 and st1["wide_steps"] == 0
        assert st["prefill_rows_shared"] == st1["prefill_rows_shared"] == 5  # lanes never split a pair's stream
        assert wide == narrow
        for r, got in zip(reqs, wide):
            assert [e.token for e in generate(model, [r])[0]] == [t for t, _, _ in got]
    finally:
        c.shutdown()


def test_parallel_waits_for_every_lane_before_raising(lock_path):
    """A lane that fails does not leave another still running when the error reaches the caller (who re-runs the
    rows in halves at once: two writers would race on the KV cache)."""
    c = ComputeThread("w", torch_threads=1, burst_threads=2, lock_path=lock_path)
    done = threading.Event()

    def slow():
        time.sleep(0.3)
        done.set()

    def fail():
        raise RuntimeError("lane failed")

    def task():
        with pytest.raises(RuntimeError, match="lane failed"):
            c.parallel([fail, slow])
        return done.is_set()

    try:
        assert asyncio.run(c.run(task, wide=True))
    finally:
        c.shutdown()
