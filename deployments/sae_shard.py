"""SAEShard: a thin Ray Serve wrapper that holds SAEs and runs engine.features on them.

SAEs are multiplexed by id (``serve.multiplexed``): requests for an SAE are routed to a replica that
already holds it, a miss loads it (once, under Serve's loader lock), and each replica keeps at most
``max_loaded_saes`` (LRU). Dense ``[seq, d_sae]`` activations never leave the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch
from ray import serve

from deployments.engine import features as F
from deployments.engine import geometry as G
from deployments.engine.errors import RequestError
from deployments.engine.loading import SAESpec, load_sae, resolve_device, sae_nbytes

log = logging.getLogger("saeserve.sae_shard")


class LoadedSAE:
    def __init__(self, spec: SAESpec, sae):
        self.spec = spec
        self.sae = sae
        self.nbytes = sae_nbytes(sae)
        self._decoder_index: G.DecoderIndex | None = None

    @property
    def decoder_index(self) -> G.DecoderIndex:
        if self._decoder_index is None:  # built on first cosine query, kept while the SAE is resident
            self._decoder_index = G.DecoderIndex(self.sae.W_dec)
        return self._decoder_index


@serve.deployment(
    name="SAEShard",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    health_check_period_s=10,
)
class SAEShard:
    def __init__(self, specs: list[dict], device: str = "auto", dtype: str = "float32", max_loaded_saes: int = 64):
        self.specs = {s["id"]: SAESpec(**s) for s in specs}
        self.device = resolve_device(device)
        self.dtype = dtype
        self.stats = {"requests": 0, "loads": 0, "load_seconds": 0.0}

        async def load(sae_id: str) -> LoadedSAE:
            return await self._load(sae_id)

        # Wired at init so the per-replica budget is a setting rather than a constant.
        self._get = serve.multiplexed(max_num_models_per_replica=max_loaded_saes)(load)

    async def _load(self, sae_id: str) -> LoadedSAE:
        spec = self.specs.get(sae_id)
        if spec is None:
            raise RequestError(f"Invalid SAE ID or type: {sae_id}")
        t0 = time.monotonic()
        sae = await asyncio.to_thread(load_sae, spec, self.device, self.dtype)
        loaded = LoadedSAE(spec, sae)
        self.stats["loads"] += 1
        self.stats["load_seconds"] += time.monotonic() - t0
        return loaded

    async def _sae(self) -> LoadedSAE:
        self.stats["requests"] += 1
        return await self._get(serve.get_multiplexed_model_id())

    async def single(self, acts: np.ndarray, index: int, zero_positions: list[int], drop_first: bool,
                     dfa_inputs: tuple[np.ndarray, np.ndarray] | None = None) -> F.FeatureActivation:
        s = await self._sae()
        F.check_index(index, s.spec.d_sae, s.spec.id)

        def run() -> F.FeatureActivation:
            row = F.single_feature(F.encode(s.sae, acts), index, zero_positions, drop_first)
            if dfa_inputs is not None:
                offset = 1 if drop_first else 0  # DFA in the same coordinates as ``values``
                full = F.direct_feature_attribution(s.sae.W_enc, *dfa_inputs, index, row.max_value_index + offset)
                row.dfa_values = full[offset:]
            return row

        return await asyncio.to_thread(run)

    async def rank(self, acts: np.ndarray, num_results: int, sort_by_token_indexes: list[int], ignore_bos: bool,
                   feature_filter: list[int] | None, dfa_inputs: tuple[np.ndarray, np.ndarray] | None = None,
                   ) -> list[F.FeatureActivation]:
        s = await self._sae()
        for i in feature_filter or []:
            F.check_index(i, s.spec.d_sae, s.spec.id)

        def run() -> list[F.FeatureActivation]:
            rows = F.rank_features(F.encode(s.sae, acts), num_results, sort_by_token_indexes, ignore_bos, feature_filter)
            if dfa_inputs is not None:
                for row in rows:
                    row.dfa_values = F.direct_feature_attribution(s.sae.W_enc, *dfa_inputs, row.index, row.max_value_index)
            return rows

        return await asyncio.to_thread(run)

    async def topk_by_token(self, acts: np.ndarray, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
        s = await self._sae()
        return await asyncio.to_thread(lambda: F.topk_by_token(F.encode(s.sae, acts), top_k))

    async def active(self, acts: np.ndarray, skip_positions: int) -> dict[str, list[list[float]]]:
        s = await self._sae()
        return await asyncio.to_thread(lambda: F.active_entries(F.encode(s.sae, acts), skip_positions))

    async def vectors(self, indices: list[int]) -> np.ndarray:
        """Decoder rows ``W_dec[indices]`` (steering vectors, cosine queries), float32 ``[len, d_in]``."""
        s = await self._sae()
        for i in indices:
            F.check_index(i, s.spec.d_sae, s.spec.id)
        return G.decoder_rows(s.sae.W_dec, indices).numpy()

    async def encoder_vector(self, index: int) -> list[float]:
        s = await self._sae()
        F.check_index(index, s.spec.d_sae, s.spec.id)
        return G.encoder_vector(s.sae.W_enc, index)

    async def top_cosine(self, query: np.ndarray, num_results: int) -> tuple[list[int], list[float]]:
        s = await self._sae()
        return await asyncio.to_thread(s.decoder_index.top_cosine, torch.as_tensor(query), num_results)

    async def metrics(self) -> dict:
        return dict(self.stats)

    def check_health(self) -> None:
        if not self.specs:
            raise RuntimeError("no SAEs configured")
