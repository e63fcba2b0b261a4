"""steer/completion, steer/completion-chat and legacy /completion over real HTTP, through the published client,
against TransformerLens on the same weights; streaming (SSE), disconnects, seeded sampling under load, bad input."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from neuronpedia_inference_client.models import (
    NPSteerChatMessage,
    NPSteerFeature,
    NPSteerMethod,
    NPSteerType,
    NPSteerVector,
    SteerCompletionChatPostRequest,
    SteerCompletionRequest,
)

from tests import reference as R

from .conftest import MODEL_ID, SECRET

SOURCE, LAYER, INDEX = "0-res-demo", 0, 3
BASE = {"prompt": "the cat", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
        "types": ["STEERED", "DEFAULT"], "features": [{"model": MODEL_ID, "source": SOURCE, "index": INDEX, "strength": 8}],
        "n_completion_tokens": 8, "temperature": 0, "strength_multiplier": 1, "freq_penalty": 0, "seed": 1}


def reference_greedy(pack, prompt: str, n: int, coeff: float | None):
    """TransformerLens generate (KV cache) with a hook adding coeff * W_dec[INDEX] at the SAE's hook."""
    m = R.model(str(pack))
    sae = R.sae(str(pack), "res-demo", LAYER)
    v = sae.W_dec[INDEX].detach()
    hooks = [] if coeff is None else [(sae.cfg.metadata.hook_name, lambda act, hook: act + coeff * v)]
    toks = [m.tokenizer.bos_token_id, *m.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad(), m.hooks(fwd_hooks=hooks):
        out = m.generate(torch.tensor([toks]), max_new_tokens=n, do_sample=False, stop_at_eos=True, verbose=False,
                         use_past_kv_cache=True)[0, len(toks):].tolist()
    if m.tokenizer.eos_token_id in out:
        out = out[: out.index(m.tokenizer.eos_token_id)]
    return prompt + m.tokenizer.decode(out, clean_up_tokenization_spaces=False)


def test_client_completion_matches_transformer_lens(np_client, pack_dir):
    r = np_client.steer_completion_post(SteerCompletionRequest(
        prompt="the cat", model=MODEL_ID, steer_method=NPSteerMethod.SIMPLE_ADDITIVE, normalize_steering=False,
        types=[NPSteerType.DEFAULT, NPSteerType.STEERED],
        features=[NPSteerFeature(model=MODEL_ID, source=SOURCE, index=INDEX, strength=4, steering_vector=[9.0])],
        n_completion_tokens=8, temperature=0, strength_multiplier=2, freq_penalty=0, seed=1, n_logprobs=3))
    assert [o.type for o in r.outputs] == [NPSteerType.DEFAULT, NPSteerType.STEERED]
    assert r.outputs[0].output == reference_greedy(pack_dir, "the cat", 8, None)
    assert r.outputs[1].output == reference_greedy(pack_dir, "the cat", 8, 8.0)  # 4 x 2; steering_vector ignored
    for o in r.outputs:
        assert 1 <= len(o.logprobs) <= 8
        for lp in o.logprobs:
            assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
            assert lp.logprob == max(t.logprob for t in lp.top_logprobs)  # greedy picks the top candidate


def test_client_chat_and_vectors_every_method(np_client, pack_dir):
    d = R.model(str(pack_dir)).cfg.d_model
    msgs = [NPSteerChatMessage(role="user", content="hello there")]
    outs = {}
    for method in NPSteerMethod:
        r = np_client.steer_completion_chat_post(SteerCompletionChatPostRequest(
            prompt=msgs, model=MODEL_ID, steer_method=method, normalize_steering=True, types=[NPSteerType.STEERED],
            vectors=[NPSteerVector(steering_vector=[1.0] * d, strength=3, hook="blocks.0.hook_resid_post")],
            n_completion_tokens=6, temperature=0, strength_multiplier=1, freq_penalty=0, seed=0, steer_special_tokens=False))
        assert r.input.raw.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello there<|im_end|>\n" in r.input.raw
        assert [m.role for m in r.input.chat_template] == ["user"]
        (o,) = r.outputs
        assert o.type == NPSteerType.STEERED and o.logprobs is None
        assert o.chat_template[:-1] == r.input.chat_template and o.chat_template[-1].role == "assistant"
        assert o.raw == r.input.raw + o.chat_template[-1].content
        outs[method] = o.raw
    assert len(outs) == 3


def events(resp: httpx.Response) -> list[dict]:
    out, buf = [], ""
    for chunk in resp.iter_text():
        buf += chunk
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            assert block.startswith("data: ")
            out.append(json.loads(block[len("data: "):]))
    return out


def test_stream_is_cumulative_and_ends_with_the_plain_response(http):
    body = {**BASE, "temperature": 0.8, "seed": 5, "n_logprobs": 2, "n_completion_tokens": 10}
    with http.stream("POST", "/v1/steer/completion", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        evs = events(resp)
    plain = http.post("/v1/steer/completion", json=body).json()
    assert len(evs) >= 2 and evs[-1] == plain
    for prev, cur in zip(evs, evs[1:]):
        for a, b in zip(prev["outputs"], cur["outputs"]):
            assert b["output"].startswith(a["output"][: len(a["output"]) - 3])  # cumulative (a byte-split may resolve)
            assert b["logprobs"][: len(a["logprobs"])] == a["logprobs"]
    assert [o["type"] for o in plain["outputs"]] == ["STEERED", "DEFAULT"]


def test_disconnect_mid_stream_stops_generation(http):
    from ray import serve

    model = serve.get_deployment_handle("ModelDeployment", app_name="saeserve")
    before = model.generation_stats.remote().result()
    body = {**BASE, "n_completion_tokens": 100, "types": ["STEERED"], "temperature": 1, "stream": True}
    with http.stream("POST", "/v1/steer/completion", json=body) as resp:
        it = resp.iter_lines()
        got = [line for _, line in zip(range(3), it)]
        assert got[0].startswith("data: ")
    # the connection is closed: the row must leave the batch long before its 100 tokens
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = model.generation_stats.remote().result()
        if s["active_rows"] == 0 and s["cancelled_rows"] > before["cancelled_rows"]:
            break
        time.sleep(0.1)
    assert s["active_rows"] == 0 and s["cancelled_rows"] == before["cancelled_rows"] + 1
    assert s["tokens"] - before["tokens"] < 100
    assert http.post("/v1/steer/completion", json={**BASE, "n_completion_tokens": 2}).status_code == 200


def test_steered_and_default_share_their_prefill_below_the_steered_layer(http, pack_dir):
    """A feature of the layer-2 SAE: the request's STEERED and DEFAULT rows are prefilled as one stream through
    blocks 0 and 1 (the replica's generation_stats count it), and both equal TransformerLens generate."""
    from ray import serve

    model = serve.get_deployment_handle("ModelDeployment", app_name="saeserve")
    before = model.generation_stats.remote().result()
    body = {**BASE, "features": [{"model": MODEL_ID, "source": "2-res-demo", "index": INDEX, "strength": 6}],
            "n_completion_tokens": 6}
    out = http.post("/v1/steer/completion", json=body).json()
    after = model.generation_stats.remote().result()
    assert after["prefill_rows_shared"] == before["prefill_rows_shared"] + 1
    m = R.model(str(pack_dir))
    v = R.sae(str(pack_dir), "res-demo", 2).W_dec[INDEX].detach()
    toks = [m.tokenizer.bos_token_id, *m.tokenizer("the cat", add_special_tokens=False)["input_ids"]]
    for o in out["outputs"]:
        hooks = [("blocks.2.hook_resid_post", lambda act, hook: act + 6.0 * v)] if o["type"] == "STEERED" else []
        with torch.no_grad(), m.hooks(fwd_hooks=hooks):
            ref = m.generate(torch.tensor([toks]), max_new_tokens=6, do_sample=False, stop_at_eos=True, verbose=False,
                             use_past_kv_cache=True)[0, len(toks):].tolist()
        if m.tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(m.tokenizer.eos_token_id)]
        assert o["output"] == "the cat" + m.tokenizer.decode(ref, clean_up_tokenization_spaces=False)


def test_seeded_sampling_same_alone_and_among_8_concurrent(http):
    target = {**BASE, "temperature": 1.0, "seed": 123, "n_completion_tokens": 8, "freq_penalty": 0.5}
    alone = http.post("/v1/steer/completion", json=target).json()
    bodies = [{**target, "seed": 1000 + i, "prompt": f"the dog {i}"} for i in range(7)]
    bodies.insert(4, target)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda b: http.post("/v1/steer/completion", json=b).json(), bodies))
    assert results[4] == alone
    assert len({json.dumps(r) for r in results}) == 8


def test_ray_handle_and_legacy_completion(serve_app, http):
    from ray import serve

    from ingress import schemas as S

    h = serve.get_app_handle("saeserve")
    r = h.steer_completion.remote(S.SteerCompletionRequest(**BASE)).result()
    plain = http.post("/v1/steer/completion", json=BASE).json()
    assert r.model_dump(mode="json", exclude_none=True) == plain

    legacy = {"prompt": "the cat", "model": MODEL_ID, "features": [{"layer": SOURCE, "index": str(INDEX), "strength": 8}],
              "types": ["steered", "default"], "n_completion_tokens": 8, "temperature": 0, "strength_multiplier": 1,
              "freq_penalty": 0, "seed": 1}
    with httpx.Client(base_url=serve_app, timeout=60) as bare:  # body secret, no header
        bad = bare.post("/completion", json={**legacy, "secret": "wrong"})
        assert bad.status_code == 401 and "error" in bad.json()
        assert bare.post("/completion", json=legacy).status_code == 401
        ok = bare.post("/completion", json={**legacy, "secret": SECRET})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert set(body) == {"steered", "default"}
        assert body["steered"]["raw"] == plain["outputs"][0]["output"] and body["default"]["raw"] == plain["outputs"][1]["output"]
        chat = bare.post("/completion", json={**legacy, "secret": SECRET, "instruct": True, "types": ["default"]}).json()
        assert list(chat) == ["default"] and chat["default"]["chat_template"][-1]["role"] == "assistant"


LONG = "word " * 200
VEC = {"steering_vector": "HALVES", "strength": 1, "hook": "blocks.0.hook_resid_post"}  # filled to d_model in the test
FEAT = BASE["features"]
def fill(body: dict, pack) -> dict:
    d = R.model(str(pack)).cfg.d_model
    if body.get("n_completion_tokens") == "NCTX":
        body["n_completion_tokens"] = R.model(str(pack)).cfg.n_ctx
    sub = {"HALVES": [0.5] * d, "ZEROS": [0.0] * d}
    if body.get("vectors"):
        body["vectors"] = [{**v, "steering_vector": sub.get(v["steering_vector"], v["steering_vector"])}
                           if isinstance(v["steering_vector"], str) else v for v in body["vectors"]]
    return body


BAD = [
    ({"vectors": [VEC]}, 400, "exactly one of features or vectors"),
    ({"features": None}, 400, "exactly one of features or vectors"),
    ({"features": []}, 400, "exactly one of features or vectors"),
    ({"features": [{**FEAT[0], "source": "9-res-nope"}]}, 400, "Invalid SAE ID or type: 9-res-nope"),
    ({"features": [{**FEAT[0], "index": 10**7}]}, 400, "out of range"),
    ({"features": [{**FEAT[0], "index": -1}]}, 400, "out of range"),
    ({"features": [{**FEAT[0], "model": "gpt2"}]}, 400, "Unsupported model"),
    ({"features": None, "vectors": [{**VEC, "steering_vector": [1.0] * 3}]}, 400, "length"),
    ({"features": None, "vectors": [{**VEC, "hook": "blocks.9.nope"}]}, 400, "Unknown hook"),
    ({"features": None, "vectors": [{**VEC, "steering_vector": "ZEROS"}], "normalize_steering": True}, 400, "zero vector"),
    ({"n_logprobs": 11}, 400, "n_logprobs"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"types": []}, 400, "types"),
    ({"types": ["SIDEWAYS"]}, 422, "types"),
    ({"prompt": LONG}, 400, "Text too long: "),
    ({"n_completion_tokens": 100000}, 400, "n_completion_tokens"),
    ({"n_completion_tokens": 0}, 400, "n_completion_tokens"),
    ({"n_completion_tokens": "NCTX"}, 400, "context length"),  # BOS + prompt + n_ctx new tokens
    ({"seed": 1.5}, 400, "seed"),
    ({"model": "gpt2"}, 400, "Unsupported model"),
    ({"steer_method": "MAGIC"}, 422, "steer_method"),
]


@pytest.mark.parametrize("patch,status,message", BAD)
def test_bad_input_is_a_4xx(http, pack_dir, patch, status, message):
    r = http.post("/v1/steer/completion", json=fill({**BASE, **patch}, pack_dir))
    assert r.status_code == status, r.text
    assert message.lower() in r.json()["error"].lower()


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["[0.5, 0.5", '"strength": 1', '"temperature": 0'])
def test_non_finite_numbers_are_a_400(http, pack_dir, bad, where):
    text = json.dumps(fill({**BASE, "features": None, "vectors": [VEC]}, pack_dir))
    assert where in text
    patched = text.replace(where, f"[{bad}, 0.5" if where.startswith("[") else where.rsplit(" ", 1)[0] + f" {bad}", 1)
    r = http.post("/v1/steer/completion", content=patched, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_chat_bad_input(http):
    body = {**BASE, "prompt": [], "steer_special_tokens": True}
    r = http.post("/v1/steer/completion-chat", json=body)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = http.post("/v1/steer/completion-chat", json={**body, "prompt": [{"role": "user", "content": LONG}]})
    assert r.status_code == 400 and "Text too long" in r.json()["error"]
