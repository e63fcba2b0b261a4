"""ComputeThread: the one thread on which a replica runs all of its torch work.

Why one thread: on CPU, torch parallelises each op with OpenMP, and every Python thread that runs torch ops gets
its own OpenMP team, kept for the life of that thread. Once a process holds more OpenMP threads than it has CPUs
(two ``asyncio.to_thread`` workers with two torch threads each on a 2-core machine), libgomp stops spin-waiting
between parallel regions and each one pays a futex wake-up: measured here, ``gelu_new`` on [64, 768] went from
77 us to 730 us and a GPT-2-small forward pass from 127 ms to 200 ms. One thread keeps one team. It also
serialises the replica's model use, which is what a CPU (or one GPU stream) does anyway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

log = logging.getLogger("saeserve.compute")

T = TypeVar("T")


class ComputeThread:
    """A single worker thread for torch work; ``await run(fn, ...)`` from the event loop, ``call(fn, ...)`` from
    synchronous code (a replica's constructor). ``torch_threads`` sets torch's intra-op threads in that thread
    (None: keep the process's setting, which Ray derives from the replica's ``num_cpus``)."""

    def __init__(self, name: str = "compute", torch_threads: int | None = None):
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
        self.torch_threads = torch_threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init)

    def _init(self) -> None:
        import torch

        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        log.info("compute thread: %d torch threads", torch.get_num_threads())

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the compute thread and wait for it (not from the event loop: it would block it)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
