"""DFA fields over HTTP for an attention-output SAE, aligned with ``values``, against a direct computation."""

from __future__ import annotations

import torch
from neuronpedia_inference_client.models import ActivationAllPostRequest, ActivationSinglePostRequest
from sae_lens import SAE

from tests import reference as R

from .conftest import MODEL_ID

TEXT = "The cat sat on the mat and the dog sat too"


def direct(pack_dir, att_sae_dir):
    m = R.model(str(pack_dir))
    sae = SAE.load_from_disk(str(att_sae_dir))
    sae.fold_W_dec_norm()
    prompt = R.feature_prompt(m, TEXT)
    toks = m.to_tokens(prompt, prepend_bos=False)
    _, cache = m.run_with_cache(toks)
    z, v, pat = cache["blocks.0.attn.hook_z"][0], cache["blocks.0.attn.hook_v"][0], cache["blocks.0.attn.hook_pattern"][0]
    feats = sae.encode(z).detach()
    W = sae.W_enc.detach()
    dh = m.cfg.d_head

    def dfa(feature, dest):
        return torch.tensor([sum(float(pat[h, dest, s] * (v[s, h] @ W[h * dh:(h + 1) * dh, feature])) for h in range(m.cfg.n_heads))
                             for s in range(toks.shape[1])])

    return feats, dfa


def test_dfa_in_activation_all(np_client, pack_dir, att_sae_dir):
    feats, dfa = direct(pack_dir, att_sae_dir)
    r = np_client.activation_all_post(ActivationAllPostRequest(
        prompt=TEXT, model=MODEL_ID, source_set="att-demo", selected_sources=[], sort_by_token_indexes=[], ignore_bos=False,
        num_results=5))
    assert len(r.activations) == 5
    for a in r.activations:
        assert a.source == "0-att-demo"
        assert torch.allclose(torch.tensor(a.values), feats[:, a.index], rtol=1e-5, atol=1e-5)
        assert a.dfa_target_index == a.max_value_index
        want = dfa(a.index, a.max_value_index)
        assert len(a.dfa_values) == len(a.values)
        assert torch.allclose(torch.tensor(a.dfa_values), want, rtol=1e-4, atol=1e-4)
        assert abs(a.dfa_max_value - float(want.max())) < 1e-4


def test_dfa_in_activation_single_is_aligned_with_values(np_client, pack_dir, att_sae_dir):
    feats, dfa = direct(pack_dir, att_sae_dir)
    feature = int(feats[1:].max(dim=0).values.argmax())
    r = np_client.activation_single_post(ActivationSinglePostRequest(prompt=TEXT, model=MODEL_ID, source="0-att-demo", index=str(feature)))
    a = r.activation
    assert len(a.dfa_values) == len(a.values) == len(r.tokens)
    assert a.dfa_target_index == a.max_value_index
    want = dfa(feature, a.max_value_index + 1)[1:]  # values dropped BOS: same coordinates
    assert torch.allclose(torch.tensor(a.dfa_values), want, rtol=1e-4, atol=1e-4)


def test_residual_saes_have_no_dfa(http):
    r = http.post("/v1/activation/single", json={"prompt": TEXT, "model": MODEL_ID, "source": "0-res-demo", "index": "1"}).json()
    assert "dfa_values" not in r["activation"]
