"""The shared routes in the 2026-08 dialect under /neuronpedia, driven with bodies shaped exactly as Neuronpedia's web
app builds them (``apps/webapp/lib/utils/inference.ts`` at ebb8426f: camelCase, its field choices), every request and
reply validated against that server's ``openapi.json``, and the numbers compared with TransformerLens + SAE Lens
called directly. The same app serves the 1.10.1 dialect at /v1 (its own tests stay as they are)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from tests import reference as R
from tests.compare import assert_same_answer, is_first_argmax_up_to_drift

from .conftest import MODEL_ID, SECRET
from .np2026 import spec, validate_reply, validate_request

RTOL = 1e-5
TEXT = "The cat sat on the mat."
PROMPTS = ["The cat sat on the mat.", "red blue green", "one two three"]  # each within the batch share (64 // 4 tokens)


def close(a, b, rtol=RTOL, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), rtol=rtol, atol=atol)


def call(np_web, path: str, body: dict, status: int = 200):
    """POST as the web app does; the body and the reply must both be what the 2026 spec describes."""
    validate_request(path, body)
    r = np_web.post(path, json=body)
    assert r.status_code == status, r.text
    validate_reply(path, status, r.json())
    return r.json()


@pytest.fixture(scope="module")
def n_layers(pack_dir):
    return R.model(str(pack_dir)).cfg.n_layers


# --- tokenize, activation/* ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prepend", [True, False])
def test_tokenize(np_web, pack_dir, prepend):
    m = R.model(str(pack_dir))
    got = call(np_web, "/v1/tokenize", {"model": MODEL_ID, "text": "hello world", "prependBos": prepend})  # tokenizeText
    want = m.to_tokens("hello world", prepend_bos=prepend)[0].tolist()
    assert got == {"tokens": want, "tokenStrings": [m.tokenizer.decode([t]) for t in want], "prependBos": prepend}


def test_activation_single_feature(np_web, pack_dir, n_layers):
    layer = n_layers - 1
    _, strs, feats = R.feature_acts(str(pack_dir), TEXT, "res-demo", layer)
    idx = int(feats[1:].max(dim=0).values.argmax())
    got = call(np_web, "/v1/activation/single", {"prompt": TEXT, "model": MODEL_ID, "source": f"{layer}-res-demo",
                                                  "index": str(idx)})  # getActivationForFeature: index is a string
    want = feats[1:, idx]
    assert close(got["activation"]["values"], want)
    assert math.isclose(got["activation"]["maxValue"], float(want.max()), rel_tol=RTOL)
    assert is_first_argmax_up_to_drift(want.tolist(), got["activation"]["maxValueIndex"])
    assert got["tokens"] == strs[1:] and got["tokensIsSpecial"] == [False] * (len(strs) - 1)


def test_activation_single_vector(np_web, pack_dir):
    m = R.model(str(pack_dir))
    hook = "blocks.0.hook_resid_post"
    vec = torch.linspace(-0.5, 0.5, m.cfg.d_model)
    _, acts = R.hook_acts(str(pack_dir), TEXT, hook)
    got = call(np_web, "/v1/activation/single", {"prompt": TEXT, "model": MODEL_ID, "vector": vec.tolist(), "hook": hook})
    assert close(got["activation"]["values"], acts @ vec, rtol=1e-4, atol=1e-4)
    assert got["tokens"] == m.to_str_tokens(TEXT) and got["tokensIsSpecial"][0] is True


def test_activation_single_dfa_fields_are_camel_case(np_web):
    got = call(np_web, "/v1/activation/single", {"prompt": TEXT, "model": MODEL_ID, "source": "0-att-demo", "index": "2"})
    a = got["activation"]
    assert {"dfaValues", "dfaMaxValue", "dfaTargetIndex"} <= set(a) and len(a["dfaValues"]) == len(a["values"])


def test_single_batch(np_web, pack_dir):
    got = call(np_web, "/v1/activation/single-batch", {"prompts": PROMPTS, "model": MODEL_ID, "source": "0-res-demo",
                                                        "index": "3"})
    assert len(got["results"]) == len(PROMPTS)
    for p, res in zip(PROMPTS, got["results"]):
        _, strs, feats = R.feature_acts(str(pack_dir), p, "res-demo", 0)
        assert res["tokens"] == strs[1:] and close(res["activation"]["values"], feats[1:, 3])


@pytest.mark.parametrize("sort_idx,ignore_bos", [([], True), ([2, 3], False)])
def test_activation_all(np_web, pack_dir, n_layers, sort_idx, ignore_bos):
    body = {"prompt": TEXT, "model": MODEL_ID, "selectedSources": [], "sortByTokenIndexes": sort_idx,
            "sourceSet": "res-demo", "ignoreBos": ignore_bos, "numResults": 20}  # runInferenceActivationAll
    got = call(np_web, "/v1/activation/all", body)
    feats = [R.feature_acts(str(pack_dir), TEXT, "res-demo", layer)[2] for layer in range(n_layers)]
    want = R.ranked(feats, 20, sort_idx, ignore_bos)
    assert got["tokens"] == R.feature_acts(str(pack_dir), TEXT, "res-demo", 0)[1] and len(got["activations"]) == 20
    for a, (_, _, mx, _, sm, _) in zip(got["activations"], want):
        assert math.isclose(a["maxValue"], mx, rel_tol=RTOL, abs_tol=1e-5)
        assert math.isclose(a["sumValues"], sm, rel_tol=RTOL, abs_tol=1e-4)
        col = feats[int(a["source"].split("-")[0])][:, a["index"]].clone()
        if ignore_bos:
            col[0] = 0
        assert close(a["values"], col)


def test_activation_all_batch_equals_singular(np_web):
    kw = {"model": MODEL_ID, "selectedSources": ["1-res-demo"], "sortByTokenIndexes": [], "sourceSet": "res-demo",
          "ignoreBos": True, "numResults": 8}
    got = call(np_web, "/v1/activation/all-batch", {"prompts": PROMPTS[:2], **kw})
    for p, res in zip(PROMPTS, got["results"]):
        assert_same_answer(res, call(np_web, "/v1/activation/all", {"prompt": p, **kw}))  # different batches: drift only


@pytest.mark.parametrize("ignore_bos", [True, False])
def test_topk_by_token(np_web, pack_dir, ignore_bos):
    ids, strs, feats = R.feature_acts(str(pack_dir), TEXT, "res-demo", 0)
    got = call(np_web, "/v1/activation/topk-by-token", {"prompt": TEXT, "model": MODEL_ID, "source": "0-res-demo",
                                                         "topK": 4, "ignoreBos": ignore_bos})
    start = 1 if ignore_bos else 0
    assert got["tokens"] == strs[start:]
    assert [x["tokenPosition"] for x in got["results"]] == list(range(start, len(ids)))
    for res in got["results"]:
        want = torch.sort(feats[res["tokenPosition"]], descending=True).values[:4]
        assert close([f["activationValue"] for f in res["topFeatures"]], want)
        assert close([float(feats[res["tokenPosition"], f["featureIndex"]]) for f in res["topFeatures"]], want)
        assert res["isSpecial"] is (res["tokenPosition"] == 0)  # BOS


def test_topk_is_clamped_not_refused(np_web, pack_dir):
    d_sae = R.sae(str(pack_dir), "res-demo", 0).cfg.d_sae
    for top_k, n in ((0, 1), (-3, 1), (10**6, min(d_sae, 100))):  # [1, d_sae], and the project's max_top_k (100)
        got = call(np_web, "/v1/activation/topk-by-token", {"prompt": "hi", "model": MODEL_ID, "source": "0-res-demo",
                                                             "topK": top_k, "ignoreBos": False})
        assert {len(r["topFeatures"]) for r in got["results"]} == {n}


def test_topk_batch(np_web, pack_dir):
    got = call(np_web, "/v1/activation/topk-by-token-batch", {"prompts": PROMPTS, "model": MODEL_ID, "source": "1-res-demo",
                                                               "topK": 2, "ignoreBos": True})
    for p, res in zip(PROMPTS, got["results"]):
        _, strs, feats = R.feature_acts(str(pack_dir), p, "res-demo", 1)
        assert res["tokens"] == strs[1:]
        for r in res["results"]:
            assert close([f["activationValue"] for f in r["topFeatures"]],
                         torch.sort(feats[r["tokenPosition"]], descending=True).values[:2])


def test_activation_source(np_web, pack_dir):
    got = call(np_web, "/v1/activation/source", {"prompts": PROMPTS[:2], "model": MODEL_ID, "source": "0-res-demo"})
    for p, res in zip(PROMPTS, got["results"]):
        _, strs, feats = R.feature_acts(str(pack_dir), p, "res-demo", 0)
        assert res["tokens"] == strs
        active = res["activeFeatures"]  # fixed name, and its keys are feature indices, untouched
        want = {(int(f), int(pos)) for pos, f in torch.nonzero(feats[1:]).tolist() for pos in [pos + 1]}
        assert {(int(f), int(pos)) for f, pairs in active.items() for pos, _ in pairs} == want
        for f, pairs in active.items():
            assert close([v for _, v in pairs], [float(feats[int(pos), int(f)]) for pos, _ in pairs])


# --- util ----------------------------------------------------------------------------------------------------


def test_cossim_feature_and_vector(np_web, pack_dir):
    target = R.sae(str(pack_dir), "res-demo", 1)
    query = R.sae(str(pack_dir), "res-demo", 0).W_dec[5].detach()
    w = target.W_dec.detach()
    cos = (w @ query) / (w.norm(dim=1) * query.norm())
    top = torch.sort(cos, descending=True)
    for body in ({"feature": {"model": MODEL_ID, "source": "0-res-demo", "index": 5}},  # getCosSimForFeature
                 {"vector": query.tolist()}):
        got = call(np_web, "/v1/util/sae-topk-by-decoder-cossim", {**body, "model": MODEL_ID, "source": "1-res-demo",
                                                                    "numResults": 10})
        feats = got["topkDecoderCossimFeatures"]
        assert [f["feature"] for f in feats] == [{"model": MODEL_ID, "source": "1-res-demo", "index": int(i)}
                                                 for i in top.indices[:10]]
        assert close([f["cosineSimilarity"] for f in feats], top.values[:10])
        assert got.get("feature") == body.get("feature")


def test_sae_vector(np_web, pack_dir):
    got = call(np_web, "/v1/util/sae-vector", {"model": MODEL_ID, "source": "1-res-demo", "index": 7})  # getVectorFromInstance
    sae = R.sae(str(pack_dir), "res-demo", 1)
    assert got["hookName"] == sae.cfg.metadata.hook_name and close(got["vector"], sae.W_enc[:, 7].detach())


def test_capabilities_stay_snake_case(np_web):
    r = np_web.get("/v1/capabilities")
    assert r.status_code == 200
    c = r.json()
    assert {"accepted_model_ids", "n_layers", "sae_sets", "steer_methods"} <= set(c)
    assert "/neuronpedia/v1/activation/all" in c["routes"] and "/v1/activation/all" in c["routes"]
    assert c["limits"]["neuronpedia_max_batch_prompts"] == 4 and c["limits"]["activation_token_limit"] <= 64


# --- steering --------------------------------------------------------------------------------------------------


SOURCE, INDEX = "0-res-demo", 3


def steer_body(**over) -> dict:
    """steerCompletion's body: features (no vectors key), normalizeSteering false, nLogprobs 5."""
    body = {"types": ["STEERED", "DEFAULT"], "prompt": "the cat", "model": MODEL_ID,
            "features": [{"model": MODEL_ID, "source": SOURCE, "index": INDEX, "strength": 8}], "strengthMultiplier": 1,
            "nCompletionTokens": 8, "temperature": 0, "freqPenalty": 0, "seed": 1, "steerMethod": "SIMPLE_ADDITIVE",
            "normalizeSteering": False, "stream": False, "nLogprobs": 5}
    return {**body, **over}


def chat_body(**over) -> dict:
    """steerCompletionChat's body (the non-streamed path: one type per request)."""
    body = {"types": ["STEERED"], "prompt": [{"role": "user", "content": "where is the cat?"}], "model": MODEL_ID,
            "features": [{"model": MODEL_ID, "source": SOURCE, "index": INDEX, "strength": 8}], "strengthMultiplier": 1,
            "nCompletionTokens": 6, "temperature": 0, "freqPenalty": 0, "seed": 1, "steerSpecialTokens": False,
            "steerMethod": "SIMPLE_ADDITIVE", "normalizeSteering": False, "nLogprobs": 5, "isAssistantAxis": False,
            "stream": False}
    return {**body, **over}


@torch.no_grad()
def greedy(pack, ids: list[int], n: int, coeff: float | None, no_steer: frozenset = frozenset()) -> list[int]:
    """Greedy decoding on TransformerLens, the whole sequence each step, adding coeff * W_dec[INDEX] at the SAE's
    hook at every position except those holding a ``no_steer`` token; stops before EOS."""
    m = R.model(str(pack))
    sae = R.sae(str(pack), "res-demo", 0)
    v = sae.W_dec[INDEX].detach()
    seq = list(ids)
    for _ in range(n):
        mask = torch.tensor([t not in no_steer for t in seq], dtype=torch.float32)[None, :, None]
        hooks = [] if coeff is None else [(sae.cfg.metadata.hook_name, lambda act, hook: act + coeff * v * mask)]
        nxt = int(m.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0, -1].argmax())
        if nxt == m.tokenizer.eos_token_id:
            break
        seq.append(nxt)
    return seq[len(ids):]


def decode(pack, ids) -> str:
    return R.model(str(pack)).tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_steer_completion_output_is_the_generated_text_only(np_web, http, pack_dir):
    got = call(np_web, "/v1/steer/completion", steer_body())
    m = R.model(str(pack_dir))
    ids = [m.tokenizer.bos_token_id, *m.tokenizer("the cat", add_special_tokens=False)["input_ids"]]
    want = {"STEERED": decode(pack_dir, greedy(pack_dir, ids, 8, 8.0)), "DEFAULT": decode(pack_dir, greedy(pack_dir, ids, 8, None))}
    assert [o["type"] for o in got["outputs"]] == ["STEERED", "DEFAULT"]
    for o in got["outputs"]:
        assert o["output"] == want[o["type"]]  # 1.10.1 echoed "the cat" first; the web app would show it twice
        assert 1 <= len(o["logprobs"]) <= 8
        for lp in o["logprobs"]:
            assert lp["topLogprobs"] == lp["top_logprobs"] and len(lp["topLogprobs"]) == 5  # both names, one value
            assert lp["logprob"] == max(t["logprob"] for t in lp["topLogprobs"])  # greedy takes the top candidate
    v1 = http.post("/v1/steer/completion", json={
        "prompt": "the cat", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
        "types": ["STEERED"], "features": [{"model": MODEL_ID, "source": SOURCE, "index": INDEX, "strength": 8}],
        "n_completion_tokens": 8, "temperature": 0, "strength_multiplier": 1, "freq_penalty": 0, "seed": 1}).json()
    assert v1["outputs"][0]["output"] == "the cat" + want["STEERED"]  # the 1.10.1 dialect still echoes


def sse(resp: httpx.Response) -> list[dict]:
    out, buf = [], ""
    for chunk in resp.iter_text():
        buf += chunk
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            assert block.startswith("data: ")
            out.append(json.loads(block[len("data: "):]))
    return out


def test_steer_completion_streams_one_type_per_request(np_web):
    """The web app streams, one request per type; each event is the whole response so far, in the dialect's
    casing, and the last equals the non-streamed reply."""
    for kind in ("STEERED", "DEFAULT"):
        body = steer_body(types=[kind], stream=True, nCompletionTokens=10)
        validate_request("/v1/steer/completion", body)
        with np_web.stream("POST", "/v1/steer/completion", json=body) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            events = sse(resp)
        plain = call(np_web, "/v1/steer/completion", {**body, "stream": False})
        assert len(events) >= 2 and events[-1] == plain
        for e in events:
            validate_reply("/v1/steer/completion", 200, e)
            assert [o["type"] for o in e["outputs"]] == [kind]
        for prev, cur in zip(events, events[1:]):
            assert cur["outputs"][0]["output"].startswith(prev["outputs"][0]["output"][:-3])


def test_steer_completion_with_vectors(np_web, pack_dir):
    """hasVector: `vectors` ({hook, steeringVector, strength}), no `features` key."""
    sae = R.sae(str(pack_dir), "res-demo", 0)
    vec = sae.W_dec[INDEX].detach()
    body = steer_body(types=["STEERED"], vectors=[{"hook": sae.cfg.metadata.hook_name, "steeringVector": vec.tolist(),
                                                   "strength": 8}])
    del body["features"]
    by_vector = call(np_web, "/v1/steer/completion", body)
    by_feature = call(np_web, "/v1/steer/completion", steer_body(types=["STEERED"]))
    assert by_vector["outputs"][0]["output"] == by_feature["outputs"][0]["output"]


def test_chat(np_web, pack_dir):
    m = R.model(str(pack_dir))
    tok = m.tokenizer
    msgs = [{"role": "user", "content": "where is the cat?"}]
    templated = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = [tok.bos_token_id, *tok(templated, add_special_tokens=False)["input_ids"]]
    special = set(tok.all_special_ids)
    for kind, coeff in (("STEERED", 8.0), ("DEFAULT", None)):
        got = call(np_web, "/v1/steer/completion-chat", chat_body(types=[kind]))
        text = decode(pack_dir, greedy(pack_dir, ids, 6, coeff, frozenset(special)))  # steerSpecialTokens false
        assert got["input"] == {"chatTemplate": msgs, "raw": decode(pack_dir, ids)}  # raw: the decoded prompt, BOS too
        (o,) = got["outputs"]
        assert o["type"] == kind and o["raw"] == decode(pack_dir, ids) + text
        assert o["chatTemplate"] == [*msgs, {"role": "assistant", "content": text}]
        assert all(lp["topLogprobs"] == lp["top_logprobs"] for lp in o["logprobs"])
        assert "assistantAxis" not in got  # persona monitoring: the 2026 server's vLLM path only


def test_chat_streams(np_web):
    body = chat_body(types=["DEFAULT"], stream=True, features=[])  # a chat with no features steers nothing
    validate_request("/v1/steer/completion-chat", body)
    with np_web.stream("POST", "/v1/steer/completion-chat", json=body) as resp:
        assert resp.status_code == 200
        events = sse(resp)
    for e in events:
        validate_reply("/v1/steer/completion-chat", 200, e)
    assert events[-1] == call(np_web, "/v1/steer/completion-chat", {**body, "stream": False})


def test_chat_strips_earlier_reasoning(np_web):
    """Earlier assistant turns are rendered without their <think> blocks; the echo keeps them as sent."""
    thinking = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm, a cat</think>hello"},
                {"role": "user", "content": "where is the cat?"}]
    plain = [{**m, "content": "hello"} if m["role"] == "assistant" else m for m in thinking]
    a = call(np_web, "/v1/steer/completion-chat", chat_body(types=["DEFAULT"], prompt=thinking))
    b = call(np_web, "/v1/steer/completion-chat", chat_body(types=["DEFAULT"], prompt=plain))
    assert a["input"]["raw"] == b["input"]["raw"] and "think" not in a["input"]["raw"]
    assert a["outputs"][0]["raw"] == b["outputs"][0]["raw"]
    assert a["input"]["chatTemplate"] == thinking


def test_assistant_axis_is_a_400(np_web):
    r = np_web.post("/v1/steer/completion-chat", json=chat_body(isAssistantAxis=True))
    assert r.status_code == 400 and "assistant axis" in r.json()["error"]


def test_steer_features_empty_list_steers_nothing(np_web):
    got = call(np_web, "/v1/steer/completion", steer_body(features=[], types=["STEERED", "DEFAULT"]))
    assert got["outputs"][0]["output"] == got["outputs"][1]["output"]


def test_steer_generation_is_clamped_to_the_room_left(np_web, pack_dir):
    """nCompletionTokens over the cap or the context is clamped (the 1.10.1 dialect answers 400)."""
    n_ctx = R.model(str(pack_dir)).cfg.n_ctx
    got = call(np_web, "/v1/steer/completion", steer_body(types=["DEFAULT"], nCompletionTokens=10**6, nLogprobs=0))
    assert "logprobs" not in got["outputs"][0]
    ids = R.model(str(pack_dir)).tokenizer(got["outputs"][0]["output"], add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= n_ctx


# --- the dialect's rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch,field", [({"nCompletionTokens": 0}, "nCompletionTokens"), ({"temperature": -1}, "temperature"),
                                         ({"nLogprobs": 11}, "nLogprobs"), ({"types": []}, "types")])
def test_steer_schema_violations_are_422(np_web, patch, field):
    for path, body in (("/v1/steer/completion", steer_body(**patch)), ("/v1/steer/completion-chat", chat_body(**patch))):
        r = np_web.post(path, json=body)
        assert r.status_code == 422, r.text
        validate_reply(path, 422, r.json())
        assert field in r.json()["error"] and r.json()["detail"][0]["loc"][-1] == field


@pytest.mark.parametrize("path,body", [
    ("/v1/activation/single-batch", {"prompts": ["a"] * 5, "model": MODEL_ID, "source": "0-res-demo", "index": "1"}),
    ("/v1/activation/all-batch", {"prompts": ["a"] * 5, "model": MODEL_ID, "selectedSources": [], "sortByTokenIndexes": [],
                                  "sourceSet": "res-demo", "ignoreBos": True, "numResults": 3}),
    ("/v1/activation/topk-by-token-batch", {"prompts": ["a"] * 5, "model": MODEL_ID, "source": "0-res-demo", "topK": 1,
                                            "ignoreBos": True}),
    ("/v1/activation/source", {"prompts": ["a"] * 5, "model": MODEL_ID, "source": "0-res-demo"}),
])
def test_batches_of_more_than_4_or_none_are_400(np_web, path, body):
    r = np_web.post(path, json=body)
    assert r.status_code == 400 and "Too many prompts: 5, max is 4" in r.json()["error"]
    r = np_web.post(path, json={**body, "prompts": []})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    assert np_web.post(path, json={**body, "prompts": ["a"] * 4}).status_code == 200


def test_batch_prompts_share_the_activation_token_limit(np_web):
    """A request with several prompts shares activation_token_limit (64 here) among the cap (4): 16 tokens each;
    a lone prompt may use all of it."""
    long = " ".join(["cat"] * 20)
    n = len(np_web.post("/v1/tokenize", json={"model": MODEL_ID, "text": long, "prependBos": True}).json()["tokens"])
    assert 16 < n <= 64
    body = {"prompts": [long, "a"], "model": MODEL_ID, "source": "0-res-demo"}
    r = np_web.post("/v1/activation/source", json=body)
    assert r.status_code == 400 and f"Text too long: {n} tokens, max is 16 per prompt" in r.json()["error"]
    assert np_web.post("/v1/activation/source", json={**body, "prompts": [long]}).status_code == 200
    r = np_web.post("/v1/activation/single", json={"prompt": " ".join(["cat"] * 70), "model": MODEL_ID,
                                                    "source": "0-res-demo", "index": "1"})
    assert r.status_code == 400 and r.json()["error"].startswith("Text too long: ")


def test_model_is_advisory(np_web, http):
    """The web app may name its own model id: logged, never refused (the 1.10.1 dialect says Unsupported model)."""
    body = {"prompt": TEXT, "model": "gpt2-small", "source": "0-res-demo", "index": "3"}
    assert np_web.post("/v1/activation/single", json=body).status_code == 200
    assert http.post("/v1/activation/single", json=body).json() == {"error": "Unsupported model"}


def test_either_casing_and_unknown_keys(np_web):
    camel = {"prompt": TEXT, "model": MODEL_ID, "source": "0-res-demo", "topK": 3, "ignoreBos": True, "extra": {"x": 1}}
    snake = {"prompt": TEXT, "model": MODEL_ID, "source": "0-res-demo", "top_k": 3, "ignore_bos": True}
    a = np_web.post("/v1/activation/topk-by-token", json=camel)
    b = np_web.post("/v1/activation/topk-by-token", json=snake)
    assert a.status_code == b.status_code == 200
    assert_same_answer(a.json(), b.json())


def test_same_answers_in_both_dialects(np_web, http):
    """One handler behind both: the /v1 reply, its keys camelCased, is the /neuronpedia reply."""
    from ingress.dialects import NEURONPEDIA, rename
    from ingress import schemas as S

    v1_body = {"prompt": TEXT, "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [],
               "sort_by_token_indexes": [1], "ignore_bos": True, "num_results": 6}
    np_body = {"prompt": TEXT, "model": MODEL_ID, "sourceSet": "res-demo", "selectedSources": [], "sortByTokenIndexes": [1],
               "ignoreBos": True, "numResults": 6}
    v1 = http.post("/v1/activation/all", json=v1_body).json()
    assert_same_answer(rename(v1, S.ActivationAllResponse), np_web.post("/v1/activation/all", json=np_body).json())
    assert NEURONPEDIA.prefix == "/neuronpedia"


def test_auth(serve_app):
    """Every /neuronpedia route needs the secret (the web app always sends X-SECRET-KEY, possibly empty); the
    dialect's docs are public like /docs."""
    base = f"{serve_app}/neuronpedia"
    doc = httpx.get(f"{base}/openapi.json", timeout=30)
    assert doc.status_code == 200 and SECRET not in doc.text
    assert httpx.get(f"{base}/docs", timeout=30).status_code == 200
    checked = 0
    for path, ops in doc.json()["paths"].items():
        for method in ops:
            for headers in ({}, {"X-SECRET-KEY": ""}, {"X-SECRET-KEY": "wrong"}):
                r = httpx.request(method.upper(), base + path, json={} if method == "post" else None, headers=headers, timeout=30)
                assert r.status_code == 401 and r.json() == {"error": "Invalid or missing X-SECRET-KEY header"}, (path, r.text)
                checked += 1
    assert checked >= 3 * 15


def test_dialect_docs_cover_what_the_web_app_calls(np_web, http):
    """/neuronpedia/openapi.json: the routes as the web app's spec lays them out (paths under /v1, the prefix as the
    server), camelCase bodies; the /v1 spec (the 1.10.1 API) does not list them."""
    ours = np_web.get("/openapi.json").json()
    assert ours["servers"] == [{"url": "/neuronpedia"}]
    called = {"/v1/activation/all", "/v1/activation/all-batch", "/v1/activation/attention", "/v1/activation/single",
              "/v1/activation/single-batch", "/v1/activation/source", "/v1/activation/topk-by-token",
              "/v1/activation/topk-by-token-batch", "/v1/steer/completion", "/v1/steer/completion-chat", "/v1/tokenize",
              "/v1/util/sae-topk-by-decoder-cossim", "/v1/util/sae-vector", "/v1/util/similarity-matrix-pred"}
    assert called <= set(spec()["paths"]) and called <= set(ours["paths"])
    props = ours["components"]["schemas"]["SteerCompletionChatPostRequest"]["properties"]
    assert {"nCompletionTokens", "steerSpecialTokens", "isAssistantAxis"} <= set(props)
    main = http.get("/openapi.json").json()
    assert not any(p.startswith("/neuronpedia") for p in main["paths"])
