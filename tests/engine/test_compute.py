"""ComputeThread: all of a replica's torch work on one thread (one OpenMP team on CPU), and generation stepping
through it so that other model work interleaves between decode steps."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from deployments.engine.compute import ComputeThread
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
            sched = GenerationScheduler(model, max_rows=4, wait_s=0.0, run=run)
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
        assert toks == tokens_of(generate(model, [req], decode_rows=4)[0])  # same tokens as the direct call
        i = order.index("other")
        assert 0 < i < len(order) - 1  # it ran between decode steps
    finally:
        c.shutdown()
