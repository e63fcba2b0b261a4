"""Decoder geometry, capabilities and the legacy routes, against SAE Lens math on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from neuronpedia_inference_client.models import (
    ActivationSinglePostRequest,
    NPFeature,
    UtilSaeTopkByDecoderCossimPostRequest,
    UtilSaeVectorPostRequest,
)

from tests.compare import assert_same_answer, assert_same_ranking, is_first_argmax_up_to_drift
from tests import reference as R

from .conftest import MODEL_ID, SECRET


def ref_cossim(pack, layer_q, index, layer_t, k):
    q = R.sae(str(pack), "res-demo", layer_q).W_dec[index].detach()
    w = R.sae(str(pack), "res-demo", layer_t).W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(w, q[None, :], dim=1)
    order = torch.sort(cos, descending=True, stable=True).indices[:k]
    return order.tolist(), cos[order].tolist()


def test_decoder_cossim_feature_query(np_client, pack_dir):
    r = np_client.util_sae_topk_by_decoder_cossim_post(UtilSaeTopkByDecoderCossimPostRequest(
        feature=NPFeature(model=MODEL_ID, source="0-res-demo", index=5), model=MODEL_ID, source="1-res-demo", num_results=10))
    idx, cos = ref_cossim(pack_dir, 0, 5, 1, 10)
    # the reference normalises in another order: equal up to float32 rounding, so near ties may swap
    assert_same_ranking([(f.feature.index, f.cosine_similarity) for f in r.topk_decoder_cossim_features], list(zip(idx, cos)))
    assert all(f.feature.source == "1-res-demo" and f.feature.model == MODEL_ID for f in r.topk_decoder_cossim_features)
    assert r.feature.index == 5


def test_decoder_cossim_self_is_first_and_clamped(np_client, pack_dir):
    d_sae = R.sae(str(pack_dir), "res-demo", 0).cfg.d_sae
    r = np_client.util_sae_topk_by_decoder_cossim_post(UtilSaeTopkByDecoderCossimPostRequest(
        feature=NPFeature(model=MODEL_ID, source="0-res-demo", index=7), model=MODEL_ID, source="0-res-demo", num_results=10_000))
    assert len(r.topk_decoder_cossim_features) == min(128, d_sae)
    first = r.topk_decoder_cossim_features[0]
    assert first.feature.index == 7 and math.isclose(first.cosine_similarity, 1.0, rel_tol=1e-5)


def test_decoder_cossim_vector_query(np_client, pack_dir):
    d = R.model(str(pack_dir)).cfg.d_model
    vec = torch.linspace(-1, 1, d)
    r = np_client.util_sae_topk_by_decoder_cossim_post(UtilSaeTopkByDecoderCossimPostRequest(
        vector=vec.tolist(), model=MODEL_ID, source="1-res-demo", num_results=5))
    w = R.sae(str(pack_dir), "res-demo", 1).W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(w, vec[None, :], dim=1)
    want = torch.sort(cos, descending=True, stable=True)
    assert_same_ranking([(f.feature.index, f.cosine_similarity) for f in r.topk_decoder_cossim_features],
                        list(zip(want.indices[:5].tolist(), want.values[:5].tolist())))
    assert r.feature is None


def test_sae_vector_reproduces_pre_activation(np_client, pack_dir):
    r = np_client.util_sae_vector_post(UtilSaeVectorPostRequest(model=MODEL_ID, source="1-res-demo", index=3))
    s = R.sae(str(pack_dir), "res-demo", 1)
    assert r.hook_name == "blocks.1.hook_resid_post"
    assert torch.allclose(torch.tensor(r.vector), s.W_enc[:, 3].detach(), rtol=1e-6, atol=1e-7)
    # activation/single with that vector = the feature's encoder projection (pre-activation minus biases)
    text = "The cat sat"
    single = np_client.activation_single_post(ActivationSinglePostRequest(prompt=text, model=MODEL_ID, vector=r.vector, hook=r.hook_name))
    _, acts = R.hook_acts(str(pack_dir), text, r.hook_name)
    assert torch.allclose(torch.tensor(single.activation.values), acts @ s.W_enc[:, 3].detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("body,needle", [
    ({"model": MODEL_ID, "source": "1-res-demo", "num_results": 5}, "exactly one"),
    ({"model": MODEL_ID, "source": "9-res-demo", "num_results": 5, "vector": [1.0]}, "Invalid SAE ID"),
    ({"model": MODEL_ID, "source": "1-res-demo", "num_results": 5, "vector": [1.0]}, "length"),
    ({"model": MODEL_ID, "source": "1-res-demo", "num_results": 5, "feature": {"model": MODEL_ID, "source": "0-res-demo", "index": -1}}, "out of range"),
    ({"model": MODEL_ID, "source": "1-res-demo", "num_results": -1, "feature": {"model": MODEL_ID, "source": "0-res-demo", "index": 1}}, "num_results"),
])
def test_cossim_bad_input(http, body, needle):
    r = http.post("/v1/util/sae-topk-by-decoder-cossim", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]


def test_cossim_zero_vector_is_400(http, pack_dir):
    d = R.model(str(pack_dir)).cfg.d_model
    r = http.post("/v1/util/sae-topk-by-decoder-cossim", json={"model": MODEL_ID, "source": "1-res-demo", "num_results": 3, "vector": [0.0] * d})
    assert r.status_code == 400 and "non-zero" in r.json()["error"]


def test_sae_vector_bad_index(http):
    r = http.post("/v1/util/sae-vector", json={"model": MODEL_ID, "source": "1-res-demo", "index": 10**7})
    assert r.status_code == 400 and "out of range" in r.json()["error"]


def test_capabilities(http, pack_dir):
    r = http.get("/v1/capabilities")
    assert r.status_code == 200, r.text
    c = r.json()
    m = R.model(str(pack_dir))
    assert c["model"] == MODEL_ID and c["n_layers"] == m.cfg.n_layers and c["d_model"] == m.cfg.d_model
    assert c["sae_sets"] == {"res-demo": [f"{i}-res-demo" for i in range(m.cfg.n_layers)], "att-demo": ["0-att-demo"],
                             "temporal-demo": ["1-temporal-demo"]}
    assert {s["hook_name"] for s in c["saes"]} == {f"blocks.{i}.hook_resid_post" for i in range(m.cfg.n_layers)} | {"blocks.0.attn.hook_z"}
    assert "/v1/activation/all" in c["routes"] and "/activations-all" in c["routes"]
    assert c["limits"]["token_limit"] == 64
    assert SECRET not in str(c)


# --- legacy routes ---------------------------------------------------------------------------------------

def test_legacy_activations_test(serve_app, pack_dir):
    import httpx

    text = "The cat sat"
    r = httpx.post(serve_app + "/activations-test", json={"text": text, "model": MODEL_ID, "layer": "1-res-demo", "index": "4", "secret": SECRET})
    assert r.status_code == 200, r.text
    body = r.json()
    _, strs, feats = R.feature_acts(str(pack_dir), text, "res-demo", 1)
    want = feats[:, 4].clone()
    want[0] = 0
    assert body["tokens"] == strs  # BOS kept
    a = body["activations"]
    assert a["layer"] == "1-res-demo" and a["index"] == 4
    assert torch.allclose(torch.tensor(a["values"]), want, rtol=1e-5, atol=1e-5)
    assert is_first_argmax_up_to_drift(want.tolist(), a["maxValueIndex"])  # batched: a near tie may move it
    assert math.isclose(a["maxValue"], float(want.max()), rel_tol=1e-5, abs_tol=1e-6)


def test_legacy_activations_all(serve_app, http, pack_dir):
    import httpx

    body = {"text": "The cat sat", "model": MODEL_ID, "source_set": "res-demo", "selected_layers": [], "secret": SECRET}
    r = httpx.post(serve_app + "/activations-all", json=body).json()
    v1 = http.post("/v1/activation/all", json={"prompt": "The cat sat", "model": MODEL_ID, "source_set": "res-demo",
                                               "selected_sources": [], "sort_by_token_indexes": [], "ignore_bos": True}).json()
    # two requests, maybe in different model batches: the same answer up to float32 drift (tests/compare.py)
    as_v1 = {"layer": "source", "index": "index", "maxValue": "max_value", "maxValueIndex": "max_value_index", "values": "values"}
    assert_same_answer([{as_v1[k]: v for k, v in a.items() if k in as_v1} for a in r["activations"]],
                       [{k: v for k, v in a.items() if k in as_v1.values()} for a in v1["activations"]])
    assert set(r["activations"][0]) == {"index", "layer", "maxValue", "maxValueIndex", "sumValues", "values"}
    filtered = httpx.post(serve_app + "/activations-all", json={**body, "selected_layers": ["0-res-demo"], "feature_filter": [1, 2, 3]}).json()
    assert sorted(a["index"] for a in filtered["activations"]) == [1, 2, 3]


def test_legacy_cossim(serve_app, pack_dir):
    import httpx

    r = httpx.post(serve_app + "/top-k-by-decoder-cosine-similarity",
                   json={"sae_id": "0-res-demo", "feature_id": 5, "model": MODEL_ID, "k": 5, "secret": SECRET}).json()
    idx, cos = ref_cossim(pack_dir, 0, 5, 0, 5)
    assert r["feature_id"] == 5
    assert [f["index"] for f in r["top_k_features"]] == idx
    assert all(math.isclose(f["cosine_similarity"], c, rel_tol=1e-5) for f, c in zip(r["top_k_features"], cos))


@pytest.mark.parametrize("route,body", [
    ("/activations-test", {"text": "x", "model": MODEL_ID, "layer": "1-res-demo", "index": "4"}),
    ("/activations-all", {"text": "x", "model": MODEL_ID, "source_set": "res-demo", "selected_layers": []}),
    ("/top-k-by-decoder-cosine-similarity", {"sae_id": "0-res-demo", "feature_id": 5, "model": MODEL_ID, "k": 5}),
])
@pytest.mark.parametrize("secret", [None, "wrong"])
def test_legacy_body_secret_required(serve_app, route, body, secret):
    import httpx

    if secret is not None:
        body = {**body, "secret": secret}
    r = httpx.post(serve_app + route, json=body)
    assert r.status_code == 401 and "secret" in r.json()["error"]
