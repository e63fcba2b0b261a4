"""SAEShard: a thin Ray Serve wrapper that holds SAEs and runs engine.features on them.

SAEs are multiplexed by id (``serve.multiplexed``): requests for an SAE are routed to a replica that
already holds it, a miss loads it (once, under Serve's loader lock), and each replica keeps at most
``max_loaded_saes`` SAEs and ``max_sae_bytes`` bytes (LRU; an SAE in use is never evicted). ``run`` takes a whole
model batch's items in one call (ModelDeployment sends them): the items of the SAE it is routed by, plus those of
any other SAE this replica holds, so one call serves every SAE a replica holds; each SAE's items are encoded as one
matmul. A call worth two lanes' work (by the CPU-seconds per multiply-add of earlier calls) is a wide task
(engine.compute): given lanes, its items split into groups of about equal work, each answered on its own thread.
An item that fails gets its own error in its place. Dense ``[seq, d_sae]`` activations never leave the replica.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

import numpy as np
import torch
from ray import serve

from deployments import protocol as P
from deployments import stage_trace
from deployments.autoscaling import LOAD_METRIC, with_load_policy
from deployments.checks import check_index
from deployments.engine import features as F
from deployments.engine import geometry as G
from deployments.engine.compute import (MIN_LANE_WORK_S, SHARED_LANES, ComputeThread, burst_threads_for, lane_groups,
                                        moving_average, work_since)
from deployments.engine.devices import check_device, release_cached_memory, same_device, sae_budget_bytes
from deployments.engine.errors import RequestError, is_out_of_memory
from deployments.engine.loading import load_sae, parse_dtype, resolve_device, sae_nbytes
from deployments.specs import SAESpec
from deployments.engine.residency import Resident, evict_until
from deployments.direct import DirectServer, replica_id

log = logging.getLogger("saeserve.sae_shard")


class ShardMetrics:
    """The project's own Prometheus metrics (exported through Ray's metrics agent, tagged per replica)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.loads = Counter("saeserve_sae_loads", description="SAEs loaded into this replica")
        self.hits = Counter("saeserve_sae_hits", description="Requests whose SAE was already resident")
        self.evictions = Counter("saeserve_sae_evictions", description="SAEs evicted (LRU, count or byte budget)")
        self.resident = Gauge("saeserve_sae_resident", description="SAEs resident in this replica")
        self.resident_bytes = Gauge("saeserve_sae_resident_bytes", description="Bytes of SAE weights resident")
        self.encode_batch_size = Histogram("saeserve_sae_encode_batch_size", description="Encodes per SAE batch",
                                           boundaries=[1, 2, 4, 8, 16, 32, 64])


class LoadedSAE(Resident):
    """An SAE resident in this replica, with a count of operations using it (never evicted while > 0).

    ``nbytes`` is everything the SAE may hold on its device: its weights, plus the cosine index
    (engine.geometry.DecoderIndex: row norms, and a float32 copy of a half-precision decoder). The index is built
    on the first cosine query, but counted from the load: building it must never push the replica past
    ``max_sae_bytes``, and nothing can be evicted from inside a query that already holds its SAE.
    """

    def __init__(self, spec: SAESpec, sae):
        super().__init__()
        self.spec = spec
        self.sae = sae
        self.nbytes = sae_nbytes(sae) + G.DecoderIndex.nbytes_for(*sae.W_dec.shape, sae.W_dec.dtype)
        self._decoder_index: G.DecoderIndex | None = None

    @property
    def decoder_index(self) -> G.DecoderIndex:
        if self._decoder_index is None:  # built on first cosine query, kept while the SAE is resident
            self._decoder_index = G.DecoderIndex(self.sae.W_dec)
        return self._decoder_index


def single_answer(s: LoadedSAE, item: P.ShardItem, feats: torch.Tensor, column: int | None = None) -> P.FeatureActivation:
    """activation/single's answer from ``feats`` (every feature's codes, or only some: ``column`` is where the item's
    feature is), with its direct feature attribution where the item carries its inputs."""
    op = item.op
    row = F.single_feature(feats, op.index, op.zero_positions, op.drop_first, column)
    if item.dfa_inputs is not None:
        offset = 1 if op.drop_first else 0  # DFA in the same coordinates as ``values``
        full = F.direct_feature_attribution(F.encoder_matrix(s.sae), *item.dfa_inputs, op.index, row.max_value_index + offset)
        row.dfa_values = full[offset:]
    return row


def merge_answers(answers: list, merges: list[P.MergeGroup]) -> list:
    """``answers`` with each merge group's rankings replaced by their merge (protocol.MergeGroup): the group's first
    answered item gets the merged pairs, its other answered items an empty MergedRanking; failed items keep theirs.
    A ranking is a list of rows or an F.Ranking (rank_many's, rows built on demand); any F.Ranking left unmerged
    comes back as its list of rows. A group of F.Rankings by max merges them without building the rows it drops."""
    ranked = (list, F.Ranking)
    out = list(answers)
    for g in merges:
        done = [(i, src) for i, src in zip(g.items, g.sources) if 0 <= i < len(answers) and isinstance(answers[i], ranked)]
        if not done:
            continue
        if not g.by_sum and all(isinstance(answers[i], F.Ranking) for i, _ in done):
            merged = F.merge_rankings([(src, answers[i]) for i, src in done], g.num_results)
        else:
            pairs = [(src, row) for i, src in done for row in _rows(answers[i])]
            merged = F.merge_pairs(pairs, g.num_results, g.by_sum)
        out[done[0][0]] = P.MergedRanking(merged)
        for i, _ in done[1:]:
            out[i] = P.MergedRanking()
    if not merges and not any(isinstance(a, F.Ranking) for a in answers):
        return answers
    return [_rows(a) for a in out]


def _rows(answer):
    return answer.rows() if isinstance(answer, F.Ranking) else answer


# Codes up to this many elements (2 MB in float32) are joined to be ranked with other SAEs': below it a ranking's
# dozen tensor ops cost more than the copy that joins them (the demo pack's 4 SAEs x 5 prompts: one rank_many call
# for the lot took 1.3 ms, four took 2.7), above it the copy would cost memory for nothing.
JOIN_RANK_ELEMENTS = 1 << 19


class _RankQueue:
    """Plain rankings (engine.features.rank_many by max) waiting to be ranked together: the prompts of one SAE's
    chunk and, while their codes stay under JOIN_RANK_ELEMENTS and have the same width, dtype and device, of the
    next SAEs'. Each item's answer is an F.Ranking (rows built by merge_answers, most of them never) or, for a lone
    prompt, rank_features' rows (cheaper for one: 0.2 against 0.5 ms on the demo pack)."""

    def __init__(self, items: list[P.ShardItem], out: list, device: str):
        self.items, self.out, self.device = items, out, device
        self._codes: list[torch.Tensor] = []  # one tensor per chunk added: its plain items' codes, stacked
        self._numel = 0  # their elements
        self._idx: list[int] = []
        self._parts: list[torch.Tensor] = []

    def add(self, codes: torch.Tensor | None, idx: list[int], parts: list[torch.Tensor]) -> None:
        """Items ``idx`` (positions in ``items``) whose codes are ``parts``; ``codes``: those stacked, if the caller
        has them (a chunk of plain items only)."""
        codes = codes if codes is not None else (parts[0] if len(parts) == 1 else torch.cat(parts))
        if self._codes and not self._joins(codes):
            self.flush()
        self._codes.append(codes)
        self._numel += codes.numel()
        self._idx += idx
        self._parts += parts
        if self._numel >= JOIN_RANK_ELEMENTS:
            self.flush()

    def _joins(self, codes: torch.Tensor) -> bool:
        first = self._codes[0]
        return (codes.shape[1] == first.shape[1] and codes.dtype == first.dtype and codes.device == first.device
                and self._numel + codes.numel() <= JOIN_RANK_ELEMENTS)

    def flush(self) -> None:
        if not self._idx:
            return
        codes, idx, parts = self._codes, self._idx, self._parts
        self._codes, self._numel, self._idx, self._parts = [], 0, [], []
        ops = [self.items[i].op for i in idx]
        if len(idx) > 1:
            try:
                ranked = F.rank_many(codes[0] if len(codes) == 1 else torch.cat(codes), [p.shape[0] for p in parts],
                                     [o.num_results for o in ops], [o.ignore_bos for o in ops], lazy=True)
            except Exception as e:  # then one by one below, each item with its own outcome
                if is_out_of_memory(e):
                    release_cached_memory(self.device)
                else:
                    log.exception("ranking %d prompts together failed: ranking them one by one", len(idx))
            else:
                for i, r in zip(idx, ranked):
                    self.out[i] = r
                return
        for i, f, op in zip(idx, parts, ops):
            try:
                self.out[i] = F.rank_features(f, op.num_results, op.sort_by_token_indexes, op.ignore_bos, op.feature_filter)
            except RequestError as e:
                self.out[i] = P.ItemError(e.message, e.status)


def _gpu_share() -> float | None:
    """The GPUs Ray assigned this replica (a fraction when it shares a card), or None outside a Ray actor."""
    try:
        import ray

        return ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker (tests, scripts): no share to go by
        return None


def estimated_nbytes(spec: SAESpec, dtype: str) -> int:
    """``LoadedSAE.nbytes`` of this SAE before it is loaded (a standard SAE's parameters: W_enc, W_dec, b_enc,
    b_dec; other architectures differ by a few ``d_sae`` vectors), to make room for it first."""
    torch_dtype = parse_dtype(dtype)
    per = torch.empty((), dtype=torch_dtype).element_size()
    weights = (2 * spec.d_in * spec.d_sae + spec.d_sae + spec.d_in) * per
    return weights + G.DecoderIndex.nbytes_for(spec.d_sae, spec.d_in, torch_dtype)


@serve.deployment(
    name="SAEShard",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    autoscaling_config=with_load_policy({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}),
    health_check_period_s=10,
)
class SAEShard:
    def __init__(self, specs: list[dict], device: str = "auto", dtype: str = "float32", max_loaded_saes: int = 64,
                 max_sae_bytes: int | None = None, encode_batch_size: int = 16,
                 torch_threads: int | None = None, burst_torch_threads: int | None = None,
                 shared_lanes: int = SHARED_LANES, direct_calls: bool = True):
        self.specs = {s["id"]: SAESpec(**s) for s in specs}
        self.device = resolve_device(device)
        # every torch op of this replica runs here
        self.compute = ComputeThread("sae-compute", torch_threads, burst_threads_for(self.device, burst_torch_threads),
                                     shared_lanes=shared_lanes)
        self.dtype = dtype
        self.max_loaded_saes = max_loaded_saes
        # on a GPU with no cap given, the replica's share of the card bounds what its SAEs may hold
        if max_sae_bytes is None and self.device.startswith("cuda"):
            max_sae_bytes = sae_budget_bytes(self.device, _gpu_share())
        self.max_sae_bytes = max_sae_bytes
        if self.max_sae_bytes is not None:
            log.info("SAE budget of this replica: %.2f GB (weights and cosine indexes)", self.max_sae_bytes / 1e9)
        self.stats = {"requests": 0, "loads": 0, "evictions": 0, "load_seconds": 0.0, "lane_batches": 0}
        self.min_lane_work_s = MIN_LANE_WORK_S  # a lane's least work for a call's items to split
        self._madd_s: float | None = None  # CPU-seconds per multiply-add of the calls so far (a moving average)
        self._calls = collections.Counter()  # handle calls received, per method (the benchmark's calls per request)
        self._open_runs: dict[int, float] = {}  # the prompts of each run call in flight: the load autoscaling reads
        self._metrics = ShardMetrics()
        # SAE Lens (and TransformerLens under it) is imported by the first load; import it now, while the replica
        # starts, so that the first request for an SAE does not also pay seconds of imports.
        importlib.import_module("sae_lens")

        async def load(sae_id: str) -> LoadedSAE:
            return await self._load(sae_id)

        # Serve's multiplexing routes each SAE id to a replica holding it and loads a miss once (under its
        # lock). The budget (count and bytes) is enforced in _load, which waits for a victim to go idle.
        self._loader = load  # Serve keeps its cache (``__serve_multiplex_wrapper``) on the loader function
        self._get = serve.multiplexed(max_num_models_per_replica=-1)(load)
        self.encode_batch_size = encode_batch_size
        self.replica_id = replica_id()
        # run() calls from a model replica that already knows this replica holds their SAEs come on a direct lane
        # (deployments.direct), started on the first run() call (in the replica's event loop)
        self._direct = DirectServer(self._direct_call) if direct_calls else None

    # --- residency -----------------------------------------------------------------------------------

    def _resident(self) -> "OrderedDict[str, LoadedSAE]":
        wrapper = self._loader.__dict__.get("__serve_multiplex_wrapper")
        return wrapper.models if wrapper is not None else OrderedDict()

    async def _evict_for(self, incoming: int) -> None:
        wrapper = self._loader.__dict__["__serve_multiplex_wrapper"]
        models = wrapper.models

        def over_budget() -> bool:
            return len(models) >= self.max_loaded_saes or (
                self.max_sae_bytes is not None and sum(m.nbytes for m in models.values()) + incoming > self.max_sae_bytes)

        def evicted(victim_id: str, victim: LoadedSAE) -> None:
            wrapper._push_multiplexed_replica_info = True  # tell routers this replica no longer holds it
            self.stats["evictions"] += 1
            self._metrics.evictions.inc()
            log.info("evicted SAE %s (%d bytes)", victim_id, victim.nbytes)

        await evict_until(models, over_budget, wrapper.unload_model_lru, evicted)

    async def _load(self, sae_id: str) -> LoadedSAE:
        spec = self.specs.get(sae_id)
        if spec is None:
            raise RequestError(f"Invalid SAE ID or type: {sae_id}")
        await self._evict_for(estimated_nbytes(spec, self.dtype))
        t0 = time.monotonic()
        sae = await self.compute.run(load_sae, spec, self.device, self.dtype)
        loaded = LoadedSAE(spec, sae)
        self.stats["loads"] += 1
        self.stats["load_seconds"] += time.monotonic() - t0
        self._metrics.loads.inc()
        return loaded

    @asynccontextmanager
    async def _use(self):
        """The request's SAE (by multiplexed id), held resident for the duration of the block."""
        self.stats["requests"] += 1
        loads_before = self.stats["loads"]
        s = await self._get(serve.get_multiplexed_model_id())
        if self.stats["loads"] == loads_before:
            self._metrics.hits.inc()
        try:
            with s.held():  # no await since the lookup: the SAE cannot have been evicted in between
                yield s
        finally:
            resident = self._resident()
            self._metrics.resident.set(len(resident))
            self._metrics.resident_bytes.set(sum(m.nbytes for m in resident.values()))

    @staticmethod
    def _madds(saes: dict[str, LoadedSAE], item: P.ShardItem) -> int:
        """An item's encode in multiply-adds (its positions times the SAE's ``d_in`` and encoded features: one for a
        separable SAE's activation/single, which encodes only its column), to weigh items against each other."""
        s = saes.get(item.sae_id)
        if s is None:
            return 0
        width = 1 if isinstance(item.op, P.SingleOp) and F.separable(s.sae) else s.spec.d_sae
        return item.acts.shape[0] * s.spec.d_in * width

    def _worth_lanes(self, saes: dict[str, LoadedSAE], items: list[P.ShardItem]) -> bool:
        """Whether a call's items are work enough for two lanes (the demo pack's milliseconds run slower split): their
        multiply-adds at the CPU-seconds per multiply-add of the calls so far."""
        return (len(items) > 1 and self.compute.max_lanes > 1 and self._madd_s is not None
                and self._madd_s * sum(self._madds(saes, it) for it in items) >= 2 * self.min_lane_work_s)

    def _run_items(self, saes: dict[str, LoadedSAE], items: list[P.ShardItem], merges: list[P.MergeGroup] = ()) -> list:
        """Every item's answer (on the compute thread), split between the task's lanes when it has more than one:
        items in groups of about equal multiply-adds (engine.compute.lane_groups), each answered on its own thread
        as :meth:`_answer_items` answers them all."""
        t0, wall0 = time.thread_time(), stage_trace.now()
        madds = [self._madds(saes, it) for it in items]
        groups = lane_groups(madds, self.compute.lanes) if self.compute.lanes > 1 else [list(range(len(items)))]
        sizes: list[list[int]] = [[] for _ in groups]  # each group's encode chunk sizes (observed here, not in lanes)
        if len(groups) == 1:
            out = self._answer_items(saes, items, sizes[0])
        else:
            out = [None] * len(items)
            done = self.compute.parallel([functools.partial(self._answer_items, saes, [items[i] for i in g], n)
                                          for g, n in zip(groups, sizes)])
            for g, answers in zip(groups, done):
                for i, a in zip(g, answers):
                    out[i] = a
            self.stats["lane_batches"] += 1
        for n in sizes:
            for k in n:
                self._metrics.encode_batch_size.observe(k)
        if sum(madds):
            self._madd_s = moving_average(self._madd_s, work_since(t0, len(groups)) / sum(madds))
        out = merge_answers(out, merges)
        stage_trace.mark("shard_compute", wall0, len(items))
        return out

    def _answer_items(self, saes: dict[str, LoadedSAE], items: list[P.ShardItem], chunk_sizes: list[int]) -> list:
        """Every item's answer: per SAE, its items' activations encoded as one matmul (in chunks of
        ``encode_batch_size`` prompts, whose sizes go to ``chunk_sizes``), then each item's operation. Plain rankings
        (activation/all's usual case) wait in a :class:`_RankQueue` and are ranked together, those of several SAEs
        in one engine.features.rank_many call while their codes are small. A failing item gets an ItemError.
        Touches nothing shared but the SAEs' weights, which it only reads: lanes run it side by side."""
        out: list = [P.NotHere()] * len(items)
        by_sae: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if it.sae_id in saes:
                by_sae.setdefault(it.sae_id, []).append(i)
        queue = _RankQueue(items, out, self.device)
        for sae_id, idx in by_sae.items():
            s = saes[sae_id]
            raw = [i for i in idx if isinstance(items[i].op, P.SimilarityOp)]  # work on the activations, not the codes
            for i in raw:
                out[i] = self._on_activations(s, items[i])
            idx = [i for i in idx if not isinstance(items[i].op, P.SimilarityOp)]
            if F.separable(s.sae):  # activation/single: only the asked features' columns
                singles = [i for i in idx if isinstance(items[i].op, P.SingleOp)]
                for i, r in zip(singles, self._singles(s, [items[i] for i in singles])):
                    out[i] = r
                idx = [i for i in idx if not isinstance(items[i].op, P.SingleOp)]
            # a sequence SAE attends over its prompt: stacking prompts along positions would mix them
            step = 1 if F.is_sequence_sae(s.sae) else self.encode_batch_size
            for k in range(0, len(idx), step):
                chunk = idx[k:k + step]
                acts = [items[i].acts for i in chunk]
                chunk_sizes.append(len(chunk))
                try:
                    feats = F.encode(s.sae, acts[0] if len(acts) == 1 else np.concatenate(acts, axis=0))
                    parts = torch.split(feats, [a.shape[0] for a in acts]) if len(acts) > 1 else (feats,)
                except RequestError as e:
                    for i in chunk:
                        out[i] = P.ItemError(e.message, e.status)
                    continue
                except Exception as e:  # its own out of memory is these items' 503; the next chunk may fit
                    if not is_out_of_memory(e):
                        raise
                    release_cached_memory(self.device)
                    for i in chunk:
                        out[i] = P.ItemError("Out of memory while encoding these prompts; retry shortly", 503)
                    continue
                plain = [j for j, i in enumerate(chunk) if self._plain_rank(items[i])]
                if plain:
                    queue.add(feats if len(plain) == len(chunk) else None, [chunk[j] for j in plain], [parts[j] for j in plain])
                queued = set(plain)
                for j, (i, f) in enumerate(zip(chunk, parts)):
                    if j in queued:
                        continue
                    try:
                        out[i] = self._apply(s, items[i], f)
                    except RequestError as e:
                        out[i] = P.ItemError(e.message, e.status)
        queue.flush()
        return out

    @staticmethod
    def _singles(s: LoadedSAE, items: list[P.ShardItem]) -> list:
        """activation/single's items of a separable SAE, encoding only the features they ask for (one product for
        them all: a feature costs ``d_in`` multiply-adds a position, not ``d_in * d_sae``)."""
        out: list = [None] * len(items)
        ok = []
        for j, it in enumerate(items):
            try:
                check_index(it.op.index, s.spec.d_sae, s.spec.id)
                ok.append(j)
            except RequestError as e:
                out[j] = P.ItemError(e.message, e.status)
        if not ok:
            return out
        columns = sorted({items[j].op.index for j in ok})
        acts = [items[j].acts for j in ok]
        try:
            feats = F.encode_columns(s.sae, acts[0] if len(acts) == 1 else np.concatenate(acts, axis=0), columns)
        except RequestError as e:
            for j in ok:
                out[j] = P.ItemError(e.message, e.status)
            return out
        at = {c: k for k, c in enumerate(columns)}
        for j, f in zip(ok, torch.split(feats, [a.shape[0] for a in acts])):
            out[j] = single_answer(s, items[j], f, at[items[j].op.index])
        return out

    @staticmethod
    def _plain_rank(item: P.ShardItem) -> bool:
        op = item.op
        return (isinstance(op, P.RankOp) and not op.sort_by_token_indexes and op.feature_filter is None
                and item.dfa_inputs is None)

    def _on_activations(self, s: LoadedSAE, item: P.ShardItem):
        """An item computed from its activations rather than its codes (similarity-matrix-pred), or its ItemError."""
        try:
            return F.predicted_similarity(s.sae, item.acts)
        except RequestError as e:
            return P.ItemError(e.message, e.status)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            release_cached_memory(self.device)
            return P.ItemError("Out of memory while computing this similarity matrix; retry shortly", 503)

    @staticmethod
    def _apply(s: LoadedSAE, item: P.ShardItem, feats: torch.Tensor):
        """One item's answer from its encoded activations (on the compute thread)."""
        op = item.op
        if isinstance(op, P.RankOp):
            for i in op.feature_filter or []:
                check_index(i, s.spec.d_sae, s.spec.id)
            rows = F.rank_features(feats, op.num_results, op.sort_by_token_indexes, op.ignore_bos, op.feature_filter)
            if item.dfa_inputs is not None:
                for row in rows:
                    row.dfa_values = F.direct_feature_attribution(F.encoder_matrix(s.sae), *item.dfa_inputs, row.index, row.max_value_index)
            return rows
        if isinstance(op, P.SingleOp):
            check_index(op.index, s.spec.d_sae, s.spec.id)
            return single_answer(s, item, feats)
        if isinstance(op, P.TopkOp):
            return F.topk_by_token(feats, op.top_k)
        if isinstance(op, P.ActiveOp):
            return F.active_entries(feats, op.skip_positions)
        raise RequestError(f"Unknown SAE operation {type(op).__name__}")

    async def run(self, batch: P.ShardBatch) -> P.ShardReply:
        """Items for the call's SAE (the multiplexed id: loaded here if missing) and for any other SAE this replica
        already holds, in one compute task; items for SAEs it does not hold come back as ``NotHere``."""
        self._calls["run"] += 1
        return await self._counted(batch, routed=True)

    async def _direct_call(self, payload) -> P.ShardReply:
        """A run() that came on the direct lane: its SAEs are served only if this replica holds them (``NotHere``
        otherwise: the caller sends those through Serve, which routes and loads)."""
        method, batch = payload
        if method != "run" or not isinstance(batch, P.ShardBatch):
            raise RequestError(f"Unknown direct call {method!r}")
        self._calls["direct_run"] += 1
        return await self._counted(batch, routed=False)

    async def _counted(self, batch: P.ShardBatch, routed: bool) -> P.ShardReply:
        t0 = stage_trace.now()
        # a model batch's call carries one item per (prompt, SAE): its prompts are its items over its SAEs
        key = id(batch)
        self._open_runs[key] = len(batch.items) / max(1, len({it.sae_id for it in batch.items}))
        try:
            return await self._run(batch, routed)
        finally:
            del self._open_runs[key]
            stage_trace.mark("shard_call", t0, len(batch.items))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (deployments.autoscaling): the prompts of the calls in flight, where
        Serve would count the one call per model batch that carries them."""
        return {LOAD_METRIC: float(sum(self._open_runs.values()))}

    async def _run(self, batch: P.ShardBatch, routed: bool = True) -> P.ShardReply:
        async with (self._use() if routed else contextlib.nullcontext()) as lead:
            resident = self._resident()
            saes = {lead.spec.id: lead} if lead is not None else {}
            with contextlib.ExitStack() as held:
                for sae_id in dict.fromkeys(it.sae_id for it in batch.items):
                    m = resident.get(sae_id) if sae_id not in saes else None
                    if m is not None:  # no await since the lookup: it cannot be evicted before it is held
                        held.enter_context(m.held())
                        resident.move_to_end(sae_id)  # a use, for the LRU order, as a lookup by id would count it
                        saes[sae_id] = m
                        self.stats["requests"] += 1
                        self._metrics.hits.inc()
                results = await self.compute.run(self._run_items, saes, batch.items, batch.merges,
                                                 light="encode" if len(batch.items) == 1 or batch.one_request else False,
                                                 # one request's few items split unevenly: it bursts instead
                                                 wide=not batch.one_request and self._worth_lanes(saes, batch.items))
        return P.ShardReply(results, self.replica_id, await self._direct.listen() if self._direct is not None else None)

    async def vectors(self, req: P.VectorsRequest) -> np.ndarray:
        """Decoder rows ``W_dec[indices]`` (steering vectors, cosine queries), float32 ``[len, d_in]``."""
        self._calls["vectors"] += 1
        async with self._use() as s:
            for i in req.indices:
                check_index(i, s.spec.d_sae, s.spec.id)
            return await self.compute.run(lambda: G.decoder_rows(s.sae.W_dec, req.indices).numpy(), light=True)

    async def encoder_vector(self, req: P.EncoderVectorRequest) -> list[float]:
        self._calls["encoder_vector"] += 1
        async with self._use() as s:
            check_index(req.index, s.spec.d_sae, s.spec.id)
            return await self.compute.run(G.encoder_vector, F.encoder_matrix(s.sae), req.index, light=True)

    async def top_cosine(self, req: P.CosineRequest) -> tuple[list[int], list[float]]:
        self._calls["top_cosine"] += 1
        async with self._use() as s:
            # the index itself is built on first use: on the compute thread too
            return await self.compute.run(
                lambda: s.decoder_index.top_cosine(torch.as_tensor(np.asarray(req.query, dtype=np.float32)), req.num_results),
                light=True)

    async def metrics(self) -> dict:
        """This replica's SAE cache: resident ids and bytes, loads, hits, evictions."""
        resident = self._resident()
        return {**self.stats, "calls": dict(self._calls), "compute": dict(self.compute.stats), "replica": self.replica_id,
                "hits": self.stats["requests"] - self.stats["loads"], "resident": list(resident),
                "resident_bytes": sum(m.nbytes for m in resident.values())}

    def check_health(self) -> None:
        """Fails when this replica cannot serve (no SAEs, or an unusable device), so Serve replaces it."""
        if not self.specs:
            raise RuntimeError("no SAEs configured")
        check_device(self.device)  # this replica's device, not device 0
        for sae_id, loaded in self._resident().items():
            if not same_device(loaded.sae.W_dec.device, self.device):
                raise RuntimeError(f"SAE {sae_id} is on {loaded.sae.W_dec.device}, expected {self.device}")
