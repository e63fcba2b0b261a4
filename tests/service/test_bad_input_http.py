"""Bad input gets a 4xx with an actionable {"error"}, never a 5xx, and the service keeps answering."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MODEL_ID, SECRET

OK_ALL = {"prompt": "hello", "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [],
          "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 3}
OK_SINGLE = {"prompt": "hello", "model": MODEL_ID, "source": "0-res-demo", "index": "1"}
OK_TOPK = {"prompt": "hello", "model": MODEL_ID, "source": "0-res-demo", "ignore_bos": False}
LONG = "word " * 200  # over the test app's token_limit of 64

CASES = [
    # (route, body, status, substring of the error)
    ("/v1/activation/single", {**OK_SINGLE, "source": "99-res-demo"}, 400, "Invalid SAE ID or type: 99-res-demo"),
    ("/v1/activation/single", {**OK_SINGLE, "index": "100000000"}, 400, "out of range"),
    ("/v1/activation/single", {**OK_SINGLE, "index": "-1"}, 400, "out of range"),
    ("/v1/activation/single", {**OK_SINGLE, "index": "seven"}, 400, "integer"),
    ("/v1/activation/single", {"prompt": "hello", "model": MODEL_ID}, 400, "exactly one"),
    ("/v1/activation/single", {**OK_SINGLE, "vector": [1.0], "hook": "blocks.0.hook_resid_post"}, 400, "exactly one"),
    ("/v1/activation/single", {"prompt": "hi", "model": MODEL_ID, "vector": [1.0, 2.0], "hook": "blocks.0.hook_resid_post"}, 400, "length"),
    ("/v1/activation/single", {"prompt": "hi", "model": MODEL_ID, "vector": [1.0], "hook": "blocks.0.nope"}, 400, "Unknown hook"),
    ("/v1/activation/single", {**OK_SINGLE, "prompt": LONG}, 400, "Text too long: "),
    ("/v1/activation/single", {**OK_SINGLE, "model": "gpt2-small"}, 400, "Unsupported model"),
    ("/v1/activation/single", {**OK_SINGLE, "index": 1}, 422, "index"),  # the client's index is a string
    ("/v1/activation/all", {**OK_ALL, "source_set": "res-nope"}, 400, "Invalid source set"),
    ("/v1/activation/all", {**OK_ALL, "selected_sources": ["0-res-nope"]}, 400, "Invalid SAE ID or type: 0-res-nope"),
    ("/v1/activation/all", {**OK_ALL, "sort_by_token_indexes": [50]}, 400, "sort_by_token_indexes"),
    ("/v1/activation/all", {**OK_ALL, "sort_by_token_indexes": [-1]}, 400, "sort_by_token_indexes"),
    ("/v1/activation/all", {**OK_ALL, "num_results": 0}, 400, "num_results"),
    ("/v1/activation/all", {**OK_ALL, "feature_filter": [1]}, 400, "exactly one selected source"),
    ("/v1/activation/all", {**OK_ALL, "selected_sources": ["0-res-demo"], "feature_filter": [10**9]}, 400, "out of range"),
    ("/v1/activation/all", {**OK_ALL, "prompt": LONG}, 400, "Text too long"),
    ("/v1/activation/all", {**OK_ALL, "model": "other"}, 400, "Unsupported model"),
    ("/v1/activation/all", {k: v for k, v in OK_ALL.items() if k != "source_set"}, 422, "source_set"),
    ("/v1/activation/all-batch", {**{k: v for k, v in OK_ALL.items() if k != "prompt"}, "prompts": []}, 400, "empty"),
    ("/v1/activation/all-batch", {**{k: v for k, v in OK_ALL.items() if k != "prompt"}, "prompts": ["a"] * 5}, 400, "Too many prompts"),
    ("/v1/activation/single-batch", {**{k: v for k, v in OK_SINGLE.items() if k != "prompt"}, "prompts": []}, 400, "empty"),
    ("/v1/activation/topk-by-token", {**OK_TOPK, "source": "x"}, 400, "Invalid SAE ID or type: x"),
    ("/v1/activation/topk-by-token", {**OK_TOPK, "top_k": 0}, 400, "top_k"),
    ("/v1/activation/topk-by-token-batch", {**{k: v for k, v in OK_TOPK.items() if k != "prompt"}, "prompts": []}, 400, "empty"),
    ("/v1/activation/source", {"prompts": [], "model": MODEL_ID, "source": "0-res-demo"}, 400, "empty"),
    ("/v1/activation/source", {"prompts": [LONG], "model": MODEL_ID, "source": "0-res-demo"}, 400, "Text too long"),
    ("/v1/tokenize", {"model": "nope", "text": "x"}, 400, "Unsupported model"),
]


@pytest.mark.parametrize("route,body,status,needle", CASES, ids=[f"{c[0]}:{c[3][:20]}" for c in CASES])
def test_bad_input_is_4xx_with_message(http, route, body, status, needle):
    r = http.post(route, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    # ...and the service answers normally afterwards
    assert http.post("/v1/activation/all", json=OK_ALL).status_code == 200


def test_token_limit_message_is_exact(http, pack_dir):
    from tests import reference as R

    r = http.post("/v1/activation/all", json={**OK_ALL, "prompt": LONG})
    m = R.model(str(pack_dir))
    n = len(m.to_tokens(R.feature_prompt(m, LONG), prepend_bos=False, truncate=False)[0])
    assert r.json() == {"error": f"Text too long: {n} tokens, max is 64"}
    # tokenize has the same limit (its answer is as large as its input)
    t = http.post("/v1/tokenize", json={"model": MODEL_ID, "text": LONG, "prepend_bos": True})
    assert t.status_code == 400 and t.json()["error"].startswith("Text too long: ")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_vector_is_400(http, literal):
    body = '{"prompt": "hi", "model": "%s", "hook": "blocks.0.hook_resid_post", "vector": [%s]}' % (MODEL_ID, literal)
    r = http.post("/v1/activation/single", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "NaN or infinite" in r.json()["error"]


def test_malformed_json_is_422(http):
    r = http.post("/v1/activation/all", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


@pytest.mark.parametrize("headers", [{}, {"X-SECRET-KEY": "wrong"}, {"X-SECRET-KEY": ""}])
def test_auth_required(serve_app, headers):
    for route, body in (("/v1/activation/all", OK_ALL), ("/v1/tokenize", {"model": MODEL_ID, "text": "x"})):
        r = httpx.post(serve_app + route, json=body, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.json() == {"error": "Invalid or missing X-SECRET-KEY header"}


def test_auth_runs_before_body_parsing(serve_app):
    r = httpx.post(serve_app + "/v1/activation/all", content=b"garbage", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 401


def test_public_routes_need_no_secret(serve_app):
    assert httpx.get(serve_app + "/health", timeout=30).status_code == 200
    spec = httpx.get(serve_app + "/openapi.json", timeout=30)
    assert spec.status_code == 200
    assert SECRET not in spec.text
    assert httpx.get(serve_app + "/docs", timeout=30).status_code == 200


def test_client_with_wrong_secret_gets_401(serve_app):
    from neuronpedia_inference_client import ApiClient, Configuration, DefaultApi
    from neuronpedia_inference_client.exceptions import ApiException
    from neuronpedia_inference_client.models import TokenizePostRequest

    cfg = Configuration(host=f"{serve_app}/v1", api_key={"SimpleSecretAuth": SECRET + "x"})
    with ApiClient(cfg) as api:
        with pytest.raises(ApiException) as e:
            DefaultApi(api).tokenize_post(TokenizePostRequest(model=MODEL_ID, text="x"))
    assert e.value.status == 401


def test_oversized_body_is_413(http):
    r = http.post("/v1/activation/all", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert http.post("/v1/activation/all", json=OK_ALL).status_code == 200
