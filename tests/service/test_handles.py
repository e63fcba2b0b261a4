"""Every operation through ``serve.get_app_handle("saeserve")`` (what a Ray job uses), with the same pydantic
request models as HTTP: the answer equals the HTTP answer for the same request, and bad input raises an error
that is a ``RequestError`` carrying the same message the HTTP route puts in ``{"error": ...}``."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from deployments.engine.errors import RequestError, unwrap_remote_error
from ingress import schemas as S

from tests.compare import assert_same_answer
from tests.conftest import demo_pack_dir

from .conftest import MODEL_ID

D_MODEL = json.loads((demo_pack_dir() / "model" / "config.json").read_text())["d_model"]  # the pack's width
TEXT = "The cat sat on the mat."
PROMPTS = ["The cat sat on the mat.", "Dogs bark at night", "hello world"]
LONG = "word " * 200  # over the test app's token_limit of 64
ALL = dict(model=MODEL_ID, source_set="res-demo", selected_sources=[], sort_by_token_indexes=[], ignore_bos=True)

# (handle method, HTTP route, request). One or more per operation; the same request object goes both ways.
OK_CASES = [
    ("tokenize", "/v1/tokenize", S.TokenizeRequest(model=MODEL_ID, text="hello world")),
    ("tokenize", "/v1/tokenize", S.TokenizeRequest(model=MODEL_ID, text="hello world", prepend_bos=False)),
    ("activation_single", "/v1/activation/single",
     S.ActivationSingleRequest(prompt=TEXT, model=MODEL_ID, source="1-res-demo", index="3")),
    ("activation_single", "/v1/activation/single",
     S.ActivationSingleRequest(prompt=TEXT, model=MODEL_ID, vector=[0.01 * i for i in range(D_MODEL)], hook="blocks.0.hook_resid_post")),
    ("activation_single", "/v1/activation/single",  # attention-output SAE: DFA fields
     S.ActivationSingleRequest(prompt=TEXT, model=MODEL_ID, source="0-att-demo", index="2")),
    ("activation_single_batch", "/v1/activation/single-batch",
     S.ActivationSingleBatchRequest(prompts=PROMPTS, model=MODEL_ID, source="0-res-demo", index="5")),
    ("activation_all", "/v1/activation/all", S.ActivationAllRequest(prompt=TEXT, num_results=7, **ALL)),
    ("activation_all", "/v1/activation/all",
     S.ActivationAllRequest(prompt=TEXT, num_results=5, **{**ALL, "sort_by_token_indexes": [2, 3]})),
    ("activation_all", "/v1/activation/all",
     S.ActivationAllRequest(prompt=TEXT, num_results=3, feature_filter=[0, 1, 2], **{**ALL, "selected_sources": ["1-res-demo"]})),
    ("activation_all", "/v1/activation/all",
     S.ActivationAllRequest(prompt=TEXT, num_results=4, **{**ALL, "source_set": "att-demo", "ignore_bos": False})),
    ("activation_all_batch", "/v1/activation/all-batch", S.ActivationAllBatchRequest(prompts=PROMPTS, num_results=4, **ALL)),
    ("activation_topk_by_token", "/v1/activation/topk-by-token",
     S.ActivationTopkByTokenRequest(prompt=TEXT, model=MODEL_ID, source="0-res-demo", top_k=3, ignore_bos=True)),
    ("activation_topk_by_token_batch", "/v1/activation/topk-by-token-batch",
     S.ActivationTopkByTokenBatchRequest(prompts=PROMPTS, model=MODEL_ID, source="1-res-demo", top_k=2, ignore_bos=False)),
    ("activation_source", "/v1/activation/source", S.ActivationSourceRequest(prompts=PROMPTS, model=MODEL_ID, source="0-res-demo")),
    ("util_sae_topk_by_decoder_cossim", "/v1/util/sae-topk-by-decoder-cossim",
     S.UtilSaeTopkByDecoderCossimRequest(feature=S.NPFeature(model=MODEL_ID, source="0-res-demo", index=5), model=MODEL_ID,
                                         source="1-res-demo", num_results=10)),
    ("util_sae_topk_by_decoder_cossim", "/v1/util/sae-topk-by-decoder-cossim",
     S.UtilSaeTopkByDecoderCossimRequest(vector=[math.sin(i) for i in range(D_MODEL)], model=MODEL_ID, source="0-res-demo", num_results=5)),
    ("util_sae_vector", "/v1/util/sae-vector", S.UtilSaeVectorRequest(model=MODEL_ID, source="1-res-demo", index=7)),
    ("activation_attention", "/v1/activation/attention",
     S.ActivationAttentionRequest(prompt=TEXT, model=MODEL_ID, layer=1, head=2)),
    ("util_similarity_matrix_pred", "/v1/util/similarity-matrix-pred",
     S.SimilarityMatrixPredRequest(model_id=MODEL_ID, source_id="1-temporal-demo", index=0, text=TEXT)),
    ("lens_prompt", "/v1/lens/prompt",  # greedy: both calls generate the same tokens
     S.LensPromptRequest(model=MODEL_ID, type=["LOGIT_LENS", "JACOBIAN_LENS"], prompt=TEXT, top_n=3, temperature=0,
                         num_completion_tokens=3, stream=False)),
]

ok_all = S.ActivationAllRequest(prompt="hello", num_results=3, **ALL)
# (handle method, HTTP route, request, substring of the message). Each must be a 400 over HTTP.
BAD_CASES = [
    ("tokenize", "/v1/tokenize", S.TokenizeRequest(model="nope", text="x"), "Unsupported model"),
    ("activation_single", "/v1/activation/single",
     S.ActivationSingleRequest(prompt="hi", model=MODEL_ID, source="99-res-demo", index="1"), "Invalid SAE ID or type: 99-res-demo"),
    ("activation_single", "/v1/activation/single",
     S.ActivationSingleRequest(prompt="hi", model=MODEL_ID, source="0-res-demo", index="100000000"), "out of range"),
    ("activation_single", "/v1/activation/single",
     S.ActivationSingleRequest(prompt="hi", model=MODEL_ID, vector=[1.0], hook="blocks.0.hook_resid_post"), "length"),
    ("activation_single_batch", "/v1/activation/single-batch",
     S.ActivationSingleBatchRequest(prompts=[], model=MODEL_ID, source="0-res-demo", index="1"), "empty"),
    ("activation_all", "/v1/activation/all", ok_all.model_copy(update={"prompt": LONG}), "Text too long: "),
    ("activation_all", "/v1/activation/all", ok_all.model_copy(update={"feature_filter": [1]}), "exactly one selected source"),
    ("activation_all", "/v1/activation/all", ok_all.model_copy(update={"source_set": "res-nope"}), "Invalid source set"),
    ("activation_all_batch", "/v1/activation/all-batch",
     S.ActivationAllBatchRequest(prompts=["a"] * 5, num_results=3, **ALL), "Too many prompts"),
    ("activation_topk_by_token", "/v1/activation/topk-by-token",
     S.ActivationTopkByTokenRequest(prompt="hi", model=MODEL_ID, source="0-res-demo", top_k=0, ignore_bos=True), "top_k"),
    ("activation_topk_by_token_batch", "/v1/activation/topk-by-token-batch",
     S.ActivationTopkByTokenBatchRequest(prompts=[], model=MODEL_ID, source="0-res-demo", ignore_bos=True), "empty"),
    ("activation_source", "/v1/activation/source",
     S.ActivationSourceRequest(prompts=[LONG], model=MODEL_ID, source="0-res-demo"), "Text too long"),
    ("util_sae_topk_by_decoder_cossim", "/v1/util/sae-topk-by-decoder-cossim",
     S.UtilSaeTopkByDecoderCossimRequest(model=MODEL_ID, source="0-res-demo", num_results=3), "exactly one of feature or vector"),
    ("util_sae_vector", "/v1/util/sae-vector", S.UtilSaeVectorRequest(model=MODEL_ID, source="1-res-demo", index=10**7), "out of range"),
    ("activation_attention", "/v1/activation/attention",
     S.ActivationAttentionRequest(prompt="hi", model=MODEL_ID, layer=99, head=0), "Invalid layer: 99"),
    ("activation_attention", "/v1/activation/attention",
     S.ActivationAttentionRequest(prompt=LONG, model=MODEL_ID, layer=0, head=0), "Text too long"),
    ("util_similarity_matrix_pred", "/v1/util/similarity-matrix-pred",
     S.SimilarityMatrixPredRequest(model_id=MODEL_ID, source_id="0-res-demo", index=0, text="hi"), "needs a temporal SAE"),
    ("lens_prompt", "/v1/lens/prompt", S.LensPromptRequest(model=MODEL_ID, type=["LOGIT_LENS"], stream=False),
     "exactly one of"),
]

if hasattr(S, "SteerCompletionRequest"):  # steering: greedy (temperature 0), so both calls write the same text
    STEER = dict(model=MODEL_ID, steer_method="SIMPLE_ADDITIVE", normalize_steering=False, types=["STEERED", "DEFAULT"],
                 features=[S.NPSteerFeature(model=MODEL_ID, source="0-res-demo", index=3, strength=8)], n_completion_tokens=6,
                 temperature=0, strength_multiplier=1, freq_penalty=0, seed=1, n_logprobs=2)
    OK_CASES += [
        ("steer_completion", "/v1/steer/completion", S.SteerCompletionRequest(prompt="the cat", **STEER)),
        ("steer_completion_chat", "/v1/steer/completion-chat", S.SteerCompletionChatPostRequest(
            prompt=[S.NPSteerChatMessage(role="user", content="where is the cat?")], steer_special_tokens=False, **STEER)),
    ]
    BAD_CASES += [
        ("steer_completion", "/v1/steer/completion", S.SteerCompletionRequest(prompt="the cat", **{**STEER, "temperature": -1}),
         "temperature must be >= 0"),
    ]


def ingress_class():
    from ingress.app import SAEServeIngress

    return getattr(SAEServeIngress, "func_or_class", SAEServeIngress)  # the class under @serve.deployment


@pytest.fixture(scope="module")
def handle(serve_app):
    from ray import serve

    return serve.get_app_handle("saeserve")


def wire(model) -> dict:
    """A model as its JSON body: aliases, no nulls (the routes answer with response_model_exclude_none)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def assert_same(a, b):
    """The same answer up to float32 batch drift: the handle call and the HTTP call may land in model batches
    of different shapes (tests/compare.py says what that may change)."""
    assert_same_answer(a, b)


def test_every_ingress_method_is_covered():
    """A new public method on the deployment (steering, ...) needs a case here and a row in docs/python.md."""
    covered = {c[0] for c in OK_CASES} | {"capabilities"}
    public = {n for klass in ingress_class().__mro__ if klass.__module__ == "ingress.app"  # not Serve's ASGI wrapper
              for n, v in vars(klass).items() if not n.startswith("_") and asyncio.iscoroutinefunction(v)}
    assert {"tokenize", "activation_all", "util_sae_vector", "capabilities"} <= public
    assert public - covered == set(), f"handle methods without a test: {sorted(public - covered)}"


@pytest.mark.parametrize("method,route,req", OK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OK_CASES)])
def test_handle_equals_http(handle, http, method, route, req):
    got = getattr(handle, method).remote(req).result(timeout_s=120)
    r = http.post(route, json=wire(req))
    assert r.status_code == 200, r.text
    assert type(got) is return_type(method), type(got)
    # The HTTP body parses into the same response model, and the two are equal field for field (with the nulls of
    # the endpoints that write them).
    from ingress.endpoints import ENDPOINTS

    nulls = next(e for e in ENDPOINTS if e.name == method).exclude_none is False
    dump = (lambda m: m.model_dump(mode="json", by_alias=True)) if nulls else wire
    assert_same(dump(got), dump(type(got).model_validate(r.json())))
    assert_same(dump(got), r.json())


def return_type(method: str) -> type:
    import typing

    return typing.get_type_hints(getattr(ingress_class(), method))["return"]


def test_handle_await_from_asyncio(handle, http):
    """Inside async code (an async Ray actor, a Serve deployment) await the response instead of .result()."""
    req = S.ActivationAllRequest(prompt=TEXT, num_results=5, **ALL)

    async def main():
        return await asyncio.gather(handle.activation_all.remote(req), handle.tokenize.remote(S.TokenizeRequest(model=MODEL_ID, text=TEXT)))

    got_all, got_tok = asyncio.run(main())
    assert_same(wire(got_all), http.post("/v1/activation/all", json=wire(req)).json())
    assert got_tok.tokens == http.post("/v1/tokenize", json={"model": MODEL_ID, "text": TEXT}).json()["tokens"]


def test_capabilities_handle_equals_http(handle, http):
    got = handle.capabilities.remote().result(timeout_s=60)
    assert isinstance(got, S.CapabilitiesResponse)
    assert_same(wire(got), http.get("/v1/capabilities").json())
    assert got.model == MODEL_ID and got.limits["max_batch_prompts"] == 4 and got.limits["token_limit"] <= 64


@pytest.mark.parametrize("method,route,req,needle", BAD_CASES, ids=[f"{c[0]}:{c[3][:20]}" for c in BAD_CASES])
def test_handle_bad_input_raises_request_error(handle, http, method, route, req, needle):
    r = http.post(route, json=wire(req))
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert needle in message

    with pytest.raises(RequestError) as ei:  # Ray re-raises the replica's exception as a subclass of its type
        getattr(handle, method).remote(req).result(timeout_s=120)
    e = ei.value
    assert message in str(e)
    inner = unwrap_remote_error(e)  # the original RequestError, with .message and .status as over HTTP
    assert isinstance(inner, RequestError)
    assert (inner.message, inner.status) == (message, 400)


def test_handle_bad_input_awaited(handle):
    async def main():
        return await handle.activation_all.remote(ok_all.model_copy(update={"selected_sources": ["0-res-nope"]}))

    with pytest.raises(RequestError, match="Invalid SAE ID or type: 0-res-nope"):
        asyncio.run(main())


def test_schema_violations_fail_before_the_call():
    """What HTTP answers with 422 is a pydantic ValidationError when the caller builds the request model."""
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="index"):
        S.ActivationSingleRequest(prompt="hi", model=MODEL_ID, source="0-res-demo", index=1)  # index is a string
    with pytest.raises(pydantic.ValidationError, match="source_set"):
        S.ActivationAllRequest.model_validate({k: v for k, v in wire(ok_all).items() if k != "source_set"})


def test_service_still_answers_after_errors(handle):
    got = handle.activation_all.remote(ok_all).result(timeout_s=60)
    assert len(got.activations) == 3


DRIVER = r"""
import asyncio, json, sys
import ray
from ray import serve
from ingress import schemas as S

ray.init(address=sys.argv[1], log_to_driver=False)
h = serve.get_app_handle("saeserve")
req = S.ActivationAllRequest.model_validate_json(sys.argv[2])
got_sync = h.activation_all.remote(req).result(timeout_s=120)

async def main():
    return await h.activation_all.remote(req)

got_await = asyncio.run(main())
dump = lambda m: m.model_dump(mode="json", by_alias=True, exclude_none=True)
print("RESULT " + json.dumps({"sync": dump(got_sync), "await": dump(got_await)}))
"""


def test_handles_from_a_separate_driver(ray_session, serve_app, http):
    """What a Ray job does: its own driver process on the service's cluster, ``.result()`` and ``await`` (with the
    cluster's environment: throughput-optimised Serve lives in the replicas only, so both work there)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    req = S.ActivationAllRequest(prompt=TEXT, num_results=6, **ALL)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    proc = subprocess.run([sys.executable, "-c", DRIVER, ray_session.get_runtime_context().gcs_address, req.model_dump_json()],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    want = http.post("/v1/activation/all", json=wire(req)).json()
    assert_same(out["sync"], want)
    assert_same(out["await"], want)
