"""Every endpoint, declared once: its route, its wire models and the handler that answers it. ``ingress.app``
builds both the FastAPI route and the ``SAEServeIngress`` handle method of the same name from each entry, so
HTTP and Ray callers reach the same code with the same pydantic models.

Adding an endpoint: its request/response models in ``schemas.py``, a handler method in ``handlers/``, a line here.

Dialects (``ingress.dialects``): an entry is served in each dialect it lists, at ``dialect.prefix + path``, by the
same handler. ``dialects=BOTH`` also serves it to Neuronpedia's web app under ``/neuronpedia`` (camelCase bodies);
``reply_casing="snake"`` keeps its replies snake_case there too. A streamed reply's model events are serialised per
dialect (``stream_media``: SSE ``data:`` events, or one JSON line each for any other type); events a handler yields
already serialised (``str``/``bytes``, e.g. NDJSON lines) pass through unchanged. A snake_case NDJSON stream served
to both: ``Endpoint(..., streams=True, stream_media="application/x-ndjson", dialects=BOTH, reply_casing="snake")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import schemas as S
from .dialects import BOTH, DIALECTS, V1, Dialect


@dataclass(frozen=True)
class Endpoint:
    name: str  # the handle method's name
    path: str
    request: Optional[type]  # None: a GET without a body
    response: type
    handler: str  # "<area>.<method>" of ingress.handlers.Handlers
    method: str = "POST"
    streams: bool = False  # answers text/event-stream when the request says ``stream: true`` (HTTP only)
    handle: bool = True  # also a handle method (the legacy routes, with their secret in the body, are HTTP only)
    exclude_none: bool = True  # leave null fields out of the reply
    tags: tuple[str, ...] = ()
    dialects: tuple[Dialect, ...] = (V1,)  # the wire dialects it is served in (ingress.dialects)
    reply_casing: str = "dialect"  # "dialect": the dialect's casing; "snake": snake_case in every dialect
    stream_media: str = "text/event-stream"  # the media type of a streamed reply


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("tokenize", "/v1/tokenize", S.TokenizeRequest, S.TokenizeResponse, "activation.tokenize", dialects=BOTH),
    Endpoint("activation_single", "/v1/activation/single", S.ActivationSingleRequest, S.ActivationSingleResponse,
             "activation.single", dialects=BOTH),
    Endpoint("activation_single_batch", "/v1/activation/single-batch", S.ActivationSingleBatchRequest,
             S.ActivationSingleBatchResponse, "activation.single_batch", dialects=BOTH),
    Endpoint("activation_all", "/v1/activation/all", S.ActivationAllRequest, S.ActivationAllResponse, "activation.all",
             dialects=BOTH),
    Endpoint("activation_all_batch", "/v1/activation/all-batch", S.ActivationAllBatchRequest, S.ActivationAllBatchResponse,
             "activation.all_batch", dialects=BOTH),
    Endpoint("activation_topk_by_token", "/v1/activation/topk-by-token", S.ActivationTopkByTokenRequest,
             S.ActivationTopkByTokenResponse, "activation.topk_by_token", dialects=BOTH),
    Endpoint("activation_topk_by_token_batch", "/v1/activation/topk-by-token-batch", S.ActivationTopkByTokenBatchRequest,
             S.ActivationTopkByTokenBatchResponse, "activation.topk_by_token_batch", dialects=BOTH),
    Endpoint("activation_source", "/v1/activation/source", S.ActivationSourceRequest, S.ActivationSourceResponse,
             "activation.source", dialects=BOTH),
    Endpoint("activation_attention", "/v1/activation/attention", S.ActivationAttentionRequest,
             S.ActivationAttentionResponse, "activation.attention", dialects=BOTH),
    Endpoint("util_sae_topk_by_decoder_cossim", "/v1/util/sae-topk-by-decoder-cossim", S.UtilSaeTopkByDecoderCossimRequest,
             S.UtilSaeTopkByDecoderCossimResponse, "util.sae_topk_by_decoder_cossim", dialects=BOTH),
    Endpoint("util_sae_vector", "/v1/util/sae-vector", S.UtilSaeVectorRequest, S.UtilSaeVectorResponse, "util.sae_vector",
             exclude_none=False, dialects=BOTH),
    # the web app reads this reply in snake_case (its spec says camelCase)
    Endpoint("util_similarity_matrix_pred", "/v1/util/similarity-matrix-pred", S.SimilarityMatrixPredRequest,
             S.SimilarityMatrixPredResponse, "util.similarity_matrix_pred", dialects=BOTH, reply_casing="snake"),
    Endpoint("steer_completion", "/v1/steer/completion", S.SteerCompletionRequest, S.SteerCompletionPost200Response,
             "steer.completion", streams=True, tags=("steer",), dialects=BOTH),
    Endpoint("steer_completion_chat", "/v1/steer/completion-chat", S.SteerCompletionChatPostRequest,
             S.SteerCompletionChatPost200Response, "steer.completion_chat", streams=True, tags=("steer",), dialects=BOTH),
    # NDJSON frames, snake_case in every dialect (the web app stores them verbatim)
    Endpoint("lens_prompt", "/v1/lens/prompt", S.LensPromptRequest, S.LensPromptResponse, "lens.prompt", streams=True,
             stream_media="application/x-ndjson", exclude_none=False, tags=("lens",), dialects=BOTH, reply_casing="snake"),
    Endpoint("capabilities", "/v1/capabilities", None, S.CapabilitiesResponse, "util.capabilities", method="GET",
             exclude_none=False, dialects=BOTH, reply_casing="snake"),
    # the original README's routes: secret in the body, camelCase output
    Endpoint("legacy_activations_test", "/activations-test", S.LegacyActivationsTestRequest, S.LegacyActivationsTestResponse,
             "legacy.activations_test", handle=False, tags=("legacy",)),
    Endpoint("legacy_activations_all", "/activations-all", S.LegacyActivationsAllRequest, S.LegacyActivationsAllResponse,
             "legacy.activations_all", handle=False, exclude_none=False, tags=("legacy",)),
    Endpoint("legacy_top_k_by_decoder_cosine_similarity", "/top-k-by-decoder-cosine-similarity", S.LegacyCossimRequest,
             S.LegacyCossimResponse, "legacy.top_k_by_decoder_cosine_similarity", handle=False, exclude_none=False,
             tags=("legacy",)),
    Endpoint("legacy_completion", "/completion", S.LegacyCompletionRequest, S.LegacyCompletionResponse, "legacy.completion",
             handle=False, tags=("legacy",)),
)

# Routes that need no X-SECRET-KEY header (the legacy routes check the secret in their body themselves). "/" is the
# playground (ingress/playground): a static page with no data, whose API calls carry the secret.
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/",
                          *(d.prefix + p for d in DIALECTS if d.prefix for p in ("/docs", "/openapi.json"))})
BODY_SECRET_PATHS = frozenset(e.path for e in ENDPOINTS if e.path.startswith("/") and "legacy" in e.tags)


def route_paths() -> list[str]:
    """Every path the app serves (what /v1/capabilities lists)."""
    return sorted({"/health", *(d.prefix + e.path for e in ENDPOINTS for d in e.dialects)})
