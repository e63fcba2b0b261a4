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
from deployments.engine import tokens as T
from deployments.engine.errors import RequestError, translate_remote_error
from deployments.specs import SAESpec

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
        self.model = model_handle
        self.model_stream = model_handle.options(stream=True)
        self._sae = sae_handle
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

    # --- readiness ---------------------------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        if self.tokenizer is not None:
            return
        async with self._ready_lock:
            if self.tokenizer is None:
                described = await self.call(self.model.describe.remote())
                tok = described["tokenizer"]
                self.info = described["info"]
                self.prepends_bos = T.tokenizer_prepends_bos(tok)
                self.max_piece_chars = await self.off_loop(T.longest_piece_chars, tok)
                self.tokenizer = tok
                log.info("ingress ready: model %s, %d SAEs in sets %s", self.args.served_model_id, len(self.specs),
                         list(self.sets))

    @property
    def token_limit(self) -> int:
        return min(self.args.token_limit, self.info.n_ctx)

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
        """One ModelDeployment call for all of a request's prompts (which fans out to the SAEShards itself)."""
        return await self.call(self.model.features.remote(jobs))

    async def off_loop(self, fn: Callable[..., R], *args) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)
