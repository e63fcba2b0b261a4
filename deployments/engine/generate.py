"""Batched, steered, reproducible generation over a HookedTransformer with a KV cache.

``BatchGenerator`` runs one *wave*: every row (one request variant: STEERED or DEFAULT) is prefilled on its own,
then all rows decode together, one token per step, in one left-padded batch with an attention mask and a KV cache.
Each row has its own steering vectors, its own ``torch.Generator`` (seeded from the request's seed), its own
frequency-penalty counts (prompt and output), its own stop condition, and may leave early (cancelled).

Batch invariance -- a row's tokens do not depend on what else is in its batch -- is by construction:

- prefill runs each row alone (shape ``[1, n]``), so it is the very same computation alone or under load;
- decode always runs ``decode_rows`` rows (unused rows are dummies), so every matmul has the same shape whatever
  the load (BLAS picks kernels by shape; a row's result then cannot depend on its neighbours);
- the cache is left-padded to a multiple of ``pad_multiple`` positions, so a row's keys sit at the same offset
  modulo that multiple alone and in any batch, and the vectorised softmax / attention reductions add the same
  numbers in the same order (padding only contributes exact zeros);
- sampling is per row (``torch.multinomial(probs[row], generator=g_row)``), in float64 on the CPU.

``GenerationScheduler`` (asyncio, Ray-free) gathers the requests that arrive while a wave is collecting into one
wave and runs it step by step off the event loop (each step one task, on the replica's compute thread), streaming
each step's tokens back to each submission through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from typing import Optional

import torch

from ..protocol import MAX_LOGPROBS, GenerationRequest, StepEvent, torch_seed  # noqa: F401 (re-exported)
from .errors import RequestError
from .steering import BatchSteering

log = logging.getLogger("saeserve.generate")


def check_request(r: GenerationRequest, vocab: int) -> None:
    if not r.tokens:
        raise RequestError("Cannot generate from an empty prompt")
    if r.max_new_tokens < 1:
        raise RequestError(f"n_completion_tokens must be at least 1, got {r.max_new_tokens}")
    if not (math.isfinite(r.temperature) and r.temperature >= 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {r.temperature}")
    if not math.isfinite(r.freq_penalty):
        raise RequestError(f"freq_penalty must be finite, got {r.freq_penalty}")
    if not 0 <= r.n_logprobs <= MAX_LOGPROBS:
        raise RequestError(f"n_logprobs must be between 0 and {MAX_LOGPROBS}, got {r.n_logprobs}")
    if any(not 0 <= t < vocab for t in r.tokens):
        raise RequestError(f"prompt holds a token id outside the vocabulary (0..{vocab - 1})")


class _Row:
    def __init__(self, req: GenerationRequest, vocab: int, eos: Optional[int]):
        self.req = req
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(torch_seed(req.seed))
        self.counts = torch.bincount(torch.tensor(req.tokens, dtype=torch.long), minlength=vocab).to(torch.float64)
        stops = req.stop_tokens if req.stop_tokens is not None else ([eos] if eos is not None else [])
        self.stops = set(stops)
        self.no_steer = set(req.no_steer_tokens or [])
        self.generated: list[int] = []
        self.done: Optional[str] = None
        self.cancelled = False
        self.next_input: Optional[int] = None


class BatchGenerator:
    """One wave of rows, generated together. Iterate it (or call :meth:`step`) for per-step events."""

    def __init__(self, model, requests: list[GenerationRequest], decode_rows: Optional[int] = None,
                 pad_multiple: int = 64, lock: Optional[threading.Lock] = None):
        self.model = model
        self.cfg = model.cfg
        self.device = self.cfg.device
        tok = model.tokenizer
        self.pad_id = next((int(c) for c in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if c is not None), 0) if tok is not None else 0
        eos = tok.eos_token_id if tok is not None else None
        vocab = self.cfg.d_vocab
        for r in requests:
            check_request(r, vocab)
        self.rows = [_Row(r, vocab, eos) for r in requests]
        self.R = max(decode_rows or len(requests), len(requests))
        self.pad_multiple = max(1, pad_multiple)
        self.lock = lock or contextlib.nullcontext()
        self.steering = BatchSteering([r.steering for r in requests] + [[] for _ in range(self.R - len(requests))],
                                      device=self.device, dtype=self.cfg.dtype)
        self.cache = None
        self.prefilled = False

    # --- public ------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return all(r.done is not None for r in self.rows)

    def cancel(self, i: int) -> None:
        self.rows[i].cancelled = True

    def __iter__(self):
        while not self.done:
            yield self.step()

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if not self.prefilled:
            return self._prefill()
        events = self._cancelled_events()
        if self.done:
            return events
        toks = torch.full((self.R, 1), self.pad_id, dtype=torch.long)
        pos = torch.zeros((self.R, 1), dtype=torch.bool)
        for i, r in enumerate(self.rows):
            if r.done is None:
                toks[i, 0] = r.next_input
                pos[i, 0] = r.next_input not in r.no_steer
        logits = self._forward(toks.to(self.device), torch.ones((self.R, 1), dtype=torch.long), self.cache, self.steering,
                               pos)
        return events + self._choose_all(logits[:, -1])

    # --- internals -----------------------------------------------------------------------------------------

    def _forward(self, tokens, attention_mask, cache, steering: BatchSteering, positions):
        hooks = steering.fwd_hooks()
        steering.positions = positions
        with self.lock:
            if hooks:
                with self.model.hooks(fwd_hooks=hooks):
                    return self.model(tokens, attention_mask=attention_mask.to(self.device), past_kv_cache=cache)
            return self.model(tokens, attention_mask=attention_mask.to(self.device), past_kv_cache=cache)

    def _cancelled_events(self) -> list[StepEvent]:
        out = []
        for i, r in enumerate(self.rows):
            if r.cancelled and r.done is None:
                r.done = "cancelled"
                out.append(StepEvent(row=i, token=None, finished="cancelled"))
        return out

    def _prefill(self) -> list[StepEvent]:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        self.prefilled = True
        events = self._cancelled_events()
        caches, last = [], []
        for i, r in enumerate(self.rows):
            n = len(r.req.tokens)
            cache = TransformerLensKeyValueCache.init_cache(self.cfg, self.device, 1)
            toks = torch.tensor([r.req.tokens], dtype=torch.long, device=self.device)
            pos = torch.tensor([[t not in r.no_steer for t in r.req.tokens]], dtype=torch.bool)
            logits = self._forward(toks, torch.ones((1, n), dtype=torch.long), cache, self.steering.select([i]), pos)
            caches.append(cache)
            last.append(logits[0, -1])
        # One left-padded cache for the batch (dummy rows attend to one zero key, so they stay finite).
        longest = max(len(r.req.tokens) for r in self.rows)
        L = -(-longest // self.pad_multiple) * self.pad_multiple
        mask = torch.zeros((self.R, L), dtype=torch.int, device=self.device)
        mask[len(self.rows):, -1] = 1
        for i, r in enumerate(self.rows):
            mask[i, L - len(r.req.tokens):] = 1
        entries = []
        for layer in range(self.cfg.n_layers):
            ref = caches[0][layer].past_keys
            shape = (self.R, L, *ref.shape[2:])
            keys = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            values = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            for i, (r, c) in enumerate(zip(self.rows, caches)):
                n = len(r.req.tokens)
                keys[i, L - n:] = c[layer].past_keys[0]
                values[i, L - n:] = c[layer].past_values[0]
            entries.append(TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values))
        self.cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)
        logits = torch.zeros((self.R, last[0].shape[-1]), dtype=last[0].dtype, device=last[0].device)
        logits[: len(last)] = torch.stack(last)
        return events + self._choose_all(logits)

    def _choose_all(self, logits: torch.Tensor) -> list[StepEvent]:
        logits = logits.detach().float().cpu()
        events = []
        for i, r in enumerate(self.rows):
            if r.done is None:
                events.append(self._choose(i, r, logits[i]))
        return events

    def _choose(self, i: int, r: _Row, raw: torch.Tensor) -> StepEvent:
        req = r.req
        if req.temperature == 0:
            token = int(torch.argmax(raw))
        else:
            x = raw.double() / req.temperature
            if req.freq_penalty != 0:
                x = x - req.freq_penalty * r.counts
            probs = torch.softmax(x, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=r.generator))
        ev = StepEvent(row=i, token=token)
        if req.n_logprobs > 0:
            lp = torch.log_softmax(raw.double(), dim=-1)
            top = torch.topk(lp, min(req.n_logprobs, lp.shape[-1]))
            ev.logprob = float(lp[token])
            ev.top_tokens = [int(t) for t in top.indices]
            ev.top_logprobs = [float(v) for v in top.values]
        if token in r.stops:
            r.done = ev.finished = "eos"
            return StepEvent(row=i, token=None, finished="eos")
        r.generated.append(token)
        r.counts[token] += 1
        r.next_input = token
        if len(r.generated) >= req.max_new_tokens:
            r.done = ev.finished = "length"
        return ev


def generate(model, requests: list[GenerationRequest], decode_rows: Optional[int] = None, pad_multiple: int = 64
             ) -> list[list[StepEvent]]:
    """Run one wave to the end; each row's token events (the synchronous, Ray-free entry point)."""
    gen = BatchGenerator(model, requests, decode_rows=decode_rows, pad_multiple=pad_multiple)
    out: list[list[StepEvent]] = [[] for _ in requests]
    for events in gen:
        for e in events:
            out[e.row].append(e)
    return out


def tokens_of(events: list[StepEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


# --- scheduling ------------------------------------------------------------------------------------------------


class Submission:
    """The rows of one call (e.g. a request's STEERED and DEFAULT variants); iterate for their events per step."""

    def __init__(self, requests: list[GenerationRequest]):
        self.requests = requests
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[StepEvent]:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class GenerationScheduler:
    """Gathers concurrent submissions into waves of at most ``max_rows`` rows and runs them off the event loop.

    A wave waits ``wait_s`` to collect, then runs to completion (every row done, at EOS, its token budget, or
    cancelled); submissions that arrive meanwhile form the next wave. Decode always uses ``max_rows`` rows when
    ``fixed_rows`` (the batch-invariance guarantee above); ``lock`` serialises model use with other callers
    (hooks are added to the shared model for the duration of a forward pass).
    """

    def __init__(self, model, max_rows: int = 16, wait_s: float = 0.005, pad_multiple: int = 64, fixed_rows: bool = True,
                 lock: Optional[threading.Lock] = None, run=None):
        self.model = model
        # How a step's compute leaves the event loop: ``run(fn, *args)`` awaitable (a replica's ComputeThread.run,
        # so every decode step is one task and other model work interleaves between steps).
        self._compute = run or asyncio.to_thread
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.pad_multiple = pad_multiple
        self.fixed_rows = fixed_rows
        self.lock = lock
        self._pending: deque[Submission] = deque()
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.stats = {"waves": 0, "rows": 0, "active_rows": 0, "cancelled_rows": 0, "tokens": 0, "max_wave_rows": 0}

    def submit(self, requests: list[GenerationRequest]) -> Submission:
        """Queue rows to generate together (call from the event loop)."""
        if not requests:
            raise RequestError("Nothing to generate")
        if len(requests) > self.max_rows:
            raise RequestError(f"Too many rows in one generation: {len(requests)}, max is {self.max_rows}")
        for r in requests:
            check_request(r, self.model.cfg.d_vocab)
        sub = Submission(requests)
        self._pending.append(sub)
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        return sub

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            await asyncio.sleep(self.wait_s)
            while self._pending:
                wave: list[Submission] = []
                rows = 0
                while self._pending and rows + len(self._pending[0].requests) <= self.max_rows:
                    sub = self._pending.popleft()
                    if sub.cancelled:
                        sub.queue.put_nowait(None)
                        continue
                    wave.append(sub)
                    rows += len(sub.requests)
                if wave:
                    await self._run_wave(wave)

    async def _run_wave(self, wave: list[Submission]) -> None:
        owner: list[tuple[Submission, int]] = [(sub, j) for sub in wave for j in range(len(sub.requests))]
        rows_of = [[i for i, (s, _) in enumerate(owner) if s is sub] for sub in wave]
        finished: set[int] = set()
        requests = [r for sub in wave for r in sub.requests]
        self.stats["waves"] += 1
        self.stats["rows"] += len(requests)
        self.stats["max_wave_rows"] = max(self.stats["max_wave_rows"], len(requests))
        self.stats["active_rows"] = len(requests)
        try:
            gen = await self._compute(BatchGenerator, self.model, requests,
                                      decode_rows=self.max_rows if self.fixed_rows else None,
                                      pad_multiple=self.pad_multiple, lock=self.lock)
            while not gen.done:
                for i, (sub, _) in enumerate(owner):
                    if sub.cancelled:
                        gen.cancel(i)
                events = await self._compute(gen.step)
                per_sub: dict[int, list[StepEvent]] = {}
                for e in events:
                    sub, j = owner[e.row]
                    if e.finished == "cancelled":
                        self.stats["cancelled_rows"] += 1
                    if e.token is not None:
                        self.stats["tokens"] += 1
                    if not sub.cancelled:
                        per_sub.setdefault(id(sub), []).append(StepEvent(**{**e.__dict__, "row": j}))
                for sub in wave:
                    if id(sub) in per_sub:
                        sub.queue.put_nowait(per_sub[id(sub)])
                for k, sub in enumerate(wave):
                    if id(sub) not in finished and all(gen.rows[i].done is not None for i in rows_of[k]):
                        finished.add(id(sub))  # its rows are done: answer now, not when the wave ends
                        sub.queue.put_nowait(None)
                self.stats["active_rows"] = sum(r.done is None for r in gen.rows)
            for sub in wave:
                if id(sub) not in finished:
                    sub.queue.put_nowait(None)
        except asyncio.CancelledError:  # the scheduler itself is going away (replica shutdown)
            for sub in wave:
                sub.queue.put_nowait(RuntimeError("generation was stopped: the server is shutting down"))
            raise
        except Exception as e:  # the wave's callers all hear about it; the scheduler keeps running
            log.exception("generation wave failed")
            for sub in wave:
                sub.queue.put_nowait(e)
        finally:
            self.stats["active_rows"] = 0
