"""The application: the FastAPI app and the SAEServeIngress deployment, both built from ``ingress.endpoints``, and
``build_app``.

    serve run serve_config.yaml                      # args from the file
    serve run ingress.app:build_app model=models/demo-lm sae_sets='[res-demo]'

Each endpoint becomes a FastAPI route and a handle method of the same name on SAEServeIngress
(``serve.get_app_handle("saeserve").activation_all.remote(ActivationAllRequest(...))``); both call the same
handler. Importing this module imports neither torch nor the deployments' engines (``build_app`` does).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application

from deployments.engine.errors import RequestError
from deployments.specs import SAESpec

from . import resources, state
from . import schemas as S
from .args import AppArgs, resolve_jacobian_lens, resolve_model_path
from .auth import AuthMiddleware
from .backend import Backend
from .endpoints import ENDPOINTS, Endpoint, route_paths
from .errors import ERROR_RESPONSES, install_error_handlers
from .handlers import Handlers
from .limits import LimitsMiddleware

log = logging.getLogger("saeserve.ingress")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = FastAPI(
    title="saeserve",
    description="Sparse-autoencoder interpretability inference (Neuronpedia inference API v1) on Ray Serve.",
    version="0.1.0",
)
install_error_handlers(app)
app.add_middleware(AuthMiddleware)
app.add_middleware(LimitsMiddleware)  # outermost: size and time limits wrap everything, auth included


@app.get("/health", response_model=S.HealthResponse, responses={503: {"model": S.HealthResponse}})
async def health():
    try:
        await asyncio.wait_for(state.current.ingress.backend.ensure_ready(), timeout=5)
    except Exception:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "healthy"}


class SAEServeIngress:
    """Validates, authenticates and routes every request. Its handle methods (one per endpoint, generated below
    from ``ingress.endpoints``) are the Python surface for Ray jobs; they take and return the HTTP bodies' models."""

    def __init__(self, args: dict, specs: list[dict], model_handle, sae_handle):
        a = AppArgs.model_validate(args)
        self.backend = Backend(a, [SAESpec(**s) for s in specs], model_handle, sae_handle)
        self.handlers = Handlers(self.backend, route_paths())
        state.install(self, self.backend.secret, a.limits.max_body_bytes, a.limits.request_timeout_s)

    async def _call(self, ep: Endpoint, req):
        """The final answer (a handle call, or HTTP without ``stream``)."""
        return await self.handlers.method(ep.handler)(req)

    async def _http(self, ep: Endpoint, req):
        if ep.streams and getattr(req, "stream", False):
            area = getattr(self.handlers, ep.handler.split(".")[0])
            events = await area.stream(req)  # every 4xx is raised here, before the first byte
            if ep.stream_format == "ndjson":  # lines already serialised by the handler, passed through as they are
                return StreamingResponse(events, media_type="application/x-ndjson", headers=SSE_HEADERS)
            return StreamingResponse(_sse(events), media_type="text/event-stream", headers=SSE_HEADERS)
        reply = await self._call(ep, req)
        # Serialised here, once: FastAPI would validate the reply against its model again first (the handlers built
        # it from that model), and its JSON encoder turns a NaN into a 500 where pydantic writes null.
        return Response(reply.model_dump_json(by_alias=True, exclude_none=ep.exclude_none), media_type="application/json")


async def _sse(events: AsyncIterator) -> AsyncIterator[str]:
    """Each event is ``data: <the whole cumulative response as JSON>``; the last equals the non-streamed reply. A
    failure after the first event is an ``{"error": ...}`` event (with ``status``), never a silent end."""
    try:
        async for response in events:
            yield f"data: {response.model_dump_json(exclude_none=True)}\n\n"
    except RequestError as e:
        yield f"data: {json.dumps({'error': e.message, 'status': e.status})}\n\n"
    except Exception:
        log.exception("stream failed")
        yield f"data: {json.dumps({'error': 'Internal server error', 'status': 500})}\n\n"


def _handle_method(ep: Endpoint):
    if ep.request is None:
        async def method(self):
            return await self._call(ep, None)
        method.__annotations__ = {"return": ep.response}
    else:
        async def method(self, req):
            return await self._call(ep, req)
        method.__annotations__ = {"req": ep.request, "return": ep.response}
    method.__name__ = ep.name
    method.__qualname__ = f"SAEServeIngress.{ep.name}"
    method.__module__ = __name__
    method.__doc__ = f"``{ep.method} {ep.path}`` for handle callers" + (" (the final reply; stream over HTTP)" if ep.streams else "")
    return method


def _add_route(ep: Endpoint) -> None:
    if ep.request is None:
        async def route():
            return await state.current.ingress._http(ep, None)
        route.__signature__ = inspect.Signature([])
    else:
        async def route(req):
            return await state.current.ingress._http(ep, req)
        route.__signature__ = inspect.Signature([inspect.Parameter("req", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                   annotation=ep.request)])
    route.__name__ = ep.name
    app.add_api_route(ep.path, route, methods=[ep.method], response_model=ep.response,
                      response_model_exclude_none=ep.exclude_none, responses=ERROR_RESPONSES, tags=list(ep.tags) or None,
                      name=ep.name)


for _ep in ENDPOINTS:
    _add_route(_ep)
    if _ep.handle:
        setattr(SAEServeIngress, _ep.name, _handle_method(_ep))

SAEServeIngress = serve.deployment(
    name="SAEServeIngress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
)(serve.ingress(app)(SAEServeIngress))


def build_app(args: AppArgs) -> Application:
    """Typed app builder: ``serve_config.yaml``'s ``args`` arrive validated as AppArgs."""
    from deployments.model import ModelDeployment
    from deployments.sae_shard import SAEShard
    from deployments.specs import resolve_sae_specs

    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    model_path = resolve_model_path(args.model.name)
    s, b = args.saes, args.batching
    specs = resolve_sae_specs(model_path, s.sets, s.dirs, s.include, s.exclude, sae_config=s.config)
    log.info("building saeserve: model %s, %d SAEs", model_path, len(specs))
    opts = args.resources.deployment_options
    replica_env = args.resources.replica_env
    unknown = set(opts) - {d.name for d in (SAEServeIngress, ModelDeployment, SAEShard)}
    if unknown:
        raise ValueError(f"deployment_options names unknown deployments {sorted(unknown)}")

    gpus = resources.plan_for_args(args)  # the device and GPU requests of the computing replicas

    def deployment(d):
        given = dict(opts.get(d.name, {}))
        actor = {**gpus.actor_options(d.name, d.ray_actor_options), **given.get("ray_actor_options", {})}
        if replica_env:
            runtime_env = dict(actor.get("runtime_env") or {})
            runtime_env["env_vars"] = {**replica_env, **(runtime_env.get("env_vars") or {})}
            actor["runtime_env"] = runtime_env
        given["ray_actor_options"] = actor
        return d.options(**given)

    shard = deployment(SAEShard).bind([x.to_dict() for x in specs], gpus.device, s.dtype, s.max_loaded, s.max_bytes,
                                      b.encode_batch_size, torch_threads=b.torch_threads,
                                      burst_torch_threads=b.burst_torch_threads)
    model = deployment(ModelDeployment).bind(model_path, gpus.device, args.model.dtype, args.model.override,
                                             b.capture_batch_size, b.capture_batch_wait_s,
                                             generate_batch_rows=b.generate_batch_rows,
                                             generate_batch_wait_s=b.generate_batch_wait_s, torch_threads=b.torch_threads,
                                             burst_torch_threads=b.burst_torch_threads, sae_shard=shard,
                                             jacobian_lens=resolve_jacobian_lens(model_path, args.model.jacobian_lens))
    return deployment(SAEServeIngress).bind(args.model_dump(), [x.to_dict() for x in specs], model, shard)
