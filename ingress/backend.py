"""Backend: what every handler talks to. The deployment handles (options set once), readiness, the model's
tokenizer and shape, the SAEs served, and the one translation of what a handle call raises.

Handles are duck-typed (``.method.remote(...)`` returning an awaitable), so nothing here imports Ray or torch.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

from deployments import protocol as P
from deployments import stage_trace
from deployments.engine import tokens as T
from deployments.direct import DirectPool
from deployments.engine.errors import RequestError, translate_remote_error
from deployments.specs import SAESpec
from deployments.transport import Handle

from .args import AppArgs

log = logging.getLogger("saeserve.ingress")

R = TypeVar("R")


class Backend:
    def __init__(self, args: AppArgs, specs: list[SAESpec], model_handle, sae_handle):
        self.args = args
        self.specs = {s.id: s for s in specs}
        self.sets: dict[str, list[SAESpec]] = {}
        for s in specs:
            self.sets.setdefault(s.set_name, []).append(s)
        # Calls over gRPC between replicas, streams by reference (deployments.transport)
        self.model = Handle(model_handle, args.batching.grpc_calls)
        self.model_stream = model_handle.options(stream=True)
        self._sae = Handle(sae_handle, args.batching.grpc_calls)
        self._shards: dict[str, Any] = {}
        self.model_ids = args.accepted_model_ids()
        self.secret = args.resolved_secret()  # resolved once, in the replica (env SECRET lives there)
        self.tokenizer = None
        self.info: P.ModelInfo | None = None
        self.prepends_bos = False
        self.max_piece_chars = 1
        self._ready_lock = asyncio.Lock()
        # Tokenizing is CPU work proportional to the input: it runs here, never on the event loop.
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingress-cpu")
        self._features = CallBatcher(self._send_features, max_in_flight=args.batching.model_calls_in_flight)
        # features() calls straight to the model replicas Serve finds (deployments.direct), through Serve until then
        self.model_direct = DirectPool(self._discover_model) if args.batching.direct_calls else None

    # --- readiness ---------------------------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        if self.tokenizer is not None:
            return
        async with self._ready_lock:
            if self.tokenizer is None:
                # by reference: a tokenizer can be tens of MB (deployments.transport)
                described = await self.call(self.model.by_reference.describe.remote())
                tok = described["tokenizer"]
                self.info = described["info"]
                self.prepends_bos = T.tokenizer_prepends_bos(tok)
                self.max_piece_chars = await self.off_loop(T.longest_piece_chars, tok)
                self.tokenizer = tok
                log.info("ingress ready: model %s, %d SAEs in sets %s", self.args.served_model_id, len(self.specs),
                         list(self.sets))

    @property
    def token_limit(self) -> int:
        return min(self.args.limits.token_limit, self.info.n_ctx)

    @property
    def activation_token_limit(self) -> int:
        """The activation routes' limit where it applies (attention, similarity, the /neuronpedia dialect)."""
        return min(self.args.limits.activation_token_limit or self.token_limit, self.token_limit)

    # --- SAEs ----------------------------------------------------------------------------------------------

    def spec(self, source: str) -> SAESpec:
        s = self.specs.get(source)
        if s is None:
            raise RequestError(f"Invalid SAE ID or type: {source}")
        return s

    def shard(self, sae_id: str):
        """The SAEShard handle routed to the replica holding ``sae_id`` (made once per SAE)."""
        h = self._shards.get(sae_id)
        if h is None:
            h = self._shards[sae_id] = self._sae.options(multiplexed_model_id=sae_id)
        return h

    # --- calls ---------------------------------------------------------------------------------------------

    async def call(self, awaitable: Awaitable[R]) -> R:
        try:
            return await awaitable
        except Exception as e:  # a replica's RequestError arrives wrapped in a Ray error
            err = translate_remote_error(e)
            if err is e:
                raise
            raise err from None

    async def features(self, jobs: list[P.FeatureJob]) -> list[P.FeatureResult]:
        """A request's feature jobs, answered by ModelDeployment (which fans out to the SAEShards itself). Concurrent
        requests share calls (``CallBatcher``); a job's failure raises for its own request only."""
        results = await self._features.submit(jobs)
        for r in results:
            if isinstance(r, P.ItemError):
                raise r.exception()
        return results

    async def _send_features(self, jobs: list[P.FeatureJob]) -> list:
        if self.model_direct is None:
            return await self.call(self.model.features.remote(jobs))
        return await self.call(self.model_direct.call(("features", jobs), lambda: self.model.features.remote(jobs)))

    async def _discover_model(self):
        return await self.model.direct_address.remote()

    async def off_loop(self, fn: Callable[..., R], *args) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)


class CallBatcher:
    """Concurrent requests share handle calls: at most ``max_in_flight`` calls are out at a time; whatever queues
    meanwhile goes out together in the next one (at most ``max_items`` items). A lone request goes at once.

    ``send(items) -> results`` (one per item). A call that fails fails the requests in it (a replica that died, a
    full queue); the items' own errors come back as values, so one request never fails its call-mates.
    """

    def __init__(self, send: Callable[[list], Awaitable[list]], max_in_flight: int = 2, max_items: int = 64):
        self.send = send
        self.max_in_flight = max(1, max_in_flight)
        self.max_items = max(1, max_items)
        self._queue: list[tuple[list, asyncio.Future]] = []
        self._in_flight = 0
        self.stats = {"calls": 0, "items": 0}

    async def submit(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((items, fut))
        self._dispatch()
        return await fut

    def _dispatch(self) -> None:
        while self._in_flight < self.max_in_flight and self._queue:
            batch, n = [], 0
            while self._queue and (not batch or n + len(self._queue[0][0]) <= self.max_items):
                items, fut = self._queue.pop(0)
                if fut.done():  # its caller went away
                    continue
                batch.append((items, fut))
                n += len(items)
            if not batch:
                return
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[list, asyncio.Future]]) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight -= 1
                self._dispatch()

        try:
            flat = [x for items, _ in batch for x in items]
            self.stats["calls"] += 1
            self.stats["items"] += len(flat)
            try:
                t0 = stage_trace.now()
                results = await self.send(flat)
                stage_trace.mark("ingress_call", t0, len(flat))
            except BaseException as e:  # noqa: BLE001 - every caller hears it; the batcher keeps going
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                return
            # The next call first: its task runs before the wake-ups of this call's callers (each builds and sends
            # its reply), not after them.
            release()
            k = 0
            for items, fut in batch:
                if not fut.done():
                    fut.set_result(results[k:k + len(items)])
                k += len(items)
        finally:
            release()
