"""The original README's routes: the secret in the JSON body, camelCase output. Thin adapters over the v1 handlers."""

from __future__ import annotations

from deployments import protocol as P
from deployments.engine.errors import RequestError

from .. import schemas as S
from ..auth import secret_matches
from ..errors import quoted
from ..backend import Backend
from .activation import ActivationHandler
from .base import Handler
from .steer import ChatRequest, SteerHandler
from .util import UtilHandler


class LegacyHandler(Handler):
    def __init__(self, backend: Backend, activation: ActivationHandler, util: UtilHandler, steer: SteerHandler):
        super().__init__(backend)
        self.activation = activation
        self.util = util
        self.steer = steer

    def check_body_secret(self, given: str | None) -> None:
        """The legacy routes' secret, in the body: the same secret and comparison as the header's."""
        secret = self.backend.secret
        if secret and not secret_matches(given, secret):
            raise RequestError("Invalid or missing secret", 401)

    async def activations_test(self, req: S.LegacyActivationsTestRequest) -> S.LegacyActivationsTestResponse:
        self.check_body_secret(req.secret)
        self.check_model(req.model)
        a = self.activation
        spec = self.backend.spec(req.layer)
        idx = a._feature_index(spec, str(req.index))
        tok = await self.tokens(req.text)
        bos = self.backend.tokenizer.bos_token_id
        zero = [i for i, t in enumerate(tok.ids) if t == bos]  # BOS kept, at value 0
        (res,) = await a.run([P.FeatureJob(tok.ids, [P.SaeTask(spec.id, spec.hook_name, P.SingleOp(idx, zero, False))])])
        r = res.results[0]
        return S.LegacyActivationsTestResponse(
            activations=S.LegacyActivation(index=idx, layer=spec.id, maxValue=r.max_value, maxValueIndex=r.max_value_index,
                                           values=r.values),
            tokens=tok.strs)

    async def activations_all(self, req: S.LegacyActivationsAllRequest) -> S.LegacyActivationsAllResponse:
        self.check_body_secret(req.secret)
        self.check_model(req.model)
        a = self.activation
        chosen = a.sources(req.source_set, req.selected_layers, req.feature_filter)
        n = a.num_results(req.num_results)
        if req.feature_filter is not None:
            n = max(len(set(req.feature_filter)), 1)  # "returns only those features": all of them
        (r,) = await a.ranked([req.text], chosen, n, req.sort_indexes, req.ignore_bos, req.feature_filter)
        return S.LegacyActivationsAllResponse(
            activations=[S.LegacyActivation(index=x.index, layer=x.source, maxValue=x.max_value, maxValueIndex=x.max_value_index,
                                            values=x.values, sumValues=x.sum_values) for x in r.activations],
            tokens=r.tokens)

    async def top_k_by_decoder_cosine_similarity(self, req: S.LegacyCossimRequest) -> S.LegacyCossimResponse:
        self.check_body_secret(req.secret)
        model = self.args.served_model_id if req.model in self.backend.model_ids else req.model
        r = await self.util.sae_topk_by_decoder_cossim(S.UtilSaeTopkByDecoderCossimRequest(
            feature=S.NPFeature(model=model, source=req.sae_id, index=req.feature_id),
            model=req.model, source=req.sae_id, num_results=req.k))
        return S.LegacyCossimResponse(
            feature_id=req.feature_id,
            top_k_features=[S.LegacyCossimFeature(cosine_similarity=f.cosine_similarity, index=f.feature.index)
                            for f in r.topk_decoder_cossim_features])

    async def completion(self, req: S.LegacyCompletionRequest) -> S.LegacyCompletionResponse:
        self.check_body_secret(req.secret)
        self.check_model(req.model)
        if len(req.types) > len(S.SteerType):
            raise RequestError(f"types lists {len(req.types)} entries: ask for each of 'steered' and 'default' at most once")
        most = self.args.limits.max_steer_vectors
        if len(req.features) > most:
            raise RequestError(f"Too many steering features: {len(req.features)}, max is {most} per request")
        kinds = []
        for t in req.types:
            try:
                kinds.append(S.SteerType(t.upper()))
            except ValueError:
                raise RequestError(f"Unknown type {quoted(t)}: use 'steered' and/or 'default'") from None
        feats = []
        for f in req.features:
            try:
                idx = int(f.index)
            except ValueError:
                raise RequestError(f"index must be an integer feature index, got {quoted(f.index)}") from None
            feats.append(S.NPSteerFeature(model=req.model, source=f.layer, index=idx, strength=f.strength))
        common = dict(model=req.model, steer_method=req.steer_method, normalize_steering=req.normalize_steering,
                      types=kinds, features=feats, n_completion_tokens=req.n_completion_tokens,
                      temperature=req.temperature, strength_multiplier=req.strength_multiplier,
                      freq_penalty=req.freq_penalty, seed=req.seed)
        out = {}
        if req.instruct:
            r = await self.steer.completion(ChatRequest(prompt=[S.NPSteerChatMessage(role="user", content=req.prompt)],
                                                        steer_special_tokens=True, **common))
            for o in r.outputs:
                out[o.type.value.lower()] = S.LegacyCompletionOutput(chat_template=o.chat_template, raw=o.raw)
        else:
            r = await self.steer.completion(S.SteerCompletionRequest(prompt=req.prompt, **common))
            for o in r.outputs:
                out[o.type.value.lower()] = S.LegacyCompletionOutput(raw=o.output)
        return S.LegacyCompletionResponse(**out)
