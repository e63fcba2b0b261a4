"""Continuous (iteration-level) batched generation with steering, and its asyncio scheduler.

``GenerationEngine`` owns up to ``capacity`` row *slots* (a KV cache per slot, engine.decoder). Each
:meth:`~GenerationEngine.step` admits queued rows (their prompts prefilled together, each producing its first
token), then decodes every running row by one token in one batch; a row leaves the moment it finishes (EOS, its
token budget), is cancelled, or fails, and its slot is reused. A row is one request variant (STEERED or DEFAULT)
with its own steering vectors, sampling parameters, seed, frequency-penalty counts and stop tokens.

Batch invariance -- a seeded row's tokens do not depend on what else runs:

- every op is row-local except the matmuls: norms, steering, softmax and sampling reduce within one row, and a
  row's attention reads its own slot over the slot's whole, fixed length (positions past the row masked to weight
  exactly 0, their stale values kept finite by zeroing on reuse);
- randomness is counter-based (engine.sampling): a pure function of the row's seed and its token count;
- matmul rows: on CPU, MKL computes each output row of a GEMM with the same arithmetic whatever the number of rows
  M and a row's place among them, as long as M is a multiple of 4 (measured: for M < 4, and with two or more
  threads for M = 5..11 not a multiple of 4, the kernels differ in the last bits). Every matmul here has a row count
  that is a multiple of ``ROW_MULTIPLE`` = 4 (dummy rows pad it). The engine checks this at construction on the
  model itself (:meth:`GenerationEngine.rows_are_independent`: rows prefilled and decoded in different batches must
  give bit-identical logits); where it does not hold (e.g. a GPU, where cuBLAS picks kernels by shape) it runs
  *fixed shapes* instead: decode always computes all ``capacity`` slots and each prompt is prefilled on its own,
  so a row's arithmetic is the same whatever else runs, by construction.

Failure isolation: a row whose logits (or steered activations) stop being finite fails alone with a
``RequestError`` naming the hook; a batched step that raises (say out-of-memory) is re-run in halves down to
single rows, and only a row that fails on its own fails (``Overloaded`` for out-of-memory); the rest keep the exact
tokens they would have had, since their arithmetic does not depend on the batch.

``GenerationScheduler`` runs the engine from asyncio, one compute task per step, streaming each submission's
events through its own queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..protocol import MAX_LOGPROBS, METHODS, GenerationRequest, StepEvent, torch_seed  # noqa: F401 (re-exported)
from ..steer_vectors import FLOAT32_MAX, check_steer_numbers
from . import sampling
from .compute import MIN_LANE_WORK_S, moving_average, work_since
from .decoder import ROW_MULTIPLE, SharedPrefix, SlotDecoder, UnsupportedModel, round_up
from .errors import Overloaded, RequestError
from .steering import SlotSteering

log = logging.getLogger("saeserve.generate")

DEFAULT_CAPACITY = 64


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator's message (CPU: "can't allocate memory")."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _after_oom(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


@dataclass
class _Row:
    id: int
    req: GenerationRequest
    owner: object
    stops: set
    no_steer: frozenset
    steered: bool
    slot: Optional[int] = None
    generated: int = 0
    kv_end: int = 0  # KV positions this row has written in its slot
    done: Optional[str] = None


@dataclass
class StepResult:
    """One engine step: each row's events (``row`` = the engine's row id), the rows that failed (with the
    exception for their caller) and the rows that are finished (done, cancelled or failed)."""

    events: list[StepEvent] = field(default_factory=list)
    failed: dict[int, Exception] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)


class GenerationEngine:
    """Rows in slots, stepped together; see the module docstring. Not thread-safe: call it from one thread."""

    def __init__(self, model, capacity: int = DEFAULT_CAPACITY, max_len: Optional[int] = None,
                 fixed_shapes: Optional[bool] = None, prefill_tokens: int = 2048, compute=None,
                 min_lane_work_s: float = MIN_LANE_WORK_S):
        self.model = model
        # ``compute``: the ComputeThread whose wide tasks step this engine; a step given several lanes splits its
        # rows between them once decode steps do at least ``min_lane_work_s`` of work (a tiny model's millisecond
        # step runs slower split: the hand-over costs more than it saves)
        self.compute = compute
        self.min_lane_work_s = min_lane_work_s
        self._work_s = 0.0
        self.decoder = SlotDecoder(model, max_len or model.cfg.n_ctx)
        self.device = self.decoder.device
        self.capacity = round_up(max(capacity, 1), ROW_MULTIPLE)
        self.max_len = self.decoder.n_positions
        self.prefill_tokens = prefill_tokens
        tok = model.tokenizer
        self.pad_id = next((int(c) for c in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if c is not None), 0) if tok is not None else 0
        self.eos = tok.eos_token_id if tok is not None else None
        self.vocab_in = model.cfg.d_vocab
        self.V = self.decoder.vocab
        self.top_k = min(MAX_LOGPROBS, self.V)
        self.steering = SlotSteering(0, self.decoder.widths, self.device)
        self.n_slots = 0
        self.slots: list[Optional[_Row]] = []
        self.high_water: list[int] = []  # positions of each slot that may hold stale (non-zero) values
        self.counts: Optional[torch.Tensor] = None  # [slot, vocab] float32, made when a row first needs it
        self.no_steer: Optional[torch.Tensor] = None  # [slot, vocab] bool
        self.queue: deque[_Row] = deque()
        self.rows: dict[int, _Row] = {}
        self._next_id = 0
        self._n = {"sampled": 0, "penalised": 0, "logprobs": 0, "no_steer": 0}  # running rows that need each part
        self.stats = {"steps": 0, "decode_steps": 0, "rows_joined": 0, "rows_joined_mid_flight": 0, "rows_finished": 0,
                      "cancelled_rows": 0, "failed_rows": 0, "tokens": 0, "active_rows": 0, "max_active_rows": 0,
                      "pending_rows": 0, "computed_rows": 0, "occupied_rows": 0, "step_s": 0.0, "last_step_ms": 0.0,
                      "prefill_batches": 0, "prefill_rows_shared": 0, "isolated_reruns": 0,
                      "wide_steps": 0}
        self._grow(min(self.capacity, 2 * ROW_MULTIPLE))
        if fixed_shapes is None:
            independent = self.rows_are_independent()
            fixed_shapes = not independent
            if independent is False:
                log.warning("rows computed in different batches differ on this device: generation uses fixed shapes "
                            "(%d rows per decode step, prompts prefilled one at a time)", self.capacity)
        self.fixed = bool(fixed_shapes)
        # Every slot's KV cache up front: growing later stalls the step that needs it (fresh memory is slow to
        # touch: 8 -> 64 slots of the GPT-2-small shape took 12 s in a VM here) and can fail mid-load. Where memory
        # is short, slots grow as rows arrive instead (admission then waits when memory is full).
        try:
            t0 = time.perf_counter()
            self._grow(self.capacity)
            log.info("generation: %d row slots of %d positions, %.0f MB of KV cache allocated in %.1f s",
                     self.n_slots, self.max_len, self.n_slots * self.decoder.slot_bytes() / 1e6,
                     time.perf_counter() - t0)
        except Exception as e:
            if self.fixed or not is_oom(e):
                raise
            _after_oom(self.device)
            log.warning("not enough memory for %d generation slots up front (%s): growing them as rows arrive",
                        self.capacity, e)

    # --- requests ---------------------------------------------------------------------------------------------

    def check(self, r: GenerationRequest) -> None:
        """Refuse, before it joins, a row the engine cannot run as asked (RequestError naming the field)."""
        if not r.tokens:
            raise RequestError("Cannot generate from an empty prompt")
        if any(not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_in for t in r.tokens):
            raise RequestError(f"prompt holds a token id outside the vocabulary (0..{self.vocab_in - 1})")
        if r.max_new_tokens < 1:
            raise RequestError(f"n_completion_tokens must be at least 1, got {r.max_new_tokens}")
        if len(r.tokens) + r.max_new_tokens > self.max_len:
            raise RequestError(f"Prompt ({len(r.tokens)} tokens) + n_completion_tokens ({r.max_new_tokens}) is more than "
                               f"the {self.max_len} positions a generation may use here; shorten the prompt or ask for "
                               "fewer tokens")
        if not (math.isfinite(r.temperature) and r.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {r.temperature}")
        if not math.isfinite(r.freq_penalty):
            raise RequestError(f"freq_penalty must be finite, got {r.freq_penalty}")
        if abs(r.freq_penalty) * self.max_len > FLOAT32_MAX:
            raise RequestError(f"freq_penalty {r.freq_penalty:g} is too large: freq_penalty x a token's count must stay "
                               f"within float32 (|freq_penalty| <= {FLOAT32_MAX / self.max_len:.3g})")
        if not 0 <= r.n_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"n_logprobs must be between 0 and {MAX_LOGPROBS}, got {r.n_logprobs}")
        torch_seed(r.seed)
        for k, sv in enumerate(r.steering):
            what = f"steering vector {k} at {sv.hook}"
            if sv.method not in METHODS:
                raise RequestError(f"Unknown steer_method {sv.method!r}; use one of {list(METHODS)}")
            v = np.asarray(sv.vector, dtype=np.float32).reshape(-1)
            self.decoder.check_steerable(sv.hook, v.shape[0], what)
            if not np.all(np.isfinite(v)):
                raise RequestError(f"{what} contains NaN or infinite values")
            if not math.isfinite(sv.coeff):
                raise RequestError(f"{what}: strength x strength_multiplier must be finite, got {sv.coeff}")
            check_steer_numbers(v, sv.coeff, sv.method, what)

    def add(self, requests: list[GenerationRequest], owner: object = None) -> list[int]:
        """Queue rows (checked first); they join at the next step with room. Returns their row ids."""
        for r in requests:
            self.check(r)
        if len(requests) > self.capacity:
            raise RequestError(f"Too many rows in one generation: {len(requests)}, max is {self.capacity}")
        ids = []
        for r in requests:
            stops = r.stop_tokens if r.stop_tokens is not None else ([self.eos] if self.eos is not None else [])
            row = _Row(self._next_id, r, owner, set(stops), frozenset(r.no_steer_tokens or ()), bool(r.steering))
            self._next_id += 1
            self.rows[row.id] = row
            self.queue.append(row)
            ids.append(row.id)
        self.stats["pending_rows"] = len(self.queue)
        return ids

    def cancel(self, row_id: int) -> None:
        row = self.rows.get(row_id)
        if row is not None and row.done is None:
            row.done = "cancelled"

    @property
    def idle(self) -> bool:
        return not self.rows

    def reset(self) -> None:
        """Drop every row (after a failure that is not one row's): their slots are zeroed and free again."""
        running = self.running()
        for row in running:
            row.done = row.done or "failed"
        self._release(running, failed=True)
        self.queue.clear()
        self.rows.clear()
        self.stats["active_rows"] = self.stats["pending_rows"] = 0

    def running(self) -> list[_Row]:
        return [r for r in self.slots if r is not None]

    # --- slots ------------------------------------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        """Slots 0..n-1 exist (their KV cache and tables); raises on out-of-memory, leaving the engine as it was."""
        n = min(round_up(n, ROW_MULTIPLE), self.capacity)
        if n <= self.n_slots:
            return
        self.decoder.ensure_slots(n)
        dev, old = self.device, self.n_slots

        def grown(t, fill, dtype, *tail):
            new = torch.full((n, *tail), fill, dtype=dtype, device=dev)
            if t is not None:
                new[:old] = t
            return new

        g = getattr
        self.tok = grown(g(self, "tok", None), self.pad_id, torch.long)
        self.pos = grown(g(self, "pos", None), 0, torch.long)
        self.drawn = grown(g(self, "drawn", None), 0, torch.long)
        # each row's uniform draws, made when it joins (a pure function of its seed and the draw's index)
        self.draws = grown(g(self, "draws", None), 0.5, torch.float64, self.max_len)
        self.inv_temp = grown(g(self, "inv_temp", None), 1.0, torch.float32)
        self.penalty = grown(g(self, "penalty", None), 0.0, torch.float32)
        self.greedy = grown(g(self, "greedy", None), True, torch.bool)
        self.active = grown(g(self, "active", None), False, torch.bool)
        if self.counts is not None:
            self.counts = grown(self.counts, 0.0, torch.float32, self.V)
        if self.no_steer is not None:
            self.no_steer = grown(self.no_steer, False, torch.bool, self.V)
        self.steering.grow(n)
        self.arange = torch.arange(n, device=dev)
        self.slots += [None] * (n - old)
        self.high_water += [0] * (n - old)
        self.n_slots = n

    def _tables(self):
        out = [self.tok, self.pos, self.drawn, self.draws, self.inv_temp, self.penalty, self.greedy, self.active]
        return out + [t for t in (self.counts, self.no_steer) if t is not None]

    def _free_slots(self) -> list[int]:
        return [s for s, r in enumerate(self.slots) if r is None]

    def _place(self, row: _Row, slot: int) -> None:
        """Write a joining row's tables into its slot (host -> device once per row, not per step)."""
        r = row.req
        row.slot = slot
        self.slots[slot] = row
        n = len(r.tokens)
        if self.high_water[slot] > n:  # a previous occupant's values past this prompt: make them exact zeros
            self.decoder.zero(slot, n, self.high_water[slot])
            self.high_water[slot] = n
        sampled = r.temperature >= sampling.MIN_TEMPERATURE
        self.drawn[slot] = 0
        if sampled:
            key = torch.tensor([sampling.seed_key(torch_seed(r.seed))], dtype=torch.long, device=self.device)
            self.draws[slot, : r.max_new_tokens] = sampling.uniform(
                key, torch.arange(r.max_new_tokens, device=self.device))
        self.greedy[slot] = not sampled
        self.inv_temp[slot] = float(np.float32(1.0 / r.temperature)) if sampled else 1.0
        penalised = sampled and r.freq_penalty != 0
        self.penalty[slot] = float(r.freq_penalty) if penalised else 0.0
        if penalised:
            if self.counts is None:
                self.counts = torch.zeros((self.n_slots, self.V), dtype=torch.float32, device=self.device)
            self.counts[slot] = torch.bincount(torch.tensor(r.tokens, dtype=torch.long), minlength=self.V)[: self.V].to(
                self.device, torch.float32)
        self.steering.set_row(slot, r.steering)
        if row.no_steer and row.steered:
            if self.no_steer is None:
                self.no_steer = torch.zeros((self.n_slots, self.V), dtype=torch.bool, device=self.device)
            ids = [t for t in row.no_steer if 0 <= t < self.V]
            self.no_steer[slot] = False
            if ids:
                self.no_steer[slot, torch.tensor(ids, dtype=torch.long, device=self.device)] = True
        self._count(row, +1)

    def _count(self, row: _Row, d: int) -> None:
        r = row.req
        sampled = r.temperature >= sampling.MIN_TEMPERATURE
        self._n["sampled"] += d * sampled
        self._n["penalised"] += d * (sampled and r.freq_penalty != 0)
        self._n["logprobs"] += d * (r.n_logprobs > 0)
        self._n["no_steer"] += d * bool(row.no_steer and row.steered)

    def _release(self, rows: list[_Row], failed: bool = False) -> None:
        if not rows:
            return
        slots = []
        for row in rows:
            s = row.slot
            if s is None:
                continue
            self.slots[s] = None
            self.steering.clear_row(s)
            self._count(row, -1)
            self.high_water[s] = max(self.high_water[s], row.kv_end)
            if failed:  # its cache may hold inf/NaN: a later row's masked positions must be exact zeros
                self.decoder.zero(s)
                self.high_water[s] = 0
            row.slot = None
            slots.append(s)
        if slots:
            idx = torch.tensor(slots, dtype=torch.long, device=self.device)
            self.active[idx] = False
            self.tok[idx] = self.pad_id
            self.pos[idx] = 0
            self.greedy[idx] = True
            if self.no_steer is not None:
                self.no_steer[idx] = False

    def _pack(self) -> None:
        """Move the highest rows down into free slots when many are free, so a decode step computes few dummies."""
        if self.fixed:
            return
        used = [s for s, r in enumerate(self.slots) if r is not None]
        if not used:
            return
        hi = used[-1] + 1
        holes = [s for s in range(hi) if self.slots[s] is None]
        if len(holes) < max(ROW_MULTIPLE, hi // 4):
            return
        for dst in holes:
            src = max(s for s, r in enumerate(self.slots) if r is not None)
            if src <= dst:
                break
            row = self.slots[src]
            self.decoder.move_slot(src, dst)
            for t in self._tables():
                t[dst] = t[src]
            self.steering.move_row(src, dst)
            self.slots[dst], self.slots[src] = row, None
            self.high_water[dst] = max(self.high_water[dst], self.high_water[src])
            row.slot = dst
            self._release_slot_tables(src)

    def _release_slot_tables(self, s: int) -> None:
        self.active[s] = False
        self.tok[s] = self.pad_id
        self.pos[s] = 0
        self.greedy[s] = True
        if self.no_steer is not None:
            self.no_steer[s] = False

    # --- stepping ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> StepResult:
        """Admit what fits, prefill it, decode every running row once; return the events."""
        t0 = time.perf_counter()
        res = StepResult()
        self._drop_cancelled(res)
        was_running = bool(self.running())
        admitted = self._admit(res)
        if admitted:
            self.stats["rows_joined"] += len(admitted)
            if was_running:
                self.stats["rows_joined_mid_flight"] += len(admitted)
            self._prefill(admitted, res)
        running = self.running()
        if running:
            self._decode(running, res)
        self._pack()
        st = self.stats
        dt = time.perf_counter() - t0
        st["steps"] += 1
        st["step_s"] += dt
        st["last_step_ms"] = dt * 1e3
        st["active_rows"] = len(self.running())
        st["pending_rows"] = len(self.queue)
        return res

    def _finish(self, row: _Row, res: StepResult, how: str, error: Optional[Exception] = None) -> None:
        row.done = row.done or how
        self.rows.pop(row.id, None)
        res.finished.append(row.id)
        if error is not None:
            res.failed[row.id] = error
            self.stats["failed_rows"] += 1
        elif how == "cancelled":
            self.stats["cancelled_rows"] += 1
            res.events.append(StepEvent(row=row.id, token=None, finished="cancelled"))
        else:
            self.stats["rows_finished"] += 1

    def _drop_cancelled(self, res: StepResult) -> None:
        for row in [r for r in self.queue if r.done == "cancelled"]:
            self.queue.remove(row)
            self._finish(row, res, "cancelled")
        gone = [r for r in self.running() if r.done == "cancelled"]
        for row in gone:
            self._finish(row, res, "cancelled")
        self._release(gone)

    def _admit(self, res: StepResult) -> list[_Row]:
        """Queued rows that get a slot now, a submission's rows all together, in arrival order."""
        admitted: list[_Row] = []
        while self.queue:
            head = self.queue[0]
            group = [r for r in self.queue if r.owner is head.owner] if head.owner is not None else [head]
            free = self._free_slots()
            if len(free) < len(group):
                used = self.n_slots - len(free)
                if used + len(group) > self.capacity:
                    break  # capacity is full: wait for rows to leave
                try:
                    self._grow(max(2 * self.n_slots, used + len(group)))
                except Exception as e:
                    if not is_oom(e):
                        raise
                    _after_oom(self.device)
                    if self.running() or admitted:
                        break  # memory is full: wait for rows to leave
                    for row in group:  # nothing will free memory: this request cannot run now
                        self.queue.remove(row)
                        self._finish(row, res, "failed", Overloaded("Out of memory for a new generation; retry shortly"))
                    continue
                free = self._free_slots()
            for row, slot in zip(group, free):
                self.queue.remove(row)
                self._place(row, slot)
                admitted.append(row)
        return admitted

    def _prefill(self, rows: list[_Row], res: StepResult) -> None:
        chunks: list[list[_Row]] = []  # at most prefill_tokens padded positions each (one row each with fixed shapes)
        widest = 0
        # shortest first: a chunk pads its prompts to its longest, so similar lengths together waste the least (a
        # row's arithmetic does not depend on its chunk); rows of one prompt side by side (they share a stream)
        for row in sorted(rows, key=lambda r: (len(r.req.tokens), r.req.tokens)):
            n4 = round_up(len(row.req.tokens), ROW_MULTIPLE)
            c = chunks[-1] if chunks else None
            if c is None or self.fixed or (len(c) + 1) * max(widest, n4) > self.prefill_tokens:
                chunks.append([row])
                widest = n4
            else:
                c.append(row)
                widest = max(widest, n4)
        for c in chunks:
            self._run_isolated(c, self._prefill_chunk, res)

    def _run_isolated(self, rows: list[_Row], fn, res: StepResult) -> None:
        """``fn(rows)``; when it raises, the same in halves, down to the row that fails on its own."""
        try:
            out = fn(rows)
        except Exception as e:
            if is_oom(e):
                _after_oom(self.device)
            if len(rows) == 1:
                log.warning("generation row %d failed: %r", rows[0].id, e)
                err = Overloaded("Out of memory while generating; retry shortly") if is_oom(e) else e
                self._finish(rows[0], res, "failed", err)
                self._release(rows, failed=True)
                return
            self.stats["isolated_reruns"] += 1
            half = len(rows) // 2
            self._run_isolated(rows[:half], fn, res)
            self._run_isolated(rows[half:], fn, res)
            return
        self._emit(rows, out, res)

    def _prefill_chunk(self, rows: list[_Row]) -> dict:
        self.stats["prefill_batches"] += 1
        dev = self.device
        bounds = {0, len(rows)}
        for _, cut in self._split(len(rows), 1)[:-1]:
            while cut < len(rows) and rows[cut].req.tokens == rows[cut - 1].req.tokens:
                cut += 1  # a lane's part never separates rows of one prompt (they share a stream)
            bounds.add(cut)
        bounds = sorted(bounds)
        parts = [(rows[a:b], self._shared(rows[a:b])) for a, b in zip(bounds, bounds[1:])]
        outs = self._lanes([lambda p=p, sh=sh: self._prefill_forward(p, sh) for p, sh in parts])
        logits = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        bad = torch.cat([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        out = self._choose(logits, slots, slots, [r.slot for r in rows], bad)
        self.pos[slots] = torch.tensor([len(r.req.tokens) for r in rows], dtype=torch.long, device=dev)
        for (part, _), (_, _, nq) in zip(parts, outs):
            for r in part:
                r.kv_end = nq
                self.high_water[r.slot] = max(self.high_water[r.slot], nq)
        self.active[slots] = True
        return out

    def _prefill_forward(self, rows: list[_Row], share: Optional[SharedPrefix]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One lane's part of a prefill: the rows' logits at their last prompt position, their ``bad`` codes, and
        the positions they wrote."""
        dev = self.device
        lengths = [len(r.req.tokens) for r in rows]
        nq = round_up(max(lengths), ROW_MULTIPLE)
        toks = torch.full((len(rows), nq), self.pad_id, dtype=torch.long)
        where = None
        if any(r.no_steer and r.steered for r in rows):
            where = torch.zeros((len(rows), nq), dtype=torch.bool)
        for i, r in enumerate(rows):
            toks[i, : lengths[i]] = torch.tensor(r.req.tokens, dtype=torch.long)
            if where is not None:
                where[i, : lengths[i]] = torch.tensor([t not in r.no_steer for t in r.req.tokens])
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        last = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        positions = torch.arange(nq, device=dev).expand(len(rows), nq)
        bad = torch.zeros(len(rows), dtype=torch.long, device=dev)
        span = self.decoder.L if self.fixed else self.decoder.span_for(nq)
        logits = self.decoder.forward(toks.to(dev), positions, slots, slots, self.steering,
                                      None if where is None else where.to(dev), bad, last, span, share)
        return logits, bad, nq

    # --- lanes (CPU): a step's rows split between threads when the machine is otherwise idle --------------------

    def _split(self, n: int, multiple: int) -> list[tuple[int, int]]:
        """``[a, b)`` parts of ``n`` rows, one per lane this step gets, each a multiple of ``multiple`` rows (a
        decode step's parts keep every matmul's row count a multiple of ROW_MULTIPLE)."""
        c = self.compute
        w = 1 if c is None or self.fixed or self._work_s < self.min_lane_work_s else min(c.lanes, n // multiple)
        if w <= 1:
            return [(0, n)]
        blocks = n // multiple
        bounds = [multiple * (blocks * k // w) for k in range(w)] + [n]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    def _lanes(self, fns: list) -> list:
        if len(fns) == 1:
            return [fns[0]()]
        self.stats["wide_steps"] += 1
        return self.compute.parallel(fns)

    def _shared(self, rows: list[_Row]) -> Optional[SharedPrefix]:
        """Rows of one prompt (a request's STEERED and DEFAULT, or the same prompt sent twice) are prefilled as one
        stream up to the first block any of them steers: their activations are equal until then."""
        share = self.decoder.shared_prefix([r.req.tokens for r in rows], [[sv.hook for sv in r.req.steering] for r in rows])
        if share is not None:
            self.stats["prefill_rows_shared"] += len(rows) - share.phases[0].lead.shape[0]
        return share

    def _decode(self, running: list[_Row], res: StepResult) -> None:
        hi = max(r.slot for r in running) + 1
        R = self.n_slots if self.fixed else round_up(hi, ROW_MULTIPLE)
        try:
            out = self._decode_rows(slice(0, R), self.arange[:R], list(range(R)), running)
        except Exception as e:
            if is_oom(e):
                _after_oom(self.device)
            log.warning("decode step of %d rows failed (%r): re-running it in parts", len(running), e)
            self.stats["isolated_reruns"] += 1
            self._run_isolated(running, self._decode_subset, res)
            return
        self._emit(running, out, res)

    def _decode_subset(self, rows: list[_Row]) -> dict:
        slots = [r.slot for r in rows]
        n = self.n_slots if self.fixed else round_up(len(slots), ROW_MULTIPLE)
        slots += [slots[-1]] * (n - len(slots))  # repeats of a row compute and write the very same values
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self._decode_rows(idx, idx, slots, rows)

    def _decode_rows(self, rows, idx: torch.Tensor, slots: list[int], real: list[_Row]) -> dict:
        tok, pos, act = self.tok[rows], self.pos[rows], self.active[rows]
        where = None
        if self._n["no_steer"]:
            where = ~self.no_steer[idx, tok][:, None]
        bad = torch.zeros(idx.shape[0], dtype=torch.long, device=self.device)
        # the longest row's next position decides how much of each slot attention reads (exact zeros beyond a row's own)
        span = self.decoder.L if self.fixed else self.decoder.span_for(max(len(r.req.tokens) + r.generated for r in real))
        t0 = time.thread_time()
        if isinstance(rows, slice):  # the packed slots: may split between lanes, ROW_MULTIPLE rows at a time
            def part(a: int, b: int) -> dict:  # a lane's rows: forward pass and sampling (row-local both)
                sl = slice(rows.start + a, rows.start + b)
                logits = self.decoder.forward(tok[a:b, None], pos[a:b, None], sl, idx[a:b], self.steering,
                                              None if where is None else where[a:b], bad[a:b], span=span)
                return self._choose(logits, sl, idx[a:b], slots[a:b], bad[a:b], active=act[a:b])

            parts = self._split(idx.shape[0], ROW_MULTIPLE)
            out = {}
            for o in self._lanes([functools.partial(part, a, b) for a, b in parts]):
                out.update(o)
        else:
            parts = [()]
            logits = self.decoder.forward(tok[:, None], pos[:, None], rows, idx, self.steering, where, bad, span=span)
            out = self._choose(logits, rows, idx, slots, bad, active=act)
        self._work_s = moving_average(self._work_s, work_since(t0, len(parts)))
        self.pos[rows] = pos + act.long()
        self.stats["decode_steps"] += 1
        self.stats["computed_rows"] += idx.shape[0]
        self.stats["occupied_rows"] += len(real)
        for r in real:  # this step wrote the row's latest token's keys at position len(prompt) + generated - 1
            r.kv_end = max(r.kv_end, len(r.req.tokens) + r.generated)
        return out

    def _choose(self, logits: torch.Tensor, rows, idx: torch.Tensor, slots: list[int], bad: torch.Tensor,
                active: Optional[torch.Tensor] = None) -> dict:
        """Sample every row of ``logits`` (slots ``rows``: a slice or the index ``idx``; on the host ``slots``) and
        update their tables; the host's copy of the results by slot: ``{slot: [token, bad, (logprob, top values,
        top indices)]}``."""
        n = self._n
        pen = n["penalised"] > 0
        sampled = n["sampled"] > 0
        drawn = self.drawn[rows]
        u = self.draws[rows].gather(1, drawn[:, None])[:, 0] if sampled else None
        choice = sampling.choose(logits, self.greedy[rows], self.inv_temp[rows], u,
                                 self.penalty[rows] if pen else None, self.counts[rows] if pen else None,
                                 any_sampled=sampled)
        bad = bad.masked_fill((bad == 0) & ~torch.isfinite(logits).all(-1), -1)
        if n["logprobs"]:
            chosen, vals, top = sampling.top_logprobs(logits, choice, self.top_k)
            host = torch.cat([choice.double()[:, None], bad.double()[:, None], chosen.double()[:, None], vals.double(),
                              top.double()], dim=1).tolist()  # the step's one device -> host transfer
        else:
            host = torch.stack([choice, bad], dim=1).tolist()
        if active is None:
            self.tok[rows] = choice
            self.drawn[rows] = drawn + 1
        else:
            self.tok[rows] = torch.where(active, choice, self.tok[rows])
            self.drawn[rows] = drawn + active.long()
        if pen:
            self.counts[idx, choice] = self.counts[idx, choice] + (1.0 if active is None else active.float())
        by_slot = {}
        for s, h in zip(slots, host):
            by_slot.setdefault(s, h)
        return by_slot

    def _emit(self, rows: list[_Row], by_slot: dict, res: StepResult) -> None:
        done, failed = [], []
        for row in rows:
            if row.slot is None or row.done is not None:
                continue
            h = by_slot[row.slot]
            token, code = int(h[0]), int(h[1])
            if code != 0:
                self._finish(row, res, "failed", RequestError(self._why_not_finite(row, code)))
                failed.append(row)
                continue
            ev = StepEvent(row=row.id, token=token)
            k = row.req.n_logprobs
            if k > 0:
                ev.logprob = h[2]
                ev.top_logprobs = h[3: 3 + k]
                ev.top_tokens = [int(t) for t in h[3 + self.top_k: 3 + self.top_k + k]]
            if token in row.stops:
                ev = StepEvent(row=row.id, token=None, finished="eos")
                row.done = "eos"
            else:
                row.generated += 1
                self.stats["tokens"] += 1
                if row.generated >= row.req.max_new_tokens:
                    ev.finished = row.done = "length"
            res.events.append(ev)
            if row.done is not None:
                self._finish(row, res, row.done)
                done.append(row)
        self._release(done)
        self._release(failed, failed=True)
        st = self.stats
        st["max_active_rows"] = max(st["max_active_rows"], len(self.running()) + len(done) + len(failed))

    def _why_not_finite(self, row: _Row, code: int) -> str:
        if code > 0:
            hook = self.steering.hook_name(code)
            return f"steering made the activations non-finite at {hook}; lower the strength"
        if row.steered:
            hooks = ", ".join(dict.fromkeys(sv.hook for sv in row.req.steering))
            return f"the model's output became non-finite while steering at {hooks}; lower the strength"
        return "the model's output became non-finite for this prompt (overflow in the model's dtype?)"

    # --- the batch-invariance check ---------------------------------------------------------------------------

    @torch.no_grad()
    def rows_are_independent(self, n_rows: int = 12, seed: int = 0) -> Optional[bool]:
        """Whether rows computed in different batches give bit-identical logits here (prefilled together vs alone,
        decoded in batches of different sizes and orders). Uses the first slots; leaves them zeroed. None when it
        cannot tell (fewer than 8 slots: fixed shapes cost nothing there)."""
        if self.decoder.device.type != "cpu":
            return False  # GPU kernels are chosen by shape (cuBLAS heuristics, split-K): not invariant by design
        n_rows = min(round_up(n_rows, ROW_MULTIPLE), self.capacity)
        if n_rows < 2 * ROW_MULTIPLE:
            return None
        self._grow(n_rows)
        g = torch.Generator().manual_seed(seed)
        dev = self.device
        lengths = [1 + (5 * i + 2) % 13 for i in range(n_rows)]
        prompts = [torch.randint(0, self.vocab_in, (n,), generator=g) for n in lengths]
        nq = round_up(max(lengths), ROW_MULTIPLE)

        def prefill(ids: list[int]) -> torch.Tensor:
            toks = torch.full((len(ids), nq), self.pad_id, dtype=torch.long)
            for j, i in enumerate(ids):
                toks[j, : lengths[i]] = prompts[i]
            idx = torch.tensor(ids, dtype=torch.long, device=dev)
            last = torch.tensor([lengths[i] - 1 for i in ids], device=dev)
            return self.decoder.forward(toks.to(dev), torch.arange(nq, device=dev).expand(len(ids), nq), idx, idx, last=last)

        try:
            together = prefill(list(range(n_rows)))
            ok = all(torch.equal(prefill([i])[0], together[i]) for i in (0, 3, n_rows - 1))
            nxt = together.argmax(-1)
            pos = torch.tensor(lengths, device=dev)

            def decode(ids: list[int], span: Optional[int] = None) -> torch.Tensor:
                idx = torch.tensor(ids, dtype=torch.long, device=dev)
                return self.decoder.forward(nxt[idx][:, None], pos[idx][:, None], idx, idx, span=span)

            full = decode(list(range(n_rows)))  # over each slot's whole length
            short = self.decoder.span_for(max(lengths) + 1)  # over the shortest span that covers these rows
            for ids, span in (([0, 1, 2, 3], None), ([7, 2, 5, 0], short),
                              (list(range(ROW_MULTIPLE, 2 * ROW_MULTIPLE)) + [1, 9, 3, 4], short)):
                ids = [i % n_rows for i in ids]
                ok = ok and torch.equal(decode(ids, span), full[torch.tensor(ids)])
        finally:
            for s in range(n_rows):
                self.decoder.zero(s)
        return bool(ok)


def generate(model, requests: list[GenerationRequest], **engine_kwargs) -> list[list[StepEvent]]:
    """Run rows to the end together; each row's events (the synchronous, Ray-free entry point)."""
    engine = GenerationEngine(model, **{"capacity": max(len(requests), 16), **engine_kwargs})
    ids = engine.add(requests)
    where = {rid: i for i, rid in enumerate(ids)}
    out: list[list[StepEvent]] = [[] for _ in requests]
    while not engine.idle:
        res = engine.step()
        for rid, err in res.failed.items():
            raise err
        for e in res.events:
            out[where[e.row]].append(StepEvent(**{**e.__dict__, "row": where[e.row]}))
    return out


def tokens_of(events: list[StepEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


# --- scheduling ------------------------------------------------------------------------------------------------


class Submission:
    """The rows of one call (e.g. a request's STEERED and DEFAULT variants); iterate for their events per step.

    A failure of any of its rows ends the iteration with that exception (after the events already delivered)."""

    def __init__(self, requests: list[GenerationRequest]):
        self.requests = requests
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.row_ids: list[int] = []
        self.local: dict[int, int] = {}
        self.open = len(requests)
        self.closed = False
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

    def _close(self, item=None) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(item)


class GenerationScheduler:
    """Feeds a :class:`GenerationEngine` from asyncio: every step is one ``run(fn)`` task (a replica's
    ComputeThread.run, so other model work interleaves between steps), submissions join at the next step, and
    each gets its own rows' events. ``lock`` (optional) is held around each step. ``compute`` (a ComputeThread,
    instead of ``run``): each step is one of its wide tasks, which the engine splits between lanes when it gets
    them."""

    def __init__(self, model=None, max_rows: int = DEFAULT_CAPACITY, max_len: Optional[int] = None,
                 fixed_shapes: Optional[bool] = None, lock: Optional[threading.Lock] = None, run=None,
                 engine: Optional[GenerationEngine] = None, compute=None):
        self.unsupported: Optional[RequestError] = None
        self.engine = engine
        if engine is None:
            try:
                self.engine = GenerationEngine(model, capacity=max_rows, max_len=max_len, fixed_shapes=fixed_shapes,
                                               compute=compute)
            except UnsupportedModel as e:
                log.warning("%s", e.message)
                self.unsupported = e
        if compute is not None and run is None:
            run = functools.partial(compute.run, wide=True)
        self._compute = run or asyncio.to_thread
        self.lock = lock
        self._new: list[Submission] = []
        self._live: dict[int, Submission] = {}  # row id -> its submission
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def stats(self) -> dict:
        if self.engine is None:
            return {}
        st = dict(self.engine.stats)
        st["capacity"] = self.engine.capacity
        st["slots"] = self.engine.n_slots
        st["fixed_shapes"] = self.engine.fixed
        st["pending_rows"] += sum(len(s.requests) for s in self._new)
        st["mean_step_ms"] = 1e3 * st["step_s"] / st["steps"] if st["steps"] else 0.0
        st["mean_active_rows"] = st["occupied_rows"] / st["decode_steps"] if st["decode_steps"] else 0.0
        st["slot_occupancy"] = st["occupied_rows"] / st["computed_rows"] if st["computed_rows"] else 0.0
        return st

    def submit(self, requests: list[GenerationRequest]) -> Submission:
        """Queue rows to generate (call from the event loop); bad rows raise RequestError here."""
        if self.unsupported is not None:
            raise self.unsupported
        if not requests:
            raise RequestError("Nothing to generate")
        if len(requests) > self.engine.capacity:
            raise RequestError(f"Too many rows in one generation: {len(requests)}, max is {self.engine.capacity}")
        for r in requests:
            self.engine.check(r)
        sub = Submission(requests)
        self._new.append(sub)
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        return sub

    def _step(self, new: list[Submission], cancel: list[int]) -> StepResult:
        """On the compute thread: hand over new rows and cancellations, then one engine step."""
        eng = self.engine
        for sub in new:
            if not sub.cancelled:
                sub.row_ids = eng.add(sub.requests, owner=sub)
        for rid in cancel:
            eng.cancel(rid)
        if self.lock is None:
            return eng.step()
        with self.lock:
            return eng.step()

    async def _run(self) -> None:
        while True:
            if not self._new and self.engine.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            new, self._new = self._new, []
            cancel = [rid for rid, sub in self._live.items() if sub.cancelled]
            try:
                res = await self._compute(self._step, new, cancel)
            except asyncio.CancelledError:  # the scheduler itself is going away (replica shutdown)
                for sub in {*self._live.values(), *new}:
                    sub._close(RuntimeError("generation was stopped: the server is shutting down"))
                raise
            except Exception as e:  # not one row's failure (the engine isolates those): fail what is in flight
                log.exception("generation step failed")
                for sub in {*self._live.values(), *new}:
                    sub._close(e)
                self._live.clear()
                await self._compute(self.engine.reset)
                continue
            for sub in new:
                for j, rid in enumerate(sub.row_ids):
                    sub.local[rid] = j
                    self._live[rid] = sub
                if sub.cancelled or not sub.row_ids:
                    sub._close()
            self._dispatch(res)

    def _dispatch(self, res: StepResult) -> None:
        per_sub: dict[int, tuple[Submission, list[StepEvent]]] = {}
        for e in res.events:
            sub = self._live.get(e.row)
            if sub is None or sub.cancelled or sub.closed:
                continue
            per_sub.setdefault(id(sub), (sub, []))[1].append(StepEvent(**{**e.__dict__, "row": sub.local[e.row]}))
        for sub, events in per_sub.values():
            sub.queue.put_nowait(events)
        for rid, err in res.failed.items():
            sub = self._live.get(rid)
            if sub is not None and not sub.closed:
                sub._close(err)  # the request fails alone; its other rows are cancelled below
                sub.cancel()
        for rid in res.finished:
            sub = self._live.pop(rid, None)
            if sub is None:
                continue
            sub.open -= 1
            if sub.open == 0:
                sub._close()
