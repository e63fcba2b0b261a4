"""The dialect mechanism on its own (no Ray): every endpoint's models have a camelCase form, replies are renamed
by their models (data keys untouched, the declared exceptions kept), and a stream's already-serialised frames pass
through unchanged."""

from __future__ import annotations

import asyncio
import json

import pydantic
import pytest

from ingress import schemas as S
from ingress.dialects import BOTH_CASINGS, NEURONPEDIA, V1, camel_model, rename
from ingress.endpoints import ENDPOINTS, PUBLIC_PATHS, route_paths


def _models(cls, seen=None):
    """cls and every model nested in its fields."""
    import typing

    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    stack = [f.annotation for f in cls.model_fields.values()]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, pydantic.BaseModel):
            _models(a, seen)
        stack.extend(typing.get_args(a))
    return seen


def test_every_endpoint_has_a_form_in_each_of_its_dialects():
    for ep in ENDPOINTS:
        for d in ep.dialects:
            body = d.request_model(ep.request)
            if ep.request is not None:
                assert issubclass(body, ep.request)  # the handler gets the model it declares
                body.model_json_schema()  # builds (FastAPI documents it)
            d.reply_model(ep.response, ep.reply_casing == "snake").model_json_schema()
            for m in _models(ep.response):
                rename({}, m)  # every reply model can be renamed by type (no union of several models)
        assert ep.reply_casing in ("dialect", "snake")
    served = {ep.name for ep in ENDPOINTS if NEURONPEDIA in ep.dialects}
    assert {"activation_attention", "util_similarity_matrix_pred", "steer_completion_chat", "capabilities",
            "lens_prompt"} <= served
    lens = next(ep for ep in ENDPOINTS if ep.name == "lens_prompt")  # NDJSON frames, snake_case in both dialects
    assert lens.streams and lens.stream_media == "application/x-ndjson" and lens.reply_casing == "snake"
    assert not any(NEURONPEDIA in ep.dialects for ep in ENDPOINTS if "legacy" in ep.tags)
    assert "/neuronpedia/v1/activation/all" in route_paths() and "/v1/activation/all" in route_paths()
    assert {"/neuronpedia/docs", "/neuronpedia/openapi.json"} <= PUBLIC_PATHS
    assert not any(p.startswith("/neuronpedia/v1") for p in PUBLIC_PATHS)


def test_requests_take_either_casing_and_ignore_unknown_keys():
    cls = NEURONPEDIA.request_model(S.ActivationAllRequest)
    camel = {"prompt": "x", "model": "m", "sourceSet": "s", "selectedSources": [], "sortByTokenIndexes": [1],
             "ignoreBos": True, "numResults": 3, "whatever": 1}
    snake = {"prompt": "x", "model": "m", "source_set": "s", "selected_sources": [], "sort_by_token_indexes": [1],
             "ignore_bos": True, "num_results": 3}
    a, b = cls.model_validate(camel), cls.model_validate(snake)
    assert isinstance(a, S.ActivationAllRequest) and a.model_dump() == b.model_dump() == S.ActivationAllRequest(**snake).model_dump()
    with pytest.raises(pydantic.ValidationError):
        cls.model_validate({**camel, "ignoreBos": "yes"})  # the model's own strictness stays
    steer = NEURONPEDIA.request_model(S.SteerCompletionRequest)
    nested = steer.model_validate({"prompt": "p", "model": "m", "steerMethod": "SIMPLE_ADDITIVE", "normalizeSteering": False,
                                   "types": ["STEERED"], "vectors": [{"hook": "h", "steeringVector": [1.0], "strength": 2}],
                                   "nCompletionTokens": 1, "temperature": 0, "strengthMultiplier": 1, "freqPenalty": 0,
                                   "seed": 0})
    assert isinstance(nested.vectors[0], S.NPSteerVector) and nested.vectors[0].steering_vector == [1.0]
    assert V1.request_model(S.SteerCompletionRequest) is S.SteerCompletionRequest  # v1: the model itself
    with pytest.raises(pydantic.ValidationError, match="nCompletionTokens must be at least 1"):
        steer.model_validate({**nested.model_dump(by_alias=True), "nCompletionTokens": 0})  # the 2026 schema's 422s
    S.SteerCompletionRequest.model_validate({**nested.model_dump(), "n_completion_tokens": 0})  # v1: the handler's 400


def test_replies_are_renamed_by_their_models():
    reply = S.ActivationSourceResponse(results=[S.ActivationSourceResult(tokens=["a"], active_features={"12": [[1, 0.5]]})])
    assert json.loads(NEURONPEDIA.dump(reply)) == json.loads(V1.dump(reply)) == {
        "results": [{"tokens": ["a"], "activeFeatures": {"12": [[1, 0.5]]}}]}  # fixed name; its keys are data
    vec = S.UtilSaeVectorResponse(vector=[1.0], hook_name="blocks.0.hook_resid_post")
    assert json.loads(NEURONPEDIA.dump(vec, exclude_none=False)) == {"vector": [1.0], "hookName": "blocks.0.hook_resid_post"}
    steer = S.SteerCompletionPost200Response(outputs=[S.NPSteerCompletionResponseInner(
        type="STEERED", output="x", logprobs=[S.NPLogprob(token="a", logprob=-0.5, top_logprobs=[
            S.NPLogprobTop(token="a", logprob=float("nan"))])])])
    out = json.loads(NEURONPEDIA.dump(steer))
    lp = out["outputs"][0]["logprobs"][0]
    assert "top_logprobs" in BOTH_CASINGS and lp["topLogprobs"] == lp["top_logprobs"] == [{"token": "a", "logprob": None}]
    single = S.ActivationSingleResponse(activation=S.ActivationValues(values=[1.0], max_value=1.0, max_value_index=0),
                                        tokens=["é"], tokens_is_special=[True])
    assert NEURONPEDIA.dump(single) == ('{"activation":{"values":[1.0],"maxValue":1.0,"maxValueIndex":0},"tokens":["é"],'
                                        '"tokensIsSpecial":[true]}')
    sim = S.SimilarityMatrixPredResponse(similarity_matrix=[[1.0]], tokens=["a"])
    assert json.loads(NEURONPEDIA.dump(sim, snake=True)) == {"similarity_matrix": [[1.0]], "tokens": ["a"]}


def test_documented_models_are_camel_case_with_the_fixed_names():
    doc = camel_model(S.ActivationSourceResult).model_json_schema(by_alias=True)
    assert set(doc["properties"]) == {"tokens", "activeFeatures"}
    doc = camel_model(S.ActivationAllFeature).model_json_schema(by_alias=True)
    assert {"maxValueIndex", "dfaTargetIndex", "sumValues"} <= set(doc["properties"])


def test_stream_frames_already_serialised_pass_through():
    """A handler that yields finished frames (NDJSON lines, as a lens stream does) gets them out byte for byte in
    every dialect; model events are serialised in the dialect's casing."""
    from ingress.app import _sse

    lines = ['{"kind":"meta","top_n":3}\n', b'{"kind":"done","seq_len":4}\n']

    async def events():
        for x in lines:
            yield x
        yield S.TokenizeResponse(tokens=[1], token_strings=["a"], prepend_bos=True)

    async def collect(dialect, snake=False):
        return [x async for x in _sse(events(), dialect, snake)]

    for d in (V1, NEURONPEDIA):
        got = asyncio.run(collect(d))
        assert got[:2] == lines
    assert asyncio.run(collect(NEURONPEDIA))[2] == 'data: {"tokens":[1],"tokenStrings":["a"],"prependBos":true}\n\n'
    assert asyncio.run(collect(NEURONPEDIA, snake=True))[2] == 'data: {"tokens":[1],"token_strings":["a"],"prepend_bos":true}\n\n'

    async def ndjson():
        return [x async for x in _sse(events(), NEURONPEDIA, True, "application/x-ndjson")]

    assert asyncio.run(ndjson()) == [*lines, '{"tokens":[1],"token_strings":["a"],"prepend_bos":true}\n']


def test_a_stream_that_fails_midway_ends_with_an_error_frame_in_its_own_framing():
    from deployments.engine.errors import RequestError
    from ingress.app import _sse

    async def events():
        yield '{"kind":"meta"}\n'
        raise RequestError("Jacobian lens is not available for this model")

    async def collect(media):
        return [x async for x in _sse(events(), NEURONPEDIA, True, media)]

    err = {"error": "Jacobian lens is not available for this model", "status": 400}
    assert asyncio.run(collect("application/x-ndjson"))[1] == json.dumps(err) + "\n"
    assert asyncio.run(collect("text/event-stream"))[1] == f"data: {json.dumps(err)}\n\n"


def test_chat_without_a_template_is_a_400_in_the_2026_dialect(pack_dir):
    """No ChatML fallback there: the tokenizer's own template or a 400 that says what to use instead. (The check runs
    before any deployment is called: the handles here are never used.)"""
    from transformers import PreTrainedTokenizerFast

    from deployments import protocol as P
    from deployments.engine.errors import RequestError
    from ingress.args import AppArgs
    from ingress.backend import Backend
    from ingress.handlers import SteerHandler
    from ingress.handlers.steer import without_reasoning

    class Unused:
        def options(self, **_):
            return self

    tok = PreTrainedTokenizerFast.from_pretrained(str(pack_dir / "model"))
    tok.chat_template = None
    backend = Backend(AppArgs(model=str(pack_dir)), [], Unused(), Unused())
    backend.tokenizer, backend.info = tok, P.ModelInfo(n_layers=4, n_ctx=128, d_model=128, d_vocab=len(tok))
    req = NEURONPEDIA.request_model(S.SteerCompletionChatPostRequest).model_validate({
        "prompt": [{"role": "user", "content": "hi"}], "model": "demo-lm", "steerMethod": "SIMPLE_ADDITIVE",
        "normalizeSteering": False, "types": ["DEFAULT"], "features": [], "nCompletionTokens": 2, "temperature": 0,
        "strengthMultiplier": 1, "freqPenalty": 0, "seed": 0, "steerSpecialTokens": False})
    with pytest.raises(RequestError, match="no chat template.*steer/completion"):
        asyncio.run(SteerHandler(backend, NEURONPEDIA).prepare(req))
    assert without_reasoning([{"role": "user", "content": "<think>x</think>keep"},
                              {"role": "assistant", "content": "<think>a\nb</think> answer "},
                              {"role": "assistant", "content": "<think>only</think>"}]) == [
        {"role": "user", "content": "<think>x</think>keep"}, {"role": "assistant", "content": "answer"}]
