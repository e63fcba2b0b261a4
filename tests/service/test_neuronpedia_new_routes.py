"""activation/attention and util/similarity-matrix-pred, the web app's two routes the 1.10.1 API lacks, in both
dialects: /neuronpedia/v1 with the web app's bodies (camelCase; the similarity reply stays snake_case, as the web
app reads it) and /v1 in snake_case; against TransformerLens's ``hook_pattern`` and SAE Lens's
``encode_with_predictions``. Also: the temporal SAE they need serves the other feature routes correctly (it
encodes a prompt at a time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import reference as R

from .conftest import MODEL_ID
from .np2026 import validate_reply, validate_request

TEXTS = ["When Mary and John went to the store, John gave a drink to Mary.", "hello", ""]
TEMPORAL = "1-temporal-demo"


def attention(client, dialect: str, text: str, layer: int, head: int, status: int = 200, model: str = MODEL_ID):
    path = "/v1/activation/attention"
    body = {"model": model, "prompt": text, "layer": layer, "head": head}  # getAttentionForHead; same keys in both
    if dialect == "neuronpedia":
        validate_request(path, body)
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    if dialect == "neuronpedia":
        validate_reply(path, status, r.json())
    return r.json()


@pytest.mark.parametrize("text", TEXTS)
def test_attention_equals_hook_pattern(np_web, http, pack_dir, text):
    m = R.model(str(pack_dir))
    for layer in range(m.cfg.n_layers):
        for head in range(m.cfg.n_heads):
            strs, (idx, vals, mx) = R.attention(str(pack_dir), text, layer, head)
            got = attention(np_web, "neuronpedia", text, layer, head)
            assert got["tokens"] == strs and got["seqLen"] == len(strs)
            # batched capture vs TransformerLens alone: the same weights up to float32 drift, so compare values with a
            # tolerance, and the kept entries exactly unless a weight sits within drift of the 0.005 threshold
            assert got["attentionIndices"] == idx, (layer, head)
            assert np.allclose(got["attentionValues"], vals, atol=1e-4, rtol=0)
            assert abs(got["maxActivation"] - mx) <= 1e-4
            if layer == head == 1:
                v1 = attention(http, "v1", text, layer, head)
                assert v1 == {"tokens": got["tokens"], "attention_indices": got["attentionIndices"],
                              "attention_values": got["attentionValues"], "max_activation": got["maxActivation"],
                              "seq_len": got["seqLen"]}


def test_attention_bad_input(np_web, http, pack_dir):
    m = R.model(str(pack_dir))
    for client, dialect in ((np_web, "neuronpedia"), (http, "v1")):
        for layer, head, needle in ((m.cfg.n_layers, 0, "Invalid layer"), (-1, 0, "Invalid layer"),
                                    (0, m.cfg.n_heads, "Invalid head"), (0, -1, "Invalid head")):
            assert needle in attention(client, dialect, "hi", layer, head, 400)["error"]
        assert attention(client, dialect, "cat " * 70, 0, 0, 400)["error"].startswith("Text too long")
    strs, _ = R.attention(str(pack_dir), "hi", 0, 0)
    assert attention(np_web, "neuronpedia", "hi", 0, 0, model="gpt2-small")["tokens"] == strs  # model: advisory there
    assert attention(http, "v1", "hi", 0, 0, 400, model="gpt2-small") == {"error": "Unsupported model"}
    r = http.post("/v1/activation/attention", json={"model": MODEL_ID, "prompt": "hi", "layer": "0", "head": 0})
    assert r.status_code == 422


def similarity(client, dialect: str, text: str, source: str = TEMPORAL, status: int = 200):
    path = "/v1/util/similarity-matrix-pred"
    if dialect == "neuronpedia":
        body = {"modelId": MODEL_ID, "sourceId": source, "index": 0, "text": text}  # the web app's route handler
        validate_request(path, body)
    else:
        body = {"model_id": MODEL_ID, "source_id": source, "index": 0, "text": text}
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    out = r.json()
    if dialect == "neuronpedia" and status == 200:
        # The web app reads snake_case `similarity_matrix` (its server sends that, though its spec says camelCase):
        # check the reply is exactly that, then validate it under the spec's name.
        assert set(out) == {"similarity_matrix", "tokens"}
        validate_reply(path, 200, {"similarityMatrix": out["similarity_matrix"], "tokens": out["tokens"]})
    elif dialect == "neuronpedia":
        validate_reply(path, status, out)
    return out


@pytest.mark.parametrize("text", TEXTS[:2] + ["a b c d e f g h i j k l m n o p q r s"])
def test_similarity_matrix_equals_the_formula(np_web, http, pack_dir, temporal_sae_dir, text):
    strs, want = R.similarity(str(pack_dir), str(temporal_sae_dir), text)
    got = similarity(np_web, "neuronpedia", text)
    assert got["tokens"] == strs
    matrix = np.array(got["similarity_matrix"], dtype=np.float64).reshape(want.shape)
    # float32 on the service (batched capture, float32 products over 256 codes) against float64 here
    np.testing.assert_allclose(matrix, want, rtol=0, atol=1e-4)
    v1 = similarity(http, "v1", text)
    assert v1["tokens"] == got["tokens"]
    np.testing.assert_allclose(np.array(v1["similarity_matrix"]).reshape(want.shape), matrix, rtol=0, atol=1e-5)


def test_similarity_matrix_needs_a_temporal_sae(np_web, http):
    for client, dialect in ((np_web, "neuronpedia"), (http, "v1")):
        err = similarity(client, dialect, "hello there", "0-res-demo", 400)["error"]
        assert "0-res-demo is a standard SAE" in err and "temporal" in err
        assert similarity(client, dialect, "hello", "9-nope", 400) == {"error": "Invalid SAE ID or type: 9-nope"}
        assert similarity(client, dialect, "cat " * 70, TEMPORAL, 400)["error"].startswith("Text too long")


# --- the temporal SAE on the other feature routes ----------------------------------------------------------------


def test_temporal_sae_features_are_encoded_a_prompt_at_a_time(http, pack_dir, temporal_sae_dir):
    """Several prompts of one request land in one SAEShard call: a temporal SAE (attention over its context) must
    encode each alone, as SAE Lens does for one sequence."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(temporal_sae_dir))
    prompts = ["The cat sat on the mat.", "Dogs bark at night", "hello world"]
    got = http.post("/v1/activation/single-batch", json={"prompts": prompts, "model": MODEL_ID, "source": TEMPORAL,
                                                          "index": "5"})
    assert got.status_code == 200, got.text
    feats_by_prompt = []
    for p, res in zip(prompts, got.json()["results"]):
        ids, acts = R.hook_acts(str(pack_dir), R.feature_prompt(R.model(str(pack_dir)), p), sae.cfg.metadata.hook_name,
                                prepend_bos=False)
        with torch.no_grad():
            feats = sae.encode(acts.unsqueeze(0))[0]
        feats_by_prompt.append(feats)
        assert np.allclose(res["activation"]["values"], feats[1:, 5].numpy(), rtol=1e-4, atol=1e-5)
    top = http.post("/v1/activation/topk-by-token", json={"prompt": prompts[0], "model": MODEL_ID, "source": TEMPORAL,
                                                           "top_k": 3, "ignore_bos": False}).json()
    for r in top["results"]:
        want = torch.sort(feats_by_prompt[0][r["token_position"]], descending=True).values[:3]
        assert np.allclose([f["activation_value"] for f in r["top_features"]], want.numpy(), rtol=1e-4, atol=1e-5)
    vec = http.post("/v1/util/sae-vector", json={"model": MODEL_ID, "source": TEMPORAL, "index": 3}).json()
    assert np.allclose(vec["vector"], sae.W_dec[3].detach().numpy(), atol=1e-6)  # tied: the encoder is W_dec.T
