"""ModelDeployment: a thin Ray Serve wrapper around engine.capture.ModelRunner, engine.generate and engine.lens.

Feature jobs (``features``): concurrent jobs from every caller share one forward pass (engine.batching.Batcher, a
batch forms when the model is free), and the SAE half of a whole batch leaves this replica as one SAEShard call per
SAE, with the activations in it: the ingress makes one call per request, and activations never travel back
through it. Once Serve has routed one, both calls (the ingress's here, this replica's to a shard) go on direct lanes
(deployments.direct). All torch work (loading, capture, each generation step) runs on the replica's one ComputeThread, so
the event loop keeps answering health checks, describe() and the SAE fan-out while it computes, and CPU torch
keeps one OpenMP team (see engine.compute).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time

import numpy as np
from ray import serve

from deployments import protocol as P
from deployments import stage_trace
from deployments.autoscaling import LOAD_METRIC, with_load_policy
from deployments.engine import features as F
from deployments.engine.attention import sparse_pattern
from deployments.engine.batching import Batcher
from deployments.engine.capture import ModelRunner, lane_parts
from deployments.engine.compute import MIN_LANE_WORK_S, SHARED_LANES, ComputeThread, burst_threads_for, moving_average, work_since
from deployments.engine.devices import check_device, release_cached_memory
from deployments.engine.errors import Busy, Overloaded, RequestError, is_out_of_memory, translate_remote_error
from deployments.engine.generate import GenerationRequest, GenerationScheduler
from deployments.engine.lens import JacobianLens, LensEngine, LensRun
from deployments.engine.loading import load_model, resolve_device
from deployments.hooks import capture_hooks, dfa_hooks
from deployments.direct import DIRECT_MAX_BYTES, DirectClient, DirectClosed, DirectServer, reachable, replica_id
from deployments.transport import Handle, payload_bytes, resent

log = logging.getLogger("saeserve.model")


class ModelMetrics:
    def __init__(self):
        from ray.serve.metrics import Histogram

        self.batch_size = Histogram("saeserve_capture_batch_size", description="Prompts per capture forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.queue_wait_ms = Histogram("saeserve_capture_queue_wait_ms", description="Wait before a capture's batch starts",
                                       boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])


def shard_batch(entries: list[tuple[int, int, P.ShardItem]],
                merge: dict[int, tuple[int, bool]] | None = None) -> P.ShardBatch:
    """One SAEShard call's items, from ``(job, task, item)`` entries of a model batch: ``one_request`` when they
    are all one job's (a lone request: the shard may burst its encodes, as a lone prompt's capture bursts).
    ``merge``: ``{job: (num_results, by_sum)}`` for jobs whose rankings merge; each one with two or more items in
    the call is a MergeGroup, merged by the shard before it replies."""
    by_job: dict[int, list[int]] = {}
    for pos, (job, _, item) in enumerate(entries):
        if merge and job in merge and isinstance(item.op, P.RankOp):
            by_job.setdefault(job, []).append(pos)
    merges = [P.MergeGroup(pos, [entries[p][1] for p in pos], *merge[job])
              for job, pos in by_job.items() if len(pos) > 1]
    return P.ShardBatch([item for *_, item in entries], one_request=len({job for job, *_ in entries}) == 1,
                        merges=merges)


@serve.deployment(
    name="ModelDeployment",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config=with_load_policy({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16}),
    health_check_period_s=10,
)
class ModelDeployment:
    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", override_model_id: str | None = None,
                 capture_batch_size: int = 16, capture_batch_wait_s: float = 0.0,
                 generate_rows: int = 64, generate_positions: int | None = None, generate_fixed_shapes: bool | None = None,
                 torch_threads: int | None = None, burst_torch_threads: int | None = None, sae_shard=None,
                 jacobian_lens: str | None = None, shared_lanes: int = SHARED_LANES, grpc_max_bytes: int | None = None,
                 direct_calls: bool = True):
        self.device = resolve_device(device)
        self.compute = ComputeThread("model-compute", torch_threads, burst_threads_for(self.device, burst_torch_threads),
                                     shared_lanes=shared_lanes)
        self.runner = self.compute.call(
            lambda: ModelRunner(load_model(model, self.device, dtype, override_model_id), self.device, lean=False))
        # Capture and generation take turns on the model: each decode step is one compute task, so a capture waits
        # at most one step. Generation adds no hooks to the model (engine.decoder steers from its own tables).
        # ``generate_positions``: KV-cache positions per row slot (prompt + new tokens), at most the model's n_ctx.
        self._model_lock = threading.Lock()
        # Each step is a wide task: on an otherwise idle CPU its rows split between lanes (engine.compute).
        self.generator = self.compute.call(lambda: GenerationScheduler(
            self.runner.model, max_rows=generate_rows, max_len=generate_positions, fixed_shapes=generate_fixed_shapes,
            lock=self._model_lock, compute=self.compute))
        # Capture runs the generation engine's forward pass over the same weights (engine.capture): one copy of
        # its fused weights. None where generation is not implemented for the architecture: TransformerLens then.
        if self.generator.engine is not None:
            self.runner.use_decoder(self.generator.engine.decoder)
        # lens/prompt: its runs take turns with everything else on the compute thread, a step at a time.
        self.lens_engine = self.compute.call(self._lens_engine, jacobian_lens)
        self._in_flight = collections.Counter()  # lens runs and generations under way (what fail_if_busy refuses on)
        self._prompts = 0  # prompts of feature jobs, captures and attention maps here: queued, computing or fanned out
        self._lens_counts = {"runs": 0, "active": 0, "finished": 0, "cancelled": 0, "failed": 0, "busy": 0,
                             "positions": 0, "generated": 0}
        self._metrics = ModelMetrics()
        self._capture_counts = {"batches": 0, "prompts": 0, "tokens": 0, "forward_s": 0.0, "max_batch": 0, "lane_batches": 0}
        self.min_lane_work_s = MIN_LANE_WORK_S  # a lane's least work for a capture batch to split
        self._token_s: float | None = None  # CPU-seconds per prompt token of the captures so far (a moving average)
        self._calls = collections.Counter()  # handle calls received (and made to SAEShard), per method
        # The SAEShard deployment, for the SAE half of feature jobs; one handle per SAE id, made once.
        # A call whose activations are at most grpc_max_bytes goes over gRPC, a larger one (or every one, for None)
        # by reference through the object store (deployments.transport).
        self._sae_shard = Handle(sae_shard, grpc_max_bytes is not None) if sae_shard is not None else None
        self._grpc_max_bytes = grpc_max_bytes
        self._shards: dict[str, Handle] = {}
        self._home: dict[str, str] = {}  # SAE id -> the SAEShard replica that last answered for it
        # SAEShard replica -> its direct lane (deployments.direct), learnt from its replies: calls for SAEs it holds go
        # there, below Serve's handles; the rest, and any call a lane drops, through Serve
        self._direct_calls = direct_calls
        self._directs: dict[str, DirectClient] = {}
        # and the ingress's features() calls may come on this replica's own (found through direct_address())
        self._direct = DirectServer(self._direct_call) if direct_calls else None
        self.replica_id = replica_id()
        # Concurrent jobs share forward passes; a batch forms when the model is free (engine.batching).
        self._batcher = Batcher(self._run_batch, capture_batch_size, capture_batch_wait_s, self._observe_batch)

    async def describe(self) -> dict:
        """The model's shape and its tokenizer (the ingress tokenises with this very object)."""
        info = self.runner.info()
        info.lens_layers = self.lens_engine.lens_layers
        return {"info": info, "tokenizer": self.runner.tokenizer}

    # --- feature jobs: one forward pass per batch of prompts, then one SAEShard call per SAE per batch ---------

    async def features(self, jobs: list[P.FeatureJob]) -> list[P.FeatureResult | P.ItemError]:
        """Each job's answer (see ``protocol.FeatureJob``), or its ItemError: one call may carry several requests'
        jobs, and one job's failure is its own. Jobs from concurrent calls share a forward pass, and the SAE work of
        a whole batch goes out as one SAEShard call per replica, straight from here: activations never travel back
        through the ingress."""
        self._calls["features"] += 1
        return await self._features(jobs)

    async def _features(self, jobs: list[P.FeatureJob]) -> list[P.FeatureResult | P.ItemError]:
        t0 = stage_trace.now()

        async def one(job: P.FeatureJob):
            try:
                self._check(job.tokens, self._job_hooks(job))  # before it joins a batch
                return await self._submit(job)
            except RequestError as e:
                return P.ItemError(e.message, e.status)
            except Exception as e:
                if is_out_of_memory(e):  # its batch was re-run item by item (engine.batching): this one alone fails
                    release_cached_memory(self.device)
                    return P.ItemError("Out of memory while running this prompt; retry shortly", 503)
                log.exception("feature job failed")  # a bug: this job's 500, not its call-mates'
                return P.ItemError("Internal server error", 500)

        out = list(await asyncio.gather(*(one(j) for j in jobs)))
        stage_trace.mark("model_call", t0, len(jobs))
        return out

    async def direct_address(self):
        """``(replica id, DirectAddress or None)``: where a caller may send this replica's features() calls directly
        (deployments.direct; None: direct calls are off, or the socket could not open)."""
        return self.replica_id, (await self._direct.listen() if self._direct is not None else None)

    async def _direct_call(self, payload):
        method, jobs = payload
        if method != "features" or not isinstance(jobs, list):
            raise RequestError(f"Unknown direct call {method!r}")
        self._calls["features_direct"] += 1
        return await self._features(jobs)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (deployments.autoscaling): the prompts this replica holds, and its
        generations and lens runs, where Serve would count the few batched calls that carry them."""
        return {LOAD_METRIC: float(self._prompts + sum(self._in_flight.values()))}

    async def capture(self, req: P.CaptureRequest) -> dict[str, np.ndarray]:
        """Raw activations ``{hook: float32 [len, ...]}`` for one prompt (batched with everything else)."""
        self._calls["capture"] += 1
        self._check(req.tokens, req.hooks)
        return await self._submit(req)

    async def attention(self, req: P.AttentionRequest) -> P.AttentionPattern:
        """One head's attention pattern in activation/attention's sparse form. The capture of the layer's
        ``hook_pattern`` joins the forward passes of everything else; only the kept entries leave this replica."""
        self._calls["attention"] += 1
        hook = f"blocks.{req.layer}.attn.hook_pattern"
        n_layers = self.runner.model.cfg.n_layers
        if not 0 <= req.layer < n_layers:
            raise RequestError(f"Invalid layer: {req.layer}. Must be in [0, {n_layers})")
        self._check(req.tokens, [hook])
        if req.head < 0:
            raise RequestError(f"Invalid head: {req.head}. Heads count from 0")
        pattern = (await self._submit(P.CaptureRequest(req.tokens, [hook])))[hook]  # [heads, seq, seq]
        if req.head >= pattern.shape[0]:  # the ingress checks this first; a handle caller may not
            raise RequestError(f"Invalid head: {req.head}. Must be in [0, {pattern.shape[0]})")
        return await self.compute.run(sparse_pattern, pattern[req.head], light=True)

    def _check(self, tokens: list[int], hooks: list[str]) -> None:
        if not tokens:
            raise RequestError("Cannot run the model on an empty token list")
        vocab = self.runner.model.cfg.d_vocab
        if any(not 0 <= t < vocab for t in tokens):
            raise RequestError(f"token ids must be in 0..{vocab - 1}")
        for h in hooks:
            self.runner.check_hook(h)

    @staticmethod
    def _job_hooks(job: P.FeatureJob) -> list[str]:
        hooks = capture_hooks((t.hook, t.dfa) for t in job.tasks)
        if job.project is not None:
            hooks.append(job.project[0])
        return list(dict.fromkeys(hooks))

    async def _submit(self, item):
        """One prompt's capture (and SAE work), batched with everything else; counted in the replica's load while it
        is here (record_autoscaling_stats)."""
        self._prompts += 1
        try:
            fan_out, i = await self._batcher.submit(item)
            # Shielded: one caller going away must not cancel the SAE calls its batch-mates wait for.
            results = await asyncio.shield(fan_out)
        finally:
            self._prompts -= 1
        r = results[i]
        if isinstance(r, BaseException):
            raise r
        return r

    async def _run_batch(self, _key, items: list) -> list:
        """The Batcher's step: the forward pass only. The SAE calls run in a task of their own, so the next batch's
        forward pass starts while this one's SAEs encode. A lone prompt's pass may burst (engine.compute); a batch
        worth splitting is a wide task, whose prompts split between lanes when no other replica computes."""
        reqs = [it if isinstance(it, P.CaptureRequest) else P.CaptureRequest(it.tokens, self._job_hooks(it)) for it in items]
        wide = len(reqs) > 1 and self.compute.max_lanes > 1 and self._worth_lanes(reqs) and self.runner.thread_safe(reqs)
        captured = await self.compute.run(self._capture_items, items, reqs, light="capture" if len(items) == 1 else False,
                                          wide=wide)
        fan_out = asyncio.ensure_future(self._fan_out(items, captured))
        return [(fan_out, i) for i in range(len(items))]

    def _worth_lanes(self, reqs: list[P.CaptureRequest]) -> bool:
        """Whether the batch's forward pass is work enough for two lanes (the demo pack's few milliseconds run slower
        split, and a wide task keeps every other replica waiting while it runs): its tokens at the CPU-seconds per
        token captures took so far."""
        return self._token_s is not None and self._token_s * sum(len(r.tokens) for r in reqs) >= 2 * self.min_lane_work_s

    def _capture_items(self, items: list, reqs: list[P.CaptureRequest]) -> list:
        t0 = stage_trace.now()
        acts = self._locked_capture(reqs)
        stage_trace.mark("capture", t0, len(reqs))
        out = []
        for it, a in zip(items, acts):
            proj = None
            if isinstance(it, P.FeatureJob) and it.project is not None:
                hook, vector = it.project
                proj = F.vector_projection(a[hook], vector)
            out.append((a, proj))
        return out

    def _shard(self, sae_id: str) -> Handle:
        h = self._shards.get(sae_id)
        if h is None:
            if self._sae_shard is None:
                raise RequestError("This model deployment has no SAEShard to send SAE work to", 500)
            h = self._shards[sae_id] = self._sae_shard.options(multiplexed_model_id=sae_id)
        return h

    def _call_shard(self, sae_id: str, batch: P.ShardBatch):
        """One SAEShard call: over gRPC when its activations are small enough, else by reference through the object
        store (deployments.transport)."""
        h = self._shard(sae_id)
        limit = self._grpc_max_bytes
        if limit is None or payload_bytes(a for it in batch.items for a in (it.acts, *(it.dfa_inputs or ()))) > limit:
            self._calls["shard_run_by_reference"] += 1
            return h.by_reference.run.remote(batch)
        return h.run.remote(batch)

    async def _fan_out(self, items: list, captured: list) -> list:
        """The batch's SAE work: one SAEShard call per replica that (last we heard) holds the SAEs, one per SAE not
        yet placed; SAEs a replica turns out not to hold go again on their own (Serve routes those by SAE id)."""
        by_sae: dict[str, list[tuple[int, int, P.ShardItem]]] = {}
        for k, (it, (acts, _)) in enumerate(zip(items, captured)):
            if isinstance(it, P.FeatureJob):
                for t, task in enumerate(it.tasks):
                    dfa = tuple(acts[h] for h in dfa_hooks(task.hook)) if task.dfa else None
                    by_sae.setdefault(task.sae_id, []).append((k, t, P.ShardItem(task.sae_id, acts[task.hook], task.op, dfa)))
        per_item = [[None] * len(it.tasks) if isinstance(it, P.FeatureJob) else None for it in items]
        merge = {k: (it.merge, self._by_sum(it)) for k, it in enumerate(items)
                 if isinstance(it, P.FeatureJob) and it.merge is not None}
        groups: dict[object, list[str]] = {}
        for sae_id in by_sae:
            groups.setdefault(self._home.get(sae_id) or ("unplaced", sae_id), []).append(sae_id)
        pending = list(groups.values())
        while pending:
            retry = await self._send(pending, by_sae, per_item, merge)
            pending = [[sae_id] for sae_id in retry]
        out = []
        for k, (it, (acts, proj)) in enumerate(zip(items, captured)):
            if isinstance(it, P.CaptureRequest):
                out.append(acts)
                continue
            errors = [r for r in per_item[k] if isinstance(r, BaseException)]
            if errors:
                out.append(errors[0])
                continue
            res = P.FeatureResult(results=per_item[k], projection=proj)
            if it.merge is not None:  # each shard replica's share comes merged already (protocol.MergeGroup)
                pairs = [p for t, r in enumerate(per_item[k])
                         for p in (r.pairs if isinstance(r, P.MergedRanking) else [(t, row) for row in r])]
                res.merged, res.results = F.merge_pairs(pairs, it.merge, merge[k][1]), []
            out.append(res)
        return out

    @staticmethod
    def _by_sum(job: P.FeatureJob) -> bool:
        return any(isinstance(t.op, P.RankOp) and t.op.sort_by_token_indexes for t in job.tasks)

    async def _send(self, groups: list[list[str]], by_sae: dict, per_item: list, merge: dict) -> list[str]:
        """One call per group (routed by its first SAE); fills ``per_item``; returns the SAEs that came back NotHere.
        A group whose SAEs' replica has a lane goes on it; one the lane drops goes again through Serve."""
        self._calls["shard_run"] += len(groups)
        per_group = [[e for sae_id in g for e in by_sae[sae_id]] for g in groups]
        batches = [shard_batch(entries, merge) for entries in per_group]
        lanes = [self._direct_for(g, b) for g, b in zip(groups, batches)]
        t0 = stage_trace.now()
        answers = await asyncio.gather(*(self._call_shard(g[0], b) if lane is None else self._on_direct(lane, g, b)
                                         for g, b, lane in zip(groups, batches, lanes)), return_exceptions=True)
        stage_trace.mark("shard_round_trip", t0, sum(map(len, per_group)))
        retry: list[str] = []
        for g, entries, answer, lane in zip(groups, per_group, answers, lanes):
            if isinstance(answer, BaseException):
                err = translate_remote_error(answer)
                for sae_id in g:
                    self._home.pop(sae_id, None)
                for k, t, _ in entries:
                    per_item[k][t] = err
                continue
            moved = set()
            for (k, t, item), r in zip(entries, answer.results):
                if isinstance(r, P.NotHere):
                    moved.add(item.sae_id)
                else:
                    per_item[k][t] = r.exception() if isinstance(r, P.ItemError) else r
            for sae_id in g:
                if sae_id in moved:
                    self._home.pop(sae_id, None)
                    if sae_id != g[0] or lane is not None:  # Serve serves a call's lead where it routed it; a lane does not
                        retry.append(sae_id)
                else:
                    self._home[sae_id] = answer.replica
            if (self._direct_calls and answer.direct is not None and answer.replica not in self._directs
                    and reachable(answer.direct)):
                self._directs[answer.replica] = DirectClient(answer.direct)
        return retry

    def _direct_for(self, group: list[str], batch: P.ShardBatch) -> DirectClient | None:
        """The lane of the replica that holds the group's SAEs, if it has one and the activations are small enough
        for gRPC (``grpc_max_bytes``, else DIRECT_MAX_BYTES): larger ones go through Ray's object store, by Serve."""
        replica = self._home.get(group[0])
        lane = self._directs.get(replica) if replica is not None else None
        if lane is None:
            return None
        if lane.closed:
            del self._directs[replica]
            return None
        limit = self._grpc_max_bytes if self._grpc_max_bytes is not None else DIRECT_MAX_BYTES
        if payload_bytes(a for it in batch.items for a in (it.acts, *(it.dfa_inputs or ()))) > limit:
            return None
        return lane

    async def _on_direct(self, lane: DirectClient, group: list[str], batch: P.ShardBatch) -> P.ShardReply:
        self._calls["shard_run_direct"] += 1
        try:
            return await lane.call(("run", batch))
        except DirectClosed:  # the replica went away or the connection broke: Serve routes it again
            self._calls["shard_run_direct_dropped"] += 1
            return await self._call_shard(group[0], batch)

    def _observe_batch(self, waits_s: list[float]) -> None:
        self._metrics.batch_size.observe(len(waits_s))
        for w in waits_s:
            self._metrics.queue_wait_ms.observe(w * 1000)

    def _locked_capture(self, requests: list[P.CaptureRequest]):
        with self._model_lock:
            t0, cpu0 = time.monotonic(), time.thread_time()
            parts = lane_parts([len(r.tokens) for r in requests], self.compute.lanes)
            if len(parts) == 1:
                out = self.runner.capture(requests)
            else:  # a wide task given lanes: each captures a run of like-length prompts (engine.capture.lane_parts)
                out = [None] * len(requests)
                done = self.compute.parallel([functools.partial(self.runner.capture, [requests[i] for i in p]) for p in parts])
                for p, acts in zip(parts, done):
                    for i, a in zip(p, acts):
                        out[i] = a
                self._capture_counts["lane_batches"] += 1
            self._token_s = moving_average(self._token_s,
                                           work_since(cpu0, len(parts)) / max(1, sum(len(r.tokens) for r in requests)))
        st = self._capture_counts
        st["batches"] += 1
        st["prompts"] += len(requests)
        st["tokens"] += sum(len(r.tokens) for r in requests)
        st["forward_s"] += time.monotonic() - t0
        st["max_batch"] = max(st["max_batch"], len(requests))
        return out

    async def capture_stats(self) -> dict:
        """Capture batches, prompts, prompt tokens and seconds spent in forward passes since the replica started
        (``lean_passes`` / ``hooked_passes``: forward passes through engine.decoder / TransformerLens's hooks);
        handle calls received and made (``calls``: features, capture, shard_run = calls made to SAEShard,
        shard_run_by_reference = those sent by reference: too large for gRPC, or gRPC off); calls made over gRPC and
        sent again by reference (``resent``, per method: deployments.transport); its compute thread's tasks
        (``compute``: how many ran, how many as CPU bursts); ``lane_batches``: batches whose prompts split between
        lanes (a wide task on an otherwise idle CPU)."""
        return {**self._capture_counts, **self.runner.stats, "calls": dict(self._calls), "resent": resent(),
                "compute": dict(self.compute.stats)}

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
        self._in_flight["generate"] += 1
        try:
            async for events in sub:
                yield events
        finally:
            self._in_flight["generate"] -= 1
            sub.cancel()

    # --- lens/prompt ---------------------------------------------------------------------------------------

    def _lens_engine(self, path: str | None) -> LensEngine:
        m = self.runner.model
        lens = JacobianLens.from_file(path, m.cfg.d_model, m.cfg.n_layers, self.device) if path else None
        if lens is not None:
            log.info("Jacobian lens %s: layers %s", path, lens.source_layers)
        return LensEngine(m, lens, lock=self._model_lock)

    async def lens(self, req: P.LensRequest):
        """Stream one lens run (``handle.options(stream=True).lens.remote(req)``): a ``LensStarted`` once it is
        accepted, then ``LensChunk``s in position order.

        The prefill, each chunk of prompt read-outs and each decode step are one compute-thread task apiece, so a
        lens run takes turns with captures and generation steps, and a caller that goes away stops it at the next
        step. With ``fail_if_busy`` it is refused (``Busy``, 429) while another lens run or a generation is under
        way on this replica.
        """
        st = self._lens_counts
        if req.fail_if_busy and sum(self._in_flight.values()) > 0:
            st["busy"] += 1
            raise Busy()
        self._in_flight["lens"] += 1
        st["runs"] += 1
        st["active"] += 1
        try:
            run = await self.compute.run(LensRun, self.lens_engine, req)
            yield P.LensStarted(stop_tokens=list(self.lens_engine.stop_tokens))
            while not run.done:
                chunk = await self.compute.run(run.step)
                if chunk is not None:
                    st["positions"] += len(chunk.tokens)
                    st["generated"] += len(chunk.tokens) if chunk.generated else 0
                    yield chunk
            st["finished"] += 1
        except (asyncio.CancelledError, GeneratorExit):
            st["cancelled"] += 1
            raise
        except RequestError:
            st["failed"] += 1
            raise
        except Exception as e:
            st["failed"] += 1
            if is_out_of_memory(e):
                release_cached_memory(self.device)
                raise Overloaded("Out of memory while running this lens request; retry shortly") from None
            log.exception("lens run failed")
            raise
        finally:
            st["active"] -= 1
            self._in_flight["lens"] -= 1

    async def lens_stats(self) -> dict:
        """Lens runs started, under way (``active``), finished, cancelled (the caller went away), failed and refused
        as busy; positions read out and tokens generated."""
        return dict(self._lens_counts)

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
        check_device(self.device)  # this replica's device, not device 0: a poisoned CUDA context raises here
