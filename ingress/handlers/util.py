"""/v1/util/* (decoder geometry: ingress -> SAEShard only) and /v1/capabilities."""

from __future__ import annotations

from deployments import protocol as P
from deployments import steer_methods
from deployments.checks import check_index
from deployments.engine.errors import RequestError

from .. import schemas as S
from ..backend import Backend
from ..dialects import V1, Dialect
from .numeric import direction, floats
from .base import Handler

MAX_COSSIM_RESULTS = 128  # the contract's cap on util/sae-topk-by-decoder-cossim's num_results


def served_steer_methods(routes: list[str]) -> list[str]:
    """What /v1/capabilities lists as ``steer_methods``: every registered method, where a steering route is served."""
    return list(steer_methods.METHODS) if any(r.startswith("/v1/steer") for r in routes) else []


class UtilHandler(Handler):
    def __init__(self, backend: Backend, routes: list[str], dialect: Dialect = V1):
        super().__init__(backend, dialect)
        self.routes = sorted(routes)

    async def sae_topk_by_decoder_cossim(self, req: S.UtilSaeTopkByDecoderCossimRequest) -> S.UtilSaeTopkByDecoderCossimResponse:
        b = self.backend
        self.check_model(req.model)
        if (req.feature is None) == (req.vector is None):
            raise RequestError("Send exactly one of feature or vector")
        target = b.spec(req.source)
        if req.num_results < 0:
            raise RequestError(f"num_results must be at least 0, got {req.num_results}")
        if req.feature is not None:
            self.check_model(req.feature.model)
            src = b.spec(req.feature.source)
            check_index(req.feature.index, src.d_sae, src.id)
            if src.d_in != target.d_in:
                raise RequestError(f"{src.id} and {target.id} live in different spaces ({src.d_in} vs {target.d_in})")
            query = (await b.call(b.shard(src.id).vectors.remote(P.VectorsRequest([req.feature.index]))))[0].tolist()
        else:
            v = floats(req.vector, "vector")
            if len(req.vector) != target.d_in:
                raise RequestError(f"vector has length {len(req.vector)} but {target.id}'s decoder rows have length {target.d_in}")
            # A cosine depends on the query's direction only: a power-of-two scale (exact) keeps a vector of 1e-40s or
            # 1e38s from under- or overflowing in float32.
            query = direction(v).tolist()
        n = min(req.num_results, MAX_COSSIM_RESULTS)  # the contract clamps (capabilities.limits.max_cossim_results)
        idx, cos = await b.call(b.shard(target.id).top_cosine.remote(P.CosineRequest(query, n)))
        model = self.args.served_model_id
        return S.UtilSaeTopkByDecoderCossimResponse(
            feature=req.feature,
            topk_decoder_cossim_features=[
                S.CossimFeature(feature=S.NPFeature(model=model, source=target.id, index=i), cosine_similarity=c)
                for i, c in zip(idx, cos)])

    async def sae_vector(self, req: S.UtilSaeVectorRequest) -> S.UtilSaeVectorResponse:
        b = self.backend
        self.check_model(req.model)
        spec = b.spec(req.source)
        check_index(req.index, spec.d_sae, spec.id)
        vec = await b.call(b.shard(spec.id).encoder_vector.remote(P.EncoderVectorRequest(req.index)))
        return S.UtilSaeVectorResponse(vector=vec, hook_name=spec.hook_name)

    async def similarity_matrix_pred(self, req: S.SimilarityMatrixPredRequest) -> S.SimilarityMatrixPredResponse:
        """A temporal SAE's predicted codes compared between positions (engine.features.predicted_similarity), on the
        SAEShard replica holding the SAE. Tokenized as the model does by default (TransformerLens's
        ``tokenizer_prepends_bos``); position 0 is dropped whatever it is (for GPT-2 a real token)."""
        b = self.backend
        self.check_model(req.model_id)
        spec = b.spec(req.source_id)
        if spec.architecture != "temporal":
            raise RequestError(f"{spec.id} is a {spec.architecture} SAE: similarity-matrix-pred needs a temporal SAE "
                               "(SAE Lens architecture 'temporal')")
        await b.ensure_ready()
        tok = await self.tokens(req.text, feature=False, limit=b.activation_token_limit)
        if not tok.ids:
            raise RequestError("text is empty")
        (res,) = await b.features([P.FeatureJob(tok.ids, [P.SaeTask(spec.id, spec.hook_name, P.SimilarityOp())])])
        return S.SimilarityMatrixPredResponse(similarity_matrix=res.results[0].tolist(), tokens=tok.strs[1:])

    async def capabilities(self, _req=None) -> S.CapabilitiesResponse:
        """What this deployment serves: model, SAEs, limits, routes, steering methods."""
        b = self.backend
        await b.ensure_ready()
        a = self.args
        return S.CapabilitiesResponse(
            model=a.served_model_id,
            accepted_model_ids=sorted(b.model_ids),
            n_layers=b.info.n_layers, n_ctx=b.info.n_ctx, d_model=b.info.d_model,
            sae_sets={k: [s.id for s in v] for k, v in b.sets.items()},
            saes=[S.SAEInfo(id=s.id, set=s.set_name, hook_name=s.hook_name, d_in=s.d_in, d_sae=s.d_sae,
                            architecture=s.architecture) for s in b.specs.values()],
            limits={"token_limit": b.token_limit, "max_batch_prompts": a.limits.max_batch_prompts,
                    "max_num_results": a.limits.max_num_results, "max_top_k": a.limits.max_top_k,
                    "max_cossim_results": MAX_COSSIM_RESULTS, "max_completion_tokens": a.limits.max_completion_tokens,
                    "activation_token_limit": b.activation_token_limit,
                    "neuronpedia_max_batch_prompts": a.limits.neuronpedia_max_batch_prompts,
                    "max_steer_vectors": a.limits.max_steer_vectors, "max_steer_work": a.limits.max_steer_work,
                    "max_steer_types": len(S.SteerType), "max_body_bytes": a.limits.max_body_bytes,
                    "max_loaded_saes_per_replica": a.saes.max_loaded,
                    "lens_token_limit": min(a.limits.lens_token_limit, b.info.n_ctx)},
            routes=self.routes,
            steer_methods=served_steer_methods(self.routes),
        )
