"""SAEService: validates requests and routes them across ModelDeployment and SAEShard handles.

The FastAPI routes and Ray-job callers (``serve.get_app_handle("saeserve")``) both land here, with the
same pydantic request models. Handles are duck-typed (``.method.remote(...)`` returning an awaitable), so
nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Awaitable

from deployments.engine import features as F
from deployments.engine import tokens as T
from deployments.engine.errors import Overloaded, RequestError
from deployments.engine.loading import SAESpec

from . import schemas as S
from .args import AppArgs
from .auth import secret_matches
from .errors import is_ray_unavailable

log = logging.getLogger("saeserve.ingress")

DEFAULT_NUM_RESULTS = 25
DEFAULT_TOP_K = 5


def unwrap_remote_error(e: BaseException) -> BaseException:
    """The RequestError a replica raised, if that is what this (Ray-wrapped) exception carries."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, RequestError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


class SAEService:
    def __init__(self, args: AppArgs, specs: list[SAESpec], model_handle, sae_handle):
        self.args = args
        self.specs = {s.id: s for s in specs}
        self.sets: dict[str, list[SAESpec]] = {}
        for s in specs:
            self.sets.setdefault(s.set_name, []).append(s)
        self.model = model_handle
        self.shard = sae_handle
        self.model_ids = args.accepted_model_ids()
        self.secret = args.resolved_secret()  # resolved once, in the replica (env SECRET lives there)
        self.tokenizer = None
        self.info = None
        self._ready_lock = asyncio.Lock()

    # --- readiness -----------------------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        if self.tokenizer is not None:
            return
        async with self._ready_lock:
            if self.tokenizer is None:
                described = await self.model.describe.remote()
                self.info = described["info"]
                self.tokenizer = described["tokenizer"]
                self.prepends_bos = T.tokenizer_prepends_bos(self.tokenizer)
                log.info("ingress ready: model %s, %d SAEs in sets %s", self.args.served_model_id, len(self.specs), list(self.sets))

    @property
    def token_limit(self) -> int:
        return min(self.args.token_limit, self.info.n_ctx)

    # --- helpers -------------------------------------------------------------------------------------

    async def _call(self, awaitable: Awaitable) -> Any:
        try:
            return await awaitable
        except Exception as e:  # a replica's RequestError arrives wrapped in a Ray error
            inner = unwrap_remote_error(e)
            if inner is not None:
                raise inner from None
            if is_ray_unavailable(e):  # a full queue or a dead replica: the client may retry
                raise Overloaded(f"The server is busy ({type(e).__name__}); retry shortly") from None
            if "OutOfMemory" in type(e).__name__ or "out of memory" in str(e).lower():
                raise Overloaded("Out of memory while serving this request; retry shortly") from e
            raise

    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise RequestError("Unsupported model")

    def spec(self, source: str) -> SAESpec:
        s = self.specs.get(source)
        if s is None:
            raise RequestError(f"Invalid SAE ID or type: {source}")
        return s

    def check_batch(self, prompts: list[str]) -> None:
        if not prompts:
            raise RequestError("prompts is empty: send at least one prompt")
        if len(prompts) > self.args.max_batch_prompts:
            raise RequestError(f"Too many prompts: {len(prompts)}, max is {self.args.max_batch_prompts} per request")

    def feature_tokens(self, text: str) -> T.Tokenized:
        ids = T.feature_tokens(self.tokenizer, text)
        T.check_token_limit(len(ids), self.token_limit)
        return T.tokenize(self.tokenizer, ids)

    def starts_with_bos(self, ids: list[int]) -> bool:
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id

    @staticmethod
    def hooks_for(specs: list[SAESpec]) -> list[str]:
        """Hooks to capture for these SAEs: each one's own, plus values and pattern for attention-output SAEs (DFA)."""
        hooks: list[str] = []
        for s in specs:
            hooks.append(s.hook_name)
            if F.is_attention_output_hook(s.hook_name):
                hooks.extend(F.dfa_hooks(s.hook_name))
        return list(dict.fromkeys(hooks))

    @staticmethod
    def dfa_inputs(spec: SAESpec, acts: dict):
        if not F.is_attention_output_hook(spec.hook_name):
            return None
        v, pattern = F.dfa_hooks(spec.hook_name)
        return acts[v], acts[pattern]

    async def capture(self, ids: list[int], hooks: list[str]) -> dict:
        return await self._call(self.model.capture.remote(ids, hooks))

    def on_shard(self, sae_id: str):
        return self.shard.options(multiplexed_model_id=sae_id)

    @staticmethod
    def check_finite(values: list[float], what: str) -> None:
        if not all(math.isfinite(v) for v in values):
            raise RequestError(f"{what} contains NaN or infinite values")

    # --- tokenize ------------------------------------------------------------------------------------

    async def tokenize(self, req: S.TokenizeRequest) -> S.TokenizeResponse:
        self.check_model(req.model)
        await self.ensure_ready()
        prepend = self.prepends_bos if req.prepend_bos is None else req.prepend_bos
        prepend = prepend and self.tokenizer.bos_token_id is not None
        ids = T.encode(self.tokenizer, req.text, prepend)
        return S.TokenizeResponse(tokens=ids, token_strings=T.str_tokens(self.tokenizer, ids), prepend_bos=prepend)

    # --- activation/single ---------------------------------------------------------------------------

    def _check_single(self, source, index, vector, hook) -> None:
        by_feature = source is not None and index is not None
        by_vector = vector is not None and hook is not None
        if by_feature == by_vector or (source is None) != (index is None) or (vector is None) != (hook is None):
            raise RequestError("Send exactly one of (source, index) or (vector, hook)")

    async def _single(self, prompt: str, source, index, vector, hook) -> S.ActivationSingleResponse:
        if source is not None:
            spec = self.spec(source)
            try:
                idx = int(index)
            except ValueError:
                raise RequestError(f"index must be an integer feature index, got {index!r}") from None
            F.check_index(idx, spec.d_sae, spec.id)
            tok = self.feature_tokens(prompt)
            acts = await self.capture(tok.ids, self.hooks_for([spec]))
            bos = self.tokenizer.bos_token_id
            zero = [i for i, t in enumerate(tok.ids) if t == bos]
            drop = self.starts_with_bos(tok.ids)
            res = await self._call(self.on_shard(spec.id).single.remote(acts[spec.hook_name], idx, zero, drop, self.dfa_inputs(spec, acts)))
            strs, special = (tok.strs[1:], tok.special[1:]) if drop else (tok.strs, tok.special)
        else:
            shape = self.info.hook_shapes.get(hook)
            if shape is None:
                raise RequestError(f"Unknown hook: {hook}. Hooks look like blocks.0.hook_resid_post")
            width = math.prod(shape)
            self.check_finite(vector, "vector")
            if len(vector) != width:
                raise RequestError(f"vector has length {len(vector)} but {hook} has width {width}")
            ids = T.encode(self.tokenizer, prompt, self.prepends_bos)
            T.check_token_limit(len(ids), self.token_limit)
            if not ids:
                raise RequestError("prompt is empty")
            tok = T.tokenize(self.tokenizer, ids)
            acts = await self.capture(ids, [hook])
            res = F.vector_projection(acts[hook], [float(v) for v in vector])
            strs, special = tok.strs, tok.special
        dfa = {}
        if res.dfa_values is not None:
            dfa = dict(dfa_values=res.dfa_values, dfa_target_index=res.max_value_index, dfa_max_value=res.dfa_max_value)
        return S.ActivationSingleResponse(
            activation=S.ActivationValues(values=res.values, max_value=res.max_value, max_value_index=res.max_value_index, **dfa),
            tokens=strs,
            tokens_is_special=special,
        )

    async def activation_single(self, req: S.ActivationSingleRequest) -> S.ActivationSingleResponse:
        self.check_model(req.model)
        self._check_single(req.source, req.index, req.vector, req.hook)
        await self.ensure_ready()
        return await self._single(req.prompt, req.source, req.index, req.vector, req.hook)

    async def activation_single_batch(self, req: S.ActivationSingleBatchRequest) -> S.ActivationSingleBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        self._check_single(req.source, req.index, req.vector, req.hook)
        await self.ensure_ready()
        results = await asyncio.gather(*(self._single(p, req.source, req.index, req.vector, req.hook) for p in req.prompts))
        return S.ActivationSingleBatchResponse(results=list(results))

    # --- activation/all ------------------------------------------------------------------------------

    def _all_sources(self, source_set: str, selected: list[str], feature_filter) -> list[SAESpec]:
        members = self.sets.get(source_set)
        if members is None:
            raise RequestError(f"Invalid source set: {source_set}. Served sets: {sorted(self.sets)}")
        if not selected:
            chosen = list(members)
        else:
            by_id = {s.id: s for s in members}
            chosen = []
            for src in selected:
                if src not in by_id:
                    raise RequestError(f"Invalid SAE ID or type: {src}")
                if by_id[src] not in chosen:
                    chosen.append(by_id[src])
        if feature_filter is not None:
            if len(chosen) != 1:
                raise RequestError("feature_filter needs exactly one selected source")
            for i in feature_filter:
                F.check_index(i, chosen[0].d_sae, chosen[0].id)
        return chosen

    def _num_results(self, n) -> int:
        n = DEFAULT_NUM_RESULTS if n is None else n
        if n < 1:
            raise RequestError(f"num_results must be at least 1, got {n}")
        return min(n, self.args.max_num_results)

    async def _all(self, prompt: str, chosen: list[SAESpec], num_results: int, sort_idx: list[int], ignore_bos: bool,
                   feature_filter) -> S.ActivationAllResponse:
        tok = self.feature_tokens(prompt)
        F.check_sort_indexes(sort_idx, len(tok.ids))
        acts = await self.capture(tok.ids, self.hooks_for(chosen))
        zero_bos = ignore_bos and self.starts_with_bos(tok.ids)
        per_source = await asyncio.gather(*(
            self._call(self.on_shard(s.id).rank.remote(acts[s.hook_name], num_results, sort_idx, zero_bos, feature_filter,
                                                       self.dfa_inputs(s, acts)))
            for s in chosen
        ))
        merged = F.merge_ranked(list(per_source), num_results, by_sum=bool(sort_idx))
        return S.ActivationAllResponse(
            activations=[
                S.ActivationAllFeature(source=chosen[src].id, index=r.index, values=r.values, sum_values=r.sum_values,
                                       max_value=r.max_value, max_value_index=r.max_value_index, dfa_values=r.dfa_values,
                                       dfa_target_index=r.max_value_index if r.dfa_values is not None else None,
                                       dfa_max_value=r.dfa_max_value)
                for src, r in merged
            ],
            tokens=tok.strs,
        )

    async def activation_all(self, req: S.ActivationAllRequest) -> S.ActivationAllResponse:
        self.check_model(req.model)
        chosen = self._all_sources(req.source_set, req.selected_sources, req.feature_filter)
        n = self._num_results(req.num_results)
        await self.ensure_ready()
        return await self._all(req.prompt, chosen, n, req.sort_by_token_indexes, req.ignore_bos, req.feature_filter)

    async def activation_all_batch(self, req: S.ActivationAllBatchRequest) -> S.ActivationAllBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        chosen = self._all_sources(req.source_set, req.selected_sources, req.feature_filter)
        n = self._num_results(req.num_results)
        await self.ensure_ready()
        results = await asyncio.gather(*(
            self._all(p, chosen, n, req.sort_by_token_indexes, req.ignore_bos, req.feature_filter) for p in req.prompts
        ))
        return S.ActivationAllBatchResponse(results=list(results))

    # --- activation/topk-by-token --------------------------------------------------------------------

    def _top_k(self, k) -> int:
        k = DEFAULT_TOP_K if k is None else k
        if k < 1:
            raise RequestError(f"top_k must be at least 1, got {k}")
        return min(k, self.args.max_top_k)

    async def _topk(self, prompt: str, spec: SAESpec, k: int, ignore_bos: bool) -> S.ActivationTopkByTokenResponse:
        tok = self.feature_tokens(prompt)
        acts = await self.capture(tok.ids, [spec.hook_name])
        idx, vals = await self._call(self.on_shard(spec.id).topk_by_token.remote(acts[spec.hook_name], k))
        start = 1 if ignore_bos and self.starts_with_bos(tok.ids) else 0
        results = [
            S.TopkTokenResult(
                token_position=p, token=tok.strs[p], is_special=tok.special[p],
                top_features=[S.TopkFeature(feature_index=i, activation_value=v) for i, v in zip(idx[p], vals[p])],
            )
            for p in range(start, len(tok.ids))
        ]
        return S.ActivationTopkByTokenResponse(results=results, tokens=tok.strs[start:])

    async def activation_topk_by_token(self, req: S.ActivationTopkByTokenRequest) -> S.ActivationTopkByTokenResponse:
        self.check_model(req.model)
        spec = self.spec(req.source)
        k = self._top_k(req.top_k)
        await self.ensure_ready()
        return await self._topk(req.prompt, spec, k, req.ignore_bos)

    async def activation_topk_by_token_batch(self, req: S.ActivationTopkByTokenBatchRequest) -> S.ActivationTopkByTokenBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        spec = self.spec(req.source)
        k = self._top_k(req.top_k)
        await self.ensure_ready()
        results = await asyncio.gather(*(self._topk(p, spec, k, req.ignore_bos) for p in req.prompts))
        return S.ActivationTopkByTokenBatchResponse(results=list(results))

    # --- activation/source ---------------------------------------------------------------------------

    async def _source(self, prompt: str, spec: SAESpec) -> S.ActivationSourceResult:
        tok = self.feature_tokens(prompt)
        acts = await self.capture(tok.ids, [spec.hook_name])
        skip = 1 if self.starts_with_bos(tok.ids) else 0
        active = await self._call(self.on_shard(spec.id).active.remote(acts[spec.hook_name], skip))
        return S.ActivationSourceResult(tokens=tok.strs, active_features=active)

    async def activation_source(self, req: S.ActivationSourceRequest) -> S.ActivationSourceResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        spec = self.spec(req.source)
        await self.ensure_ready()
        results = await asyncio.gather(*(self._source(p, spec) for p in req.prompts))
        return S.ActivationSourceResponse(results=list(results))

    # --- util: decoder geometry ----------------------------------------------------------------------

    async def util_topk_by_decoder_cossim(self, req: S.UtilSaeTopkByDecoderCossimRequest) -> S.UtilSaeTopkByDecoderCossimResponse:
        self.check_model(req.model)
        if (req.feature is None) == (req.vector is None):
            raise RequestError("Send exactly one of feature or vector")
        target = self.spec(req.source)
        if req.num_results < 0:
            raise RequestError(f"num_results must be at least 0, got {req.num_results}")
        if req.feature is not None:
            self.check_model(req.feature.model)
            src = self.spec(req.feature.source)
            F.check_index(req.feature.index, src.d_sae, src.id)
            query = (await self._call(self.on_shard(src.id).vectors.remote([req.feature.index])))[0]
        else:
            self.check_finite(req.vector, "vector")
            if len(req.vector) != target.d_in:
                raise RequestError(f"vector has length {len(req.vector)} but {target.id}'s decoder rows have length {target.d_in}")
            query = [float(v) for v in req.vector]
        if len(query) != target.d_in:
            raise RequestError(f"{req.feature.source} and {target.id} live in different spaces ({len(query)} vs {target.d_in})")
        idx, cos = await self._call(self.on_shard(target.id).top_cosine.remote(query, req.num_results))
        model = self.args.served_model_id
        return S.UtilSaeTopkByDecoderCossimResponse(
            feature=req.feature,
            topk_decoder_cossim_features=[
                S.CossimFeature(feature=S.NPFeature(model=model, source=target.id, index=i), cosine_similarity=c)
                for i, c in zip(idx, cos)
            ],
        )

    async def util_sae_vector(self, req: S.UtilSaeVectorRequest) -> S.UtilSaeVectorResponse:
        self.check_model(req.model)
        spec = self.spec(req.source)
        F.check_index(req.index, spec.d_sae, spec.id)
        vec = await self._call(self.on_shard(spec.id).encoder_vector.remote(req.index))
        return S.UtilSaeVectorResponse(vector=vec, hook_name=spec.hook_name)

    # --- capabilities --------------------------------------------------------------------------------

    async def capabilities(self, routes: list[str]) -> S.CapabilitiesResponse:
        """What this deployment serves; ``routes`` are the app's paths (the caller knows the app)."""
        await self.ensure_ready()
        a = self.args
        return S.CapabilitiesResponse(
            model=a.served_model_id,
            accepted_model_ids=sorted(self.model_ids),
            n_layers=self.info.n_layers,
            n_ctx=self.info.n_ctx,
            d_model=self.info.d_model,
            sae_sets={k: [s.id for s in v] for k, v in self.sets.items()},
            saes=[S.SAEInfo(id=s.id, set=s.set_name, hook_name=s.hook_name, d_in=s.d_in, d_sae=s.d_sae,
                            architecture=s.architecture) for s in self.specs.values()],
            limits={"token_limit": self.token_limit, "max_batch_prompts": a.max_batch_prompts,
                    "max_num_results": a.max_num_results, "max_top_k": a.max_top_k,
                    "max_loaded_saes_per_replica": a.max_loaded_saes},
            routes=sorted(routes),
            steer_methods=[m.value for m in S.SteerMethod] if any(r.startswith("/v1/steer") for r in routes) else [],
        )

    # --- legacy routes -------------------------------------------------------------------------------

    def check_body_secret(self, given: str | None) -> None:
        """The legacy routes' secret, in the body: the same secret and comparison as the header's."""
        if self.secret and not secret_matches(given, self.secret):
            raise RequestError("Invalid or missing secret", 401)

    async def legacy_activations_test(self, req: S.LegacyActivationsTestRequest) -> S.LegacyActivationsTestResponse:
        self.check_body_secret(req.secret)
        self.check_model(req.model)
        spec = self.spec(req.layer)
        try:
            idx = int(req.index)
        except ValueError:
            raise RequestError(f"index must be an integer feature index, got {req.index!r}") from None
        F.check_index(idx, spec.d_sae, spec.id)
        await self.ensure_ready()
        tok = self.feature_tokens(req.text)
        acts = await self.capture(tok.ids, [spec.hook_name])
        bos = self.tokenizer.bos_token_id
        zero = [i for i, t in enumerate(tok.ids) if t == bos]
        res = await self._call(self.on_shard(spec.id).single.remote(acts[spec.hook_name], idx, zero, False))
        return S.LegacyActivationsTestResponse(
            activations=S.LegacyActivation(index=idx, layer=spec.id, maxValue=res.max_value,
                                           maxValueIndex=res.max_value_index, values=res.values),
            tokens=tok.strs,
        )

    async def legacy_activations_all(self, req: S.LegacyActivationsAllRequest) -> S.LegacyActivationsAllResponse:
        self.check_body_secret(req.secret)
        self.check_model(req.model)
        chosen = self._all_sources(req.source_set, req.selected_layers, req.feature_filter)
        n = self._num_results(req.num_results)
        if req.feature_filter is not None:
            n = max(len(set(req.feature_filter)), 1)  # "returns only those features": all of them
        await self.ensure_ready()
        r = await self._all(req.text, chosen, n, req.sort_indexes, req.ignore_bos, req.feature_filter)
        return S.LegacyActivationsAllResponse(
            activations=[
                S.LegacyActivation(index=a.index, layer=a.source, maxValue=a.max_value, maxValueIndex=a.max_value_index,
                                   values=a.values, sumValues=a.sum_values)
                for a in r.activations
            ],
            tokens=r.tokens,
        )

    async def legacy_topk_by_decoder_cossim(self, req: S.LegacyCossimRequest) -> S.LegacyCossimResponse:
        self.check_body_secret(req.secret)
        model = self.args.served_model_id if req.model in self.model_ids else req.model
        r = await self.util_topk_by_decoder_cossim(S.UtilSaeTopkByDecoderCossimRequest(
            feature=S.NPFeature(model=model, source=req.sae_id, index=req.feature_id),
            model=req.model, source=req.sae_id, num_results=req.k,
        ))
        return S.LegacyCossimResponse(
            feature_id=req.feature_id,
            top_k_features=[S.LegacyCossimFeature(cosine_similarity=f.cosine_similarity, index=f.feature.index)
                            for f in r.topk_decoder_cossim_features],
        )
