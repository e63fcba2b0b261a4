"""The application: FastAPI app, the SAEServeIngress deployment (routing only), and ``build_app``.

    serve run serve_config.yaml                      # args from the file
    serve run ingress.app:build_app model=models/demo-lm sae_sets='[res-demo]'
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from deployments.engine.loading import SAESpec, resolve_sae_specs
from deployments.model import ModelDeployment
from deployments.sae_shard import SAEShard

from . import schemas as S
from .args import AppArgs, resolve_model_path
from .auth import install_auth
from .errors import install_error_handlers
from .limits import LimitsMiddleware
from .routes import activation, current, install, legacy, util
from .routes import steer as steer_routes
from .service import SAEService
from .steer import Steering

log = logging.getLogger("saeserve.ingress")

app = FastAPI(
    title="saeserve",
    description="Sparse-autoencoder interpretability inference (Neuronpedia inference API v1) on Ray Serve.",
    version="0.1.0",
)
install_error_handlers(app)
install_auth(app)
app.add_middleware(LimitsMiddleware)  # outermost: size and time limits wrap everything, auth included
app.include_router(activation.router)
app.include_router(util.router)
app.include_router(legacy.router)
app.include_router(steer_routes.router)


@app.get("/health", response_model=S.HealthResponse, responses={503: {"model": S.HealthResponse}})
async def health():
    svc: SAEService = current.service
    try:
        await asyncio.wait_for(svc.ensure_ready(), timeout=5)
    except Exception:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "healthy"}


@serve.deployment(
    name="SAEServeIngress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
)
@serve.ingress(app)
class SAEServeIngress:
    """Routes HTTP and handle calls. Methods below are the Python surface for Ray jobs:
    ``serve.get_app_handle("saeserve").activation_all.remote(ActivationAllRequest(...))``."""

    def __init__(self, args: dict, specs: list[dict], model_handle, sae_handle):
        a = AppArgs.model_validate(args)
        self.service = SAEService(a, [SAESpec(**s) for s in specs], model_handle, sae_handle)
        install(self.service)

    async def tokenize(self, req: S.TokenizeRequest) -> S.TokenizeResponse:
        return await self.service.tokenize(req)

    async def activation_single(self, req: S.ActivationSingleRequest) -> S.ActivationSingleResponse:
        return await self.service.activation_single(req)

    async def activation_single_batch(self, req: S.ActivationSingleBatchRequest) -> S.ActivationSingleBatchResponse:
        return await self.service.activation_single_batch(req)

    async def activation_all(self, req: S.ActivationAllRequest) -> S.ActivationAllResponse:
        return await self.service.activation_all(req)

    async def activation_all_batch(self, req: S.ActivationAllBatchRequest) -> S.ActivationAllBatchResponse:
        return await self.service.activation_all_batch(req)

    async def activation_topk_by_token(self, req: S.ActivationTopkByTokenRequest) -> S.ActivationTopkByTokenResponse:
        return await self.service.activation_topk_by_token(req)

    async def activation_topk_by_token_batch(self, req: S.ActivationTopkByTokenBatchRequest) -> S.ActivationTopkByTokenBatchResponse:
        return await self.service.activation_topk_by_token_batch(req)

    async def activation_source(self, req: S.ActivationSourceRequest) -> S.ActivationSourceResponse:
        return await self.service.activation_source(req)

    async def util_sae_topk_by_decoder_cossim(self, req: S.UtilSaeTopkByDecoderCossimRequest) -> S.UtilSaeTopkByDecoderCossimResponse:
        return await self.service.util_topk_by_decoder_cossim(req)

    async def util_sae_vector(self, req: S.UtilSaeVectorRequest) -> S.UtilSaeVectorResponse:
        return await self.service.util_sae_vector(req)

    async def steer_completion(self, req: S.SteerCompletionRequest) -> S.SteerCompletionPost200Response:
        """The final response (``stream`` is ignored here; stream over HTTP)."""
        return await Steering(self.service).completion(req)

    async def steer_completion_chat(self, req: S.SteerCompletionChatPostRequest) -> S.SteerCompletionChatPost200Response:
        return await Steering(self.service).completion(req)

    async def capabilities(self) -> S.CapabilitiesResponse:
        """GET /v1/capabilities for handle callers (model id, SAEs, limits); same answer as over HTTP."""
        return await self.service.capabilities(list(app.openapi()["paths"]))


def build_app(args: AppArgs) -> Application:
    """Typed app builder: ``serve_config.yaml``'s ``args`` arrive validated as AppArgs."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    model_path = resolve_model_path(args.model)
    specs = resolve_sae_specs(model_path, args.sae_sets, args.sae_dirs, args.include_sae, args.exclude_sae,
                              sae_config=args.sae_config)
    log.info("building saeserve: model %s, %d SAEs", model_path, len(specs))
    opts = args.deployment_options
    unknown = set(opts) - {d.name for d in (SAEServeIngress, ModelDeployment, SAEShard)}
    if unknown:
        raise ValueError(f"deployment_options names unknown deployments {sorted(unknown)}")

    def deployment(d):
        return d.options(**opts[d.name]) if d.name in opts else d

    model = deployment(ModelDeployment).bind(model_path, args.device, args.model_dtype, args.override_model_id,
                                             args.capture_batch_size, args.capture_batch_wait_s,
                                             generate_rows=args.generate_rows,
                                             generate_positions=args.token_limit + args.max_completion_tokens,
                                             generate_fixed_shapes=args.generate_fixed_shapes, torch_threads=args.torch_threads,
                                             burst_torch_threads=args.burst_torch_threads)
    shard = deployment(SAEShard).bind([s.to_dict() for s in specs], args.device, args.sae_dtype, args.max_loaded_saes,
                                      args.max_sae_bytes, args.encode_batch_size, args.encode_batch_wait_s,
                                      torch_threads=args.torch_threads, burst_torch_threads=args.burst_torch_threads)
    return deployment(SAEServeIngress).bind(args.model_dump(), [s.to_dict() for s in specs], model, shard)
