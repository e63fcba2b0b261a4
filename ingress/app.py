"""The application: the FastAPI app and the SAEServeIngress deployment, both built from ``ingress.endpoints``, and
``build_app``.

    serve run serve_config.yaml                      # args from the file
    serve run ingress.app:build_app model=models/demo-lm sae_sets='[res-demo]'

Each endpoint becomes a FastAPI route and a handle method of the same name on SAEServeIngress
(``serve.get_app_handle("saeserve").activation_all.remote(ActivationAllRequest(...))``); both call the same
handler. An endpoint served in several dialects (``ingress.dialects``) gets one route per dialect, all calling that
handler: ``/v1/...`` for the 1.10.1 client, ``/neuronpedia/v1/...`` for Neuronpedia's web app (documented at
``/neuronpedia/docs``). Importing this module imports neither torch nor the deployments' engines (``build_app`` does).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application

from deployments.autoscaling import with_load_policy
from deployments.engine.errors import RequestError
from deployments.specs import SAESpec

from . import examples, playground, resources, state
from . import schemas as S
from .args import AppArgs, resolve_jacobian_lens, resolve_model_path
from .auth import AuthMiddleware
from .backend import Backend
from .dialects import DIALECTS, V1, Dialect
from .endpoints import ENDPOINTS, Endpoint, route_paths
from .errors import ERROR_RESPONSES, install_error_handlers
from .handlers import Handlers
from .limits import BodyMiddleware, LimitsMiddleware

log = logging.getLogger("saeserve.ingress")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = FastAPI(
    title="saeserve",
    description="Sparse-autoencoder interpretability inference (Neuronpedia inference API v1) on Ray Serve.",
    version="0.1.0",
)
install_error_handlers(app)
app.add_middleware(BodyMiddleware)  # innermost: the body read whole and counted (413), after auth
app.add_middleware(AuthMiddleware)
app.add_middleware(LimitsMiddleware)  # outermost: size and time limits wrap everything, auth included


@app.get("/health", response_model=S.HealthResponse, responses={503: {"model": S.HealthResponse}})
async def health():
    try:
        await asyncio.wait_for(state.current.ingress.backend.ensure_ready(), timeout=5)
    except Exception:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "healthy"}


# The playground: a static HTML page, not a JSON endpoint (no handler, no handle method, not in the schema).
app.add_api_route(playground.PATH, playground.page, methods=["GET"], include_in_schema=False, name="playground")


class SAEServeIngress:
    """Validates, authenticates and routes every request. Its handle methods (one per endpoint, generated below
    from ``ingress.endpoints``) are the Python surface for Ray jobs; they take and return the HTTP bodies' models."""

    def __init__(self, args: dict, specs: list[dict], model_handle, sae_handle):
        a = AppArgs.model_validate(args)
        self.backend = Backend(a, [SAESpec(**s) for s in specs], model_handle, sae_handle)
        self.handlers = Handlers(self.backend, route_paths())  # v1: the handle methods and the 1.10.1 routes
        # The same handlers, reading another dialect's behaviour flags (ingress.dialects.Dialect)
        self.dialect_handlers = {d.name: self.handlers if d is V1 else Handlers(self.backend, route_paths(), d)
                                 for d in DIALECTS}
        state.install(self, self.backend.secret, a.limits.max_body_bytes, a.limits.request_timeout_s)

    async def _call(self, ep: Endpoint, req):
        """The final answer (a handle call, or HTTP without ``stream``)."""
        return await self.handlers.method(ep.handler)(req)

    async def _http(self, ep: Endpoint, req, dialect: Dialect = V1):
        handlers = self.dialect_handlers[dialect.name]
        snake = ep.reply_casing == "snake"
        if ep.streams and getattr(req, "stream", False):
            area = getattr(handlers, ep.handler.split(".")[0])
            events = await area.stream(req)  # every 4xx is raised here, before the first byte
            return StreamingResponse(_sse(events, dialect, snake, ep.stream_media), media_type=ep.stream_media,
                                     headers=SSE_HEADERS)
        reply = await handlers.method(ep.handler)(req)
        # Serialised here, once: FastAPI would validate the reply against its model again first (the handlers built
        # it from that model), and its JSON encoder turns a NaN into a 500 where pydantic writes null.
        return Response(dialect.dump(reply, ep.exclude_none, snake), media_type="application/json")


async def _sse(events: AsyncIterator, dialect: Dialect = V1, snake: bool = False,
               media: str = "text/event-stream") -> AsyncIterator[str]:
    """Each event is ``data: <the whole cumulative response as JSON>``; the last equals the non-streamed reply. A
    failure after the first event is an ``{"error": ...}`` event (with ``status``), never a silent end. An event
    that is already a frame (``str``/``bytes``: the handler serialised it) goes out unchanged. Any other media type
    than SSE frames each event as one JSON line (NDJSON)."""
    frame = (lambda text: f"data: {text}\n\n") if media == "text/event-stream" else (lambda text: text + "\n")
    try:
        async for response in events:
            if isinstance(response, (str, bytes)):
                yield response
            else:
                yield frame(dialect.dump(response, True, snake))
    except RequestError as e:
        yield frame(json.dumps({"error": e.message, "status": e.status}))
    except Exception:
        log.exception("stream failed")
        yield frame(json.dumps({"error": "Internal server error", "status": 500}))


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


# The routes of each prefixed dialect: served by ``app`` (without a place in its /openapi.json, which stays the
# 1.10.1 API's) and documented on their own at ``<prefix>/docs``.
_DIALECT_ROUTERS = {d.name: APIRouter() for d in DIALECTS if d.prefix}


def _responses(ep: Endpoint) -> dict:
    """The error replies, and for a streaming endpoint its stream's media type beside the JSON reply (the spec must
    say what a 200 can be: clients and schemathesis check the Content-Type against it)."""
    if not ep.streams:
        return ERROR_RESPONSES
    return {200: {"description": f"JSON, or {ep.stream_media} when the request asks for a stream",
                  "content": {ep.stream_media: {"schema": {"type": "string"}}}}, **ERROR_RESPONSES}


def _add_route(ep: Endpoint, dialect: Dialect) -> None:
    body = dialect.request_model(ep.request)  # the dialect's casing of the same model (ingress.dialects)
    if body is None:
        async def route():
            return await state.current.ingress._http(ep, None, dialect)
        route.__signature__ = inspect.Signature([])
    else:
        async def route(req):
            return await state.current.ingress._http(ep, req, dialect)
        route.__signature__ = inspect.Signature([inspect.Parameter("req", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                   annotation=body)])
    name = ep.name if dialect is V1 else f"{dialect.name}_{ep.name}"
    route.__name__ = name
    target = app if not dialect.prefix else _DIALECT_ROUTERS[dialect.name]
    target.add_api_route(dialect.prefix + ep.path, route, methods=[ep.method],
                         response_model=dialect.reply_model(ep.response, ep.reply_casing == "snake"),
                         response_model_exclude_none=ep.exclude_none, responses=_responses(ep),
                         tags=list(ep.tags) or None, name=name,
                         openapi_extra=examples.openapi_extra(ep.name) if dialect is V1 else None)


def _add_dialect_docs(dialect: Dialect) -> None:
    """``<prefix>/openapi.json`` and ``<prefix>/docs``: the dialect's routes as its clients see them (paths relative
    to the prefix, which is the spec's server, as in Neuronpedia's own spec)."""
    routes = _DIALECT_ROUTERS[dialect.name].routes
    spec: dict = {}

    async def openapi():
        if not spec:
            full = get_openapi(title=f"{app.title}: the {dialect.name} dialect", version=app.version, routes=routes,
                               description=f"{app.description} Served under {dialect.prefix}.",
                               servers=[{"url": dialect.prefix}])
            full["paths"] = {p.removeprefix(dialect.prefix): v for p, v in full["paths"].items()}
            spec.update(full)
        return JSONResponse(spec)

    async def docs():
        return get_swagger_ui_html(openapi_url=f"{dialect.prefix}/openapi.json", title=f"{app.title} ({dialect.name})")

    app.add_api_route(f"{dialect.prefix}/openapi.json", openapi, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{dialect.prefix}/docs", docs, methods=["GET"], include_in_schema=False)


for _ep in ENDPOINTS:
    for _dialect in _ep.dialects:
        _add_route(_ep, _dialect)
    if _ep.handle:
        setattr(SAEServeIngress, _ep.name, _handle_method(_ep))
for _dialect in DIALECTS:
    if _dialect.prefix:
        _add_dialect_docs(_dialect)
        app.include_router(_DIALECT_ROUTERS[_dialect.name], include_in_schema=False)

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
        if d is not SAEServeIngress and isinstance(given.get("autoscaling_config"), dict):
            # the computing replicas scale on the work they hold, whatever else the options change
            given["autoscaling_config"] = with_load_policy(given["autoscaling_config"])
        actor = {**gpus.actor_options(d.name, d.ray_actor_options), **given.get("ray_actor_options", {})}
        if replica_env:
            runtime_env = dict(actor.get("runtime_env") or {})
            runtime_env["env_vars"] = {**replica_env, **(runtime_env.get("env_vars") or {})}
            actor["runtime_env"] = runtime_env
        given["ray_actor_options"] = actor
        return d.options(**given)

    shard = deployment(SAEShard).bind([x.to_dict() for x in specs], gpus.device, s.dtype, s.max_loaded, s.max_bytes,
                                      b.encode_batch_size, torch_threads=b.torch_threads,
                                      burst_torch_threads=b.burst_torch_threads, shared_lanes=b.shared_lanes,
                                      direct_calls=b.direct_calls)
    model = deployment(ModelDeployment).bind(model_path, gpus.device, args.model.dtype, args.model.override,
                                             b.capture_batch_size, b.capture_batch_wait_s,
                                             generate_rows=b.generate_rows,
                                             generate_positions=args.limits.token_limit + args.limits.max_completion_tokens,
                                             generate_fixed_shapes=b.generate_fixed_shapes, torch_threads=b.torch_threads,
                                             burst_torch_threads=b.burst_torch_threads, shared_lanes=b.shared_lanes,
                                             sae_shard=shard, grpc_max_bytes=b.grpc_max_bytes if b.grpc_calls else None,
                                             direct_calls=b.direct_calls,
                                             jacobian_lens=resolve_jacobian_lens(model_path, args.model.jacobian_lens))
    return deployment(SAEServeIngress).bind(args.model_dump(), [x.to_dict() for x in specs], model, shard)
