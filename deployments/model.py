"""ModelDeployment: a thin Ray Serve wrapper around engine.capture.ModelRunner.

Concurrent capture requests are batched into one forward pass (engine.batching.Batcher). All torch work (loading,
capture, each generation step) runs on the replica's one ComputeThread, so the event loop keeps answering health
checks and describe() while it computes, and CPU torch keeps one OpenMP team (see engine.compute).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from ray import serve

from deployments.engine.batching import Batcher
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.compute import ComputeThread, burst_threads_for
from deployments.engine.generate import GenerationRequest, GenerationScheduler
from deployments.engine.loading import load_model, resolve_device

log = logging.getLogger("saeserve.model")


class ModelMetrics:
    def __init__(self):
        from ray.serve.metrics import Histogram

        self.batch_size = Histogram("saeserve_capture_batch_size", description="Prompts per capture forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.queue_wait_ms = Histogram("saeserve_capture_queue_wait_ms", description="Wait before a capture's batch starts",
                                       boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])


@serve.deployment(
    name="ModelDeployment",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    health_check_period_s=10,
)
class ModelDeployment:
    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", override_model_id: str | None = None,
                 capture_batch_size: int = 16, capture_batch_wait_s: float = 0.005,
                 generate_rows: int = 64, generate_positions: int | None = None, generate_fixed_shapes: bool | None = None,
                 torch_threads: int | None = None, burst_torch_threads: int | None = None):
        self.device = resolve_device(device)
        self.compute = ComputeThread("model-compute", torch_threads, burst_threads_for(self.device, burst_torch_threads))
        self.runner = self.compute.call(
            lambda: ModelRunner(load_model(model, self.device, dtype, override_model_id), self.device))
        # Capture and generation take turns on the model: each decode step is one compute task, so a capture waits
        # at most one step. Generation adds no hooks to the model (engine.decoder steers from its own tables).
        # ``generate_positions``: KV-cache positions per row slot (prompt + new tokens), at most the model's n_ctx.
        self._model_lock = threading.Lock()
        self.generator = self.compute.call(lambda: GenerationScheduler(
            self.runner.model, max_rows=generate_rows, max_len=generate_positions, fixed_shapes=generate_fixed_shapes,
            lock=self._model_lock, run=self.compute.run))
        self._metrics = ModelMetrics()
        self._capture_counts = {"batches": 0, "prompts": 0, "tokens": 0, "forward_s": 0.0, "max_batch": 0}
        # Concurrent captures share forward passes; a batch forms when the model is free (engine.batching).
        self._batcher = Batcher(self._capture_batch, capture_batch_size, capture_batch_wait_s, self._observe_batch)

    async def describe(self) -> dict:
        """The model's shape and its tokenizer (the ingress tokenises with this very object)."""
        return {"info": self.runner.info(), "tokenizer": self.runner.tokenizer}

    async def capture(self, tokens: list[int], hooks: list[str]) -> dict[str, np.ndarray]:
        for h in hooks:
            self.runner.check_hook(h)  # fail this request alone, before it joins a batch
        return await self._batcher.submit(CaptureRequest(tokens=tokens, hooks=hooks))

    async def _capture_batch(self, _key, requests: list[CaptureRequest]) -> list[dict[str, np.ndarray]]:
        return await self.compute.run(self._locked_capture, requests, light=len(requests) == 1)

    def _observe_batch(self, waits_s: list[float]) -> None:
        self._metrics.batch_size.observe(len(waits_s))
        for w in waits_s:
            self._metrics.queue_wait_ms.observe(w * 1000)

    def _locked_capture(self, requests: list[CaptureRequest]):
        with self._model_lock:
            t0 = time.monotonic()
            out = self.runner.capture(requests)
        st = self._capture_counts
        st["batches"] += 1
        st["prompts"] += len(requests)
        st["tokens"] += sum(len(r.tokens) for r in requests)
        st["forward_s"] += time.monotonic() - t0
        st["max_batch"] = max(st["max_batch"], len(requests))
        return out

    async def capture_stats(self) -> dict:
        """Capture batches, prompts, prompt tokens and seconds spent in forward passes since the replica started,
        and its compute thread's tasks (``compute``: how many ran, how many as CPU bursts)."""
        return {**self._capture_counts, "compute": dict(self.compute.stats)}

    async def generate(self, requests: list[GenerationRequest]):
        """Stream the rows' tokens step by step (``handle.options(stream=True).generate.remote(rows)``).

        The rows (a request's STEERED and DEFAULT variants) join the running batch at the next decode step; each
        yield is that step's ``StepEvent``s for these rows (a row's first step may hold two: its prefill's token and
        the decode step's). A caller that goes away cancels its rows. A row that fails ends this stream with the
        error, for this caller only: ``RequestError`` (400: e.g. steering made the activations non-finite) or
        ``Overloaded`` (503: out of memory for these rows).
        """
        for r in requests:
            for sv in r.steering:
                self.runner.check_hook(sv.hook)
        sub = self.generator.submit(requests)
        try:
            async for events in sub:
                yield events
        finally:
            sub.cancel()

    async def generation_stats(self) -> dict:
        """This replica's generation since it started: ``steps``, ``rows_joined`` (``rows_joined_mid_flight``: while
        other rows were decoding), ``rows_finished``, ``cancelled_rows``, ``failed_rows``, ``tokens``; now:
        ``active_rows``, ``pending_rows``, ``slots`` (allocated) of ``capacity``; ``slot_occupancy`` (real rows /
        rows computed per decode step), ``mean_active_rows``, ``mean_step_ms`` / ``last_step_ms``, ``fixed_shapes``."""
        return self.generator.stats

    def check_health(self) -> None:
        """Fails when the model is gone or its device is unusable, so Serve replaces this replica."""
        if self.runner is None or self.runner.model is None:
            raise RuntimeError("model is not loaded")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()  # a poisoned CUDA context (device-side assert) raises here
