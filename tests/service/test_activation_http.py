"""Every activation endpoint over real HTTP, driven by the published neuronpedia-inference-client 1.10.1,
checked against TransformerLens + SAE Lens called directly on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from neuronpedia_inference_client.models import (
    ActivationAllBatchPostRequest,
    ActivationAllPostRequest,
    ActivationSingleBatchPostRequest,
    ActivationSinglePostRequest,
    ActivationSourcePostRequest,
    ActivationTopkByTokenBatchPostRequest,
    ActivationTopkByTokenPostRequest,
    TokenizePostRequest,
)

from tests.compare import assert_same_answer, is_first_argmax_up_to_drift
from tests import reference as R

from .conftest import MODEL_ID

RTOL = 1e-5
TEXT = "The cat sat on the mat."


def close(a, b, rtol=RTOL, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def n_layers(pack_dir):
    return R.model(str(pack_dir)).cfg.n_layers


def test_health_and_docs(http):
    assert http.get("/health").json() == {"status": "healthy"}
    spec = http.get("/openapi.json").json()
    for route in ("/v1/activation/all", "/v1/activation/single", "/v1/activation/topk-by-token", "/v1/activation/source",
                  "/v1/activation/all-batch", "/v1/activation/single-batch", "/v1/activation/topk-by-token-batch", "/v1/tokenize"):
        assert route in spec["paths"]
    assert http.get("/docs").status_code == 200


def test_tokenize(np_client, pack_dir):
    m = R.model(str(pack_dir))
    for prepend in (None, True, False):
        r = np_client.tokenize_post(TokenizePostRequest(model=MODEL_ID, text="hello world", prepend_bos=prepend))
        want = m.to_tokens("hello world", prepend_bos=True if prepend is None else prepend)[0].tolist()
        assert r.tokens == want
        assert r.token_strings == [m.tokenizer.decode([t]) for t in want]
        assert r.prepend_bos == (prepend is not False)


def test_activation_single_sae_path(np_client, pack_dir, n_layers):
    layer = n_layers - 1
    _, strs, feats = R.feature_acts(str(pack_dir), TEXT, "res-demo", layer)
    idx = int(feats[1:].max(dim=0).values.argmax())
    r = np_client.activation_single_post(
        ActivationSinglePostRequest(prompt=TEXT, model=MODEL_ID, source=f"{layer}-res-demo", index=str(idx))
    )
    want = feats[1:, idx]
    assert close(r.activation.values, want)
    assert math.isclose(r.activation.max_value, float(want.max()), rel_tol=RTOL)
    assert is_first_argmax_up_to_drift(want.tolist(), r.activation.max_value_index)  # batched: a near tie may move it
    assert r.tokens == strs[1:]
    assert r.tokens_is_special == [False] * (len(strs) - 1)


def test_activation_single_vector_path(np_client, pack_dir):
    m = R.model(str(pack_dir))
    hook = "blocks.0.hook_resid_post"
    vec = torch.linspace(-0.5, 0.5, m.cfg.d_model)
    ids, acts = R.hook_acts(str(pack_dir), TEXT, hook)
    r = np_client.activation_single_post(
        ActivationSinglePostRequest(prompt=TEXT, model=MODEL_ID, vector=vec.tolist(), hook=hook)
    )
    assert close(r.activation.values, acts @ vec, rtol=1e-4, atol=1e-4)
    assert r.tokens == m.to_str_tokens(TEXT)
    assert r.tokens_is_special[0] is True


def test_single_batch_equals_singular(np_client):
    prompts = [TEXT, "red blue", "one two three"]
    batch = np_client.activation_single_batch_post(
        ActivationSingleBatchPostRequest(prompts=prompts, model=MODEL_ID, source="0-res-demo", index="3")
    )
    for p, res in zip(prompts, batch.results):
        one = np_client.activation_single_post(
            ActivationSinglePostRequest(prompt=p, model=MODEL_ID, source="0-res-demo", index="3")
        )
        assert res.tokens == one.tokens
        assert close(res.activation.values, one.activation.values)


@pytest.mark.parametrize("sort_idx", [[], [2, 3]])
@pytest.mark.parametrize("ignore_bos", [True, False])
def test_activation_all(np_client, pack_dir, n_layers, sort_idx, ignore_bos):
    r = np_client.activation_all_post(ActivationAllPostRequest(
        prompt=TEXT, model=MODEL_ID, source_set="res-demo", selected_sources=[], sort_by_token_indexes=sort_idx,
        ignore_bos=ignore_bos, num_results=20,
    ))
    feats = [R.feature_acts(str(pack_dir), TEXT, "res-demo", layer)[2] for layer in range(n_layers)]
    want = R.ranked(feats, 20, sort_idx, ignore_bos)
    assert r.tokens == R.feature_acts(str(pack_dir), TEXT, "res-demo", 0)[1]
    assert len(r.activations) == 20
    for got, (src, feat, mx, at, sm, vals) in zip(r.activations, want):
        assert math.isclose(got.max_value, mx, rel_tol=RTOL, abs_tol=1e-5)
        assert math.isclose(got.sum_values, sm, rel_tol=RTOL, abs_tol=1e-4)
        # the identity and values of each reported feature are exact against its own column
        layer = int(got.source.split("-")[0])
        col = feats[layer][:, got.index].clone()
        if ignore_bos:
            col[0] = 0
        assert close(got.values, col)
        assert got.source == f"{layer}-res-demo"
        assert math.isclose(got.max_value, float(col.max()), rel_tol=RTOL, abs_tol=1e-5)


def test_activation_all_selected_sources_and_filter(np_client, http, pack_dir):
    r = np_client.activation_all_post(ActivationAllPostRequest(
        prompt=TEXT, model=MODEL_ID, source_set="res-demo", selected_sources=["1-res-demo"], sort_by_token_indexes=[],
        ignore_bos=True, num_results=5,
    ))
    assert {a.source for a in r.activations} == {"1-res-demo"}
    # feature_filter is our extension (not in the client's model): plain HTTP
    feats = R.feature_acts(str(pack_dir), TEXT, "res-demo", 1)[2]
    data = http.post("/v1/activation/all", json={
        "prompt": TEXT, "model": MODEL_ID, "source_set": "res-demo", "selected_sources": ["1-res-demo"],
        "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 5, "feature_filter": [0, 7, 9],
    }).json()
    assert sorted(a["index"] for a in data["activations"]) == [0, 7, 9]
    for a in data["activations"]:
        col = feats[:, a["index"]].clone()
        col[0] = 0
        assert close(a["values"], col)


def test_all_batch_equals_singular(np_client):
    prompts = [TEXT, "red blue green"]
    kw = dict(model=MODEL_ID, source_set="res-demo", selected_sources=[], sort_by_token_indexes=[], ignore_bos=True, num_results=8)
    batch = np_client.activation_all_batch_post(ActivationAllBatchPostRequest(prompts=prompts, **kw))
    for p, res in zip(prompts, batch.results):
        one = np_client.activation_all_post(ActivationAllPostRequest(prompt=p, **kw))
        # the batch and the single request ran in different model batches: the same answer up to float32 drift
        assert_same_answer(res.to_dict(), one.to_dict())


def test_capture_stats_count_every_prompt_of_concurrent_requests(np_client):
    """Concurrent requests share forward passes; ModelDeployment.capture_stats() accounts for each prompt and token."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    model = serve.get_deployment_handle("ModelDeployment", app_name="saeserve")
    prompts = [f"{TEXT} {'and the dog ' * i}" for i in range(8)]
    kw = dict(model=MODEL_ID, source_set="res-demo", selected_sources=[], sort_by_token_indexes=[], ignore_bos=True, num_results=3)
    before = model.capture_stats.remote().result()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda p: np_client.activation_all_post(ActivationAllPostRequest(prompt=p, **kw)), prompts))
    after = model.capture_stats.remote().result()
    assert after["prompts"] - before["prompts"] == 8
    assert after["tokens"] - before["tokens"] == sum(len(r.tokens) for r in results)
    assert 1 <= after["batches"] - before["batches"] <= 8
    assert after["forward_s"] > before["forward_s"]
    assert after["compute"]["tasks"] - before["compute"]["tasks"] >= after["batches"] - before["batches"]
    # residual-stream hooks: through engine.decoder's forward pass (engine.capture; tests/engine/test_lean_capture.py
    # checks which hooks take which path), not through TransformerLens's hooks
    assert after["lean_passes"] > before["lean_passes"]


def test_a_lone_cheap_request_does_not_burst(np_client):
    """A lone request's work bursts onto idle cores only when its kind of task is heavy enough for that to pay
    (engine.compute; tests/engine/test_compute.py shows both sides): the demo pack's millisecond forward pass and
    encodes run narrow, where a burst measured slower."""
    from ray import serve

    model = serve.get_deployment_handle("ModelDeployment", app_name="saeserve")
    kw = dict(model=MODEL_ID, source_set="res-demo", selected_sources=[], sort_by_token_indexes=[], ignore_bos=True, num_results=3)
    before = model.capture_stats.remote().result()["compute"]
    for _ in range(3):
        np_client.activation_all_post(ActivationAllPostRequest(prompt=TEXT, **kw))
    after = model.capture_stats.remote().result()["compute"]
    assert after["tasks"] > before["tasks"] and after["burst_tasks"] == before["burst_tasks"]


@pytest.mark.parametrize("ignore_bos", [True, False])
def test_topk_by_token(np_client, pack_dir, ignore_bos):
    ids, strs, feats = R.feature_acts(str(pack_dir), TEXT, "res-demo", 0)
    r = np_client.activation_topk_by_token_post(ActivationTopkByTokenPostRequest(
        prompt=TEXT, model=MODEL_ID, source="0-res-demo", top_k=4, ignore_bos=ignore_bos))
    start = 1 if ignore_bos else 0
    assert r.tokens == strs[start:]
    assert [x.token_position for x in r.results] == list(range(start, len(ids)))
    for res in r.results:
        p = res.token_position
        want = torch.sort(feats[p], descending=True).values[:4]
        assert close([f.activation_value for f in res.top_features], want)
        assert close([float(feats[p, f.feature_index]) for f in res.top_features], want)
        assert res.token == strs[p]
        assert res.is_special == (p == 0)
    batch = np_client.activation_topk_by_token_batch_post(ActivationTopkByTokenBatchPostRequest(
        prompts=[TEXT], model=MODEL_ID, source="0-res-demo", top_k=4, ignore_bos=ignore_bos))
    assert batch.results[0].tokens == r.tokens
    assert [x.token_position for x in batch.results[0].results] == [x.token_position for x in r.results]


def test_activation_source(np_client, pack_dir):
    prompts = [TEXT, "red blue"]
    r = np_client.activation_source_post(ActivationSourcePostRequest(prompts=prompts, model=MODEL_ID, source="1-res-demo"))
    for p, res in zip(prompts, r.results):
        _, strs, feats = R.feature_acts(str(pack_dir), p, "res-demo", 1)
        assert res.tokens == strs
        nz = torch.nonzero(feats[1:])
        assert sum(len(v) for v in res.active_features.values()) == nz.shape[0]
        for f, entries in res.active_features.items():
            for pos, val in entries:
                assert pos >= 1
                assert math.isclose(val, float(feats[int(pos), int(f)]), rel_tol=RTOL, abs_tol=1e-5)
