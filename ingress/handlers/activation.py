"""/v1/tokenize and /v1/activation/*: tokenize here, then one ModelDeployment call per request carrying every
prompt's feature job (the model replica batches them with other requests' and fans out to the SAEShards)."""

from __future__ import annotations

import asyncio

from deployments import protocol as P
from deployments.checks import check_index, check_sort_indexes
from deployments.engine import tokens as T
from deployments.engine.errors import RequestError
from deployments.hooks import is_attention_map, is_attention_output_hook
from deployments.specs import SAESpec

from .. import schemas as S
from ..errors import quoted
from .numeric import floats, projection_scale, scaled_values
from .base import Handler

DEFAULT_NUM_RESULTS = 25
DEFAULT_TOP_K = 5


class ActivationHandler(Handler):
    # --- tokenize ------------------------------------------------------------------------------------------

    async def tokenize(self, req: S.TokenizeRequest) -> S.TokenizeResponse:
        self.check_model(req.model)
        await self.backend.ensure_ready()
        prepend = self.backend.prepends_bos if req.prepend_bos is None else req.prepend_bos
        prepend = prepend and self.backend.tokenizer.bos_token_id is not None
        tok = await self.tokens(req.text, feature=False, prepend_bos=prepend)
        return S.TokenizeResponse(tokens=tok.ids, token_strings=tok.strs, prepend_bos=prepend)

    # --- helpers -------------------------------------------------------------------------------------------

    def spec(self, source: str) -> SAESpec:
        return self.backend.spec(source)

    @staticmethod
    def task(spec: SAESpec, op: P.SaeOp) -> P.SaeTask:
        return P.SaeTask(spec.id, spec.hook_name, op, dfa=is_attention_output_hook(spec.hook_name))

    async def run(self, jobs: list[P.FeatureJob]) -> list[P.FeatureResult]:
        return await self.backend.features(jobs)

    def prompt_limit(self, n_prompts: int) -> int | None:
        """Most tokens per prompt (None: token_limit). The 2026 dialect counts activation routes against
        activation_token_limit, which a request with several prompts shares out among the batch cap."""
        if not self.dialect.limits_2026:
            return None
        limit = self.backend.activation_token_limit
        return limit if n_prompts <= 1 else max(1, limit // self.batch_cap())

    async def tokenize_all(self, prompts: list[str], feature: bool = True) -> list[T.Tokenized]:
        await self.backend.ensure_ready()
        limit = self.prompt_limit(len(prompts))
        try:
            if len(prompts) == 1:  # awaited in place: gather would add a task and two turns of a busy event loop
                return [await self.tokens(prompts[0], feature=feature, limit=limit)]
            return list(await asyncio.gather(*(self.tokens(p, feature=feature, limit=limit) for p in prompts)))
        except RequestError as e:
            if len(prompts) > 1 and limit is not None and e.message.startswith("Text too long"):
                raise RequestError(f"{e.message} per prompt: a request with several prompts shares activation_token_limit "
                                   f"({self.backend.activation_token_limit}) among up to {self.batch_cap()} prompts") from None
            raise

    # --- activation/single ---------------------------------------------------------------------------------

    def _single_mode(self, source, index, vector, hook) -> None:
        by_feature = source is not None and index is not None
        by_vector = vector is not None and hook is not None
        if by_feature == by_vector or (source is None) != (index is None) or (vector is None) != (hook is None):
            raise RequestError("Send exactly one of (source, index) or (vector, hook)")

    def _feature_index(self, spec: SAESpec, index: str) -> int:
        try:
            idx = int(index)
        except ValueError:
            raise RequestError(f"index must be an integer feature index, got {quoted(index)}") from None
        check_index(idx, spec.d_sae, spec.id)
        return idx

    def _vector(self, vector: list, hook: str) -> tuple[list[float], float]:
        """The vector to project on, scaled by a power of two ``s`` into float32's comfortable range, and ``1 / s``
        (the projection is linear: ``resid @ v = (resid @ (v * s)) / s``, exactly), so that neither a vector of 1e-40s
        nor one of 1e38s under- or overflows in float32."""
        if is_attention_map(hook):
            raise RequestError(f"{hook} is an attention map ([head, query, key] per prompt), not a per-position "
                               "activation: project onto a hook such as blocks.0.hook_resid_post or blocks.0.attn.hook_z")
        width = self.hook_width(hook)
        v = floats(vector, "vector")
        if len(vector) != width:
            raise RequestError(f"vector has length {len(vector)} but {hook} has width {width} per position")
        return projection_scale(v)

    async def _singles(self, prompts: list[str], req) -> list[S.ActivationSingleResponse]:
        self._single_mode(req.source, req.index, req.vector, req.hook)
        await self.backend.ensure_ready()
        if req.source is not None:
            spec = self.spec(req.source)
            idx = self._feature_index(spec, req.index)
            toks = await self.tokenize_all(prompts)
            bos = self.backend.tokenizer.bos_token_id
            jobs = [P.FeatureJob(t.ids, [self.task(spec, P.SingleOp(idx, [i for i, x in enumerate(t.ids) if x == bos],
                                                                     self.starts_with_bos(t.ids)))]) for t in toks]
            results = await self.run(jobs)
            out = []
            for t, r in zip(toks, results):
                drop = self.starts_with_bos(t.ids)
                strs, special = (t.strs[1:], t.special[1:]) if drop else (t.strs, t.special)
                out.append(self._single_response(r.results[0], strs, special))
            return out
        vector, unscale = self._vector(req.vector, req.hook)
        toks = await self.tokenize_all(prompts, feature=False)
        for t in toks:
            if not t.ids:
                raise RequestError("prompt is empty")
        results = await self.run([P.FeatureJob(t.ids, project=(req.hook, vector)) for t in toks])
        return [self._single_response(self._unscaled(r.projection, unscale), t.strs, t.special) for t, r in zip(toks, results)]

    @staticmethod
    def _unscaled(res: P.FeatureActivation, factor: float) -> P.FeatureActivation:
        values = scaled_values(res.values, factor, "this vector")
        if factor == 1.0:
            return res
        return P.FeatureActivation(index=res.index, values=values, max_value=res.max_value * factor,
                                   max_value_index=res.max_value_index, sum_values=res.sum_values)

    @staticmethod
    def _single_response(res: P.FeatureActivation, strs, special) -> S.ActivationSingleResponse:
        dfa = {}
        if res.dfa_values is not None:
            dfa = dict(dfa_values=res.dfa_values, dfa_target_index=res.max_value_index, dfa_max_value=res.dfa_max_value)
        return S.ActivationSingleResponse(
            activation=S.ActivationValues(values=res.values, max_value=res.max_value, max_value_index=res.max_value_index, **dfa),
            tokens=strs, tokens_is_special=special)

    async def single(self, req: S.ActivationSingleRequest) -> S.ActivationSingleResponse:
        self.check_model(req.model)
        return (await self._singles([req.prompt], req))[0]

    async def single_batch(self, req: S.ActivationSingleBatchRequest) -> S.ActivationSingleBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        return S.ActivationSingleBatchResponse(results=await self._singles(req.prompts, req))

    # --- activation/all ------------------------------------------------------------------------------------

    def sources(self, source_set: str, selected: list[str], feature_filter) -> list[SAESpec]:
        members = self.backend.sets.get(source_set)
        if members is None:
            raise RequestError(f"Invalid source set: {source_set}. Served sets: {sorted(self.backend.sets)}")
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
            d_sae = chosen[0].d_sae
            if len(feature_filter) > d_sae:  # more entries than features: repeats, and work for nothing
                raise RequestError(f"feature_filter has {len(feature_filter)} entries but {chosen[0].id} has only {d_sae} "
                                   "features: list each feature once")
            for i in feature_filter:
                check_index(i, d_sae, chosen[0].id)
        return chosen

    def num_results(self, n) -> int:
        n = DEFAULT_NUM_RESULTS if n is None else n
        if n < 1:
            raise RequestError(f"num_results must be at least 1, got {n}")
        return min(n, self.args.limits.max_num_results)

    async def ranked(self, prompts: list[str], chosen: list[SAESpec], n: int, sort_idx: list[int], ignore_bos: bool,
                     feature_filter) -> list[S.ActivationAllResponse]:
        await self.backend.ensure_ready()
        limit = self.backend.token_limit
        if len(sort_idx) > limit:  # positions lie within the token limit: a longer list only repeats them
            raise RequestError(f"sort_by_token_indexes has {len(sort_idx)} entries, but a prompt has at most {limit} tokens: "
                               "list each position once")
        toks = await self.tokenize_all(prompts)
        jobs = []
        for t in toks:
            check_sort_indexes(sort_idx, len(t.ids))
            op = P.RankOp(n, list(sort_idx), ignore_bos and self.starts_with_bos(t.ids), feature_filter)
            jobs.append(P.FeatureJob(t.ids, [self.task(s, op) for s in chosen], merge=n))
        results = await self.run(jobs)
        return [S.ActivationAllResponse(
            activations=[
                S.ActivationAllFeature(source=chosen[src].id, index=r.index, values=r.values, sum_values=r.sum_values,
                                       max_value=r.max_value, max_value_index=r.max_value_index, dfa_values=r.dfa_values,
                                       dfa_target_index=r.max_value_index if r.dfa_values is not None else None,
                                       dfa_max_value=r.dfa_max_value)
                for src, r in res.merged],
            tokens=t.strs) for t, res in zip(toks, results)]

    async def all(self, req: S.ActivationAllRequest) -> S.ActivationAllResponse:
        self.check_model(req.model)
        chosen = self.sources(req.source_set, req.selected_sources, req.feature_filter)
        n = self.num_results(req.num_results)
        return (await self.ranked([req.prompt], chosen, n, req.sort_by_token_indexes, req.ignore_bos, req.feature_filter))[0]

    async def all_batch(self, req: S.ActivationAllBatchRequest) -> S.ActivationAllBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        chosen = self.sources(req.source_set, req.selected_sources, req.feature_filter)
        n = self.num_results(req.num_results)
        return S.ActivationAllBatchResponse(
            results=await self.ranked(req.prompts, chosen, n, req.sort_by_token_indexes, req.ignore_bos, req.feature_filter))

    # --- activation/topk-by-token --------------------------------------------------------------------------

    def top_k(self, k, spec: SAESpec) -> int:
        k = DEFAULT_TOP_K if k is None else k
        if self.dialect.limits_2026:  # clamped, never refused
            return max(1, min(k, spec.d_sae, self.args.limits.max_top_k))
        if k < 1:
            raise RequestError(f"top_k must be at least 1, got {k}")
        return min(k, self.args.limits.max_top_k)

    async def _topks(self, prompts: list[str], source: str, top_k, ignore_bos: bool) -> list[S.ActivationTopkByTokenResponse]:
        spec = self.spec(source)
        k = self.top_k(top_k, spec)
        await self.backend.ensure_ready()
        toks = await self.tokenize_all(prompts)
        results = await self.run([P.FeatureJob(t.ids, [self.task(spec, P.TopkOp(k))]) for t in toks])
        out = []
        for t, r in zip(toks, results):
            idx, vals = r.results[0]
            start = 1 if ignore_bos and self.starts_with_bos(t.ids) else 0
            out.append(S.ActivationTopkByTokenResponse(results=[
                S.TopkTokenResult(token_position=p, token=t.strs[p], is_special=t.special[p],
                                  top_features=[S.TopkFeature(feature_index=i, activation_value=v) for i, v in zip(idx[p], vals[p])])
                for p in range(start, len(t.ids))], tokens=t.strs[start:]))
        return out

    async def topk_by_token(self, req: S.ActivationTopkByTokenRequest) -> S.ActivationTopkByTokenResponse:
        self.check_model(req.model)
        return (await self._topks([req.prompt], req.source, req.top_k, req.ignore_bos))[0]

    async def topk_by_token_batch(self, req: S.ActivationTopkByTokenBatchRequest) -> S.ActivationTopkByTokenBatchResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        return S.ActivationTopkByTokenBatchResponse(results=await self._topks(req.prompts, req.source, req.top_k, req.ignore_bos))

    # --- activation/source ---------------------------------------------------------------------------------

    async def source(self, req: S.ActivationSourceRequest) -> S.ActivationSourceResponse:
        self.check_model(req.model)
        self.check_batch(req.prompts)
        spec = self.spec(req.source)
        await self.backend.ensure_ready()
        toks = await self.tokenize_all(req.prompts)
        results = await self.run([P.FeatureJob(t.ids, [self.task(spec, P.ActiveOp(1 if self.starts_with_bos(t.ids) else 0))])
                                  for t in toks])
        return S.ActivationSourceResponse(results=[S.ActivationSourceResult(tokens=t.strs, active_features=r.results[0])
                                                   for t, r in zip(toks, results)])

    # --- activation/attention -------------------------------------------------------------------------------

    async def attention(self, req: S.ActivationAttentionRequest) -> S.ActivationAttentionResponse:
        """One head's attention pattern, ``blocks.<layer>.attn.hook_pattern[head]``, in the head view's sparse form
        (engine.attention); BOS first, as the feature routes; within activation_token_limit."""
        self.check_model(req.model)
        b = self.backend
        await b.ensure_ready()
        n_layers = b.info.n_layers
        if not 0 <= req.layer < n_layers:
            raise RequestError(f"Invalid layer: {req.layer}. Must be in [0, {n_layers})")
        heads = b.info.hook_shapes.get(f"blocks.{req.layer}.attn.hook_z")
        if f"blocks.{req.layer}.attn.hook_pattern" not in b.info.hook_shapes or not heads:
            raise RequestError(f"Layer {req.layer} has no attention pattern")
        if not 0 <= req.head < heads[0]:
            raise RequestError(f"Invalid head: {req.head}. Must be in [0, {heads[0]})")
        tok = await self.tokens(req.prompt, limit=b.activation_token_limit)
        pattern = await b.call(b.model.attention.remote(P.AttentionRequest(tok.ids, req.layer, req.head)))
        return S.ActivationAttentionResponse(tokens=tok.strs, attention_indices=pattern.indices,
                                             attention_values=pattern.values, max_activation=pattern.max_activation,
                                             seq_len=pattern.seq_len)
