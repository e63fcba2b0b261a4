"""The engine halves of activation/attention and util/similarity-matrix-pred, against TransformerLens + SAE Lens
called directly: the head view's sparse rows computed by brute force from ``hook_pattern``, and the contract's
similarity formula computed in float64 from ``encode_with_predictions``. Also: a temporal SAE encodes one prompt
at a time, and both functions run with their tensors on a second device (tests/engine/offdevice.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deployments.engine import features as F
from deployments.engine.attention import sparse_pattern
from deployments.engine.errors import RequestError
from deployments.engine.loading import load_sae
from deployments.specs import sae_spec_from_dir
from tests import reference as R
from tests.engine.offdevice import OffDevice, is_other, to_other
from tests.packs import write_temporal_sae

TEXTS = ["The cat sat on the mat and then the dog came", "hello", "a b c d e f g h i j k l m n o p"]


@pytest.mark.parametrize("text", TEXTS)
def test_sparse_pattern_equals_the_rule_on_hook_pattern(pack_dir, text):
    m = R.model(str(pack_dir))
    toks = m.to_tokens(R.feature_prompt(m, text), prepend_bos=False)
    with torch.no_grad():
        _, cache = m.run_with_cache(toks)
    for layer in range(m.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
        for head in range(m.cfg.n_heads):
            got = sparse_pattern(pattern[head].numpy())
            idx, vals, mx = R.sparse_attention(pattern[head])
            assert got.seq_len == toks.shape[1]
            assert got.indices == idx and got.values == vals and got.max_activation == mx
            # every row keeps its largest weight: a row sums to 1 over <= 20 keys here, so its max is >= 0.05
            assert {i // got.seq_len for i in got.indices} == set(range(got.seq_len))


def test_sparse_pattern_short_and_odd_inputs():
    assert sparse_pattern(np.ones((1, 1), np.float32)).indices == []  # one token: the pipeline stores nothing
    p = torch.tensor([[1.0, 0.0], [0.996, 0.004]])
    got = sparse_pattern(p)
    assert got.indices == [0, 2] and got.values == [1.0, 0.996]  # 0.004 is under the threshold
    assert got.max_activation == 0.004  # row and column 0 left out
    with pytest.raises(ValueError):
        sparse_pattern(np.ones((2, 3), np.float32))


def test_sparse_pattern_in_half_precision_and_on_another_device(pack_dir):
    m = R.model(str(pack_dir))
    with torch.no_grad():
        _, cache = m.run_with_cache(m.to_tokens(TEXTS[0]))
    pattern = cache["blocks.2.attn.hook_pattern"][0, 1]
    want = sparse_pattern(pattern)
    with OffDevice():
        got = sparse_pattern(to_other(pattern.clone()))
    assert got == want
    half = sparse_pattern(pattern.to(torch.bfloat16))  # what a bfloat16 model's capture holds before .float()
    assert half.seq_len == want.seq_len and abs(half.max_activation - want.max_activation) < 1e-2


# --- temporal SAEs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def temporal(pack_dir, tmp_path_factory):
    """(spec, the SAE as the service loads it, the SAE as SAE Lens loads it)."""
    from sae_lens import SAE

    d_model = R.model(str(pack_dir)).cfg.d_model
    d = write_temporal_sae(tmp_path_factory.mktemp("saes") / "temporal" / "1", d_model, layer=1)
    spec = sae_spec_from_dir("1-temporal", "temporal", d)
    assert spec.architecture == "temporal"
    return spec, load_sae(spec), SAE.load_from_disk(str(d))


def _acts(pack_dir, text: str, hook: str) -> torch.Tensor:
    m = R.model(str(pack_dir))
    toks = m.to_tokens(text, prepend_bos=m.cfg.tokenizer_prepends_bos)
    with torch.no_grad():
        _, cache = m.run_with_cache(toks)
    return cache[hook][0]


@pytest.mark.parametrize("text", TEXTS)
def test_predicted_similarity_equals_the_formula(pack_dir, temporal, text):
    spec, served, lens = temporal
    acts = _acts(pack_dir, text, spec.hook_name)
    got = F.predicted_similarity(served, acts.numpy())
    want = R.predicted_similarity(lens, acts)
    assert got.dtype == np.float32 and got.shape == want.shape == (acts.shape[0] - 1,) * 2
    # float32 against float64: cosines are sums of 256 products of unit-scale terms (error ~ 256 * 2**-24)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
    if got.shape[0] > 1:
        assert np.abs(got - np.eye(got.shape[0])).max() > 0.05  # not a degenerate test SAE


def test_temporal_sae_encodes_one_prompt_at_a_time(pack_dir, temporal):
    spec, served, lens = temporal
    a, b = (_acts(pack_dir, t, spec.hook_name) for t in TEXTS[:2])
    with torch.no_grad():
        want = lens.encode(a.unsqueeze(0))[0]
    torch.testing.assert_close(F.encode(served, a.numpy()), want, rtol=0, atol=0)
    # what stacking prompts would do (the shard encodes a sequence SAE's prompts one by one instead)
    stacked = F.encode(served, torch.cat([b, a]).numpy())[b.shape[0]:]
    assert not torch.allclose(stacked, want)
    assert F.is_sequence_sae(served) and not hasattr(served, "W_enc")
    assert F.encoder_matrix(served).shape == (spec.d_in, spec.d_sae)


def test_predicted_similarity_needs_a_temporal_sae(pack_dir):
    from deployments.specs import resolve_sae_specs

    spec = resolve_sae_specs(str(pack_dir), ["res-demo"])[0]
    with pytest.raises(RequestError, match="temporal"):
        F.predicted_similarity(load_sae(spec), np.zeros((3, spec.d_in), np.float32))


def test_predicted_similarity_short_prompt(temporal):
    _, served, _ = temporal
    assert F.predicted_similarity(served, np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)).shape == (0, 0)


def test_predicted_similarity_on_another_device(pack_dir, temporal):
    spec, served, _ = temporal
    acts = _acts(pack_dir, TEXTS[0], spec.hook_name).numpy()
    want = F.predicted_similarity(served, acts)
    with OffDevice() as dev:
        other = load_sae(spec, str(dev))
        assert is_other(other.W_dec)
        got = F.predicted_similarity(other, acts)  # host activations in, as the shard receives them
        feats = F.encode(other, acts)
        assert is_other(feats)
    assert isinstance(got, np.ndarray) and math.isclose(float(np.abs(got - want).max()), 0.0, abs_tol=1e-5)
