"""Property tests of the compute core on odd prompts: empty, whitespace, long unicode, control characters,
text that already starts with BOS. Tokens, strings and feature activations equal TransformerLens + SAE Lens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.engine import features as F
from deployments.engine import tokens as T
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.errors import RequestError
from deployments.engine.loading import load_model, load_sae
from deployments.specs import resolve_sae_specs
from tests import reference as R

ODD = st.one_of(
    st.just(""),
    st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=12),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), max_size=10),
    st.text(max_size=20).map(lambda s: "<|bos|>" + s),
    st.text(alphabet="日本語 emoji 🐈‍⬛ ÅÄÖ ﬁ", min_size=20, max_size=60),
)


@pytest.fixture(scope="module")
def core(pack_dir):
    runner = ModelRunner(load_model(str(pack_dir)))
    spec = resolve_sae_specs(str(pack_dir), ["res-demo"])[-1]
    return runner, spec, load_sae(spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(text=ODD)
def test_odd_prompts_match_direct(pack_dir, core, text):
    runner, spec, sae = core
    m = R.model(str(pack_dir))
    ids = T.feature_tokens(runner.tokenizer, text)
    prompt = R.feature_prompt(m, text)
    assert ids == m.to_tokens(prompt, prepend_bos=False, truncate=False)[0].tolist()
    assert ids[0] == m.tokenizer.bos_token_id and (len(ids) == 1 or ids[1] != ids[0] or text.startswith("<|bos|><|bos|>"))
    if len(ids) > m.cfg.n_ctx:  # the service refuses these; TransformerLens would silently truncate
        with pytest.raises(RequestError, match="Text too long"):
            T.check_token_limit(len(ids), m.cfg.n_ctx)
        return
    # from the ids: to_str_tokens(str) truncates one token early at exactly n_ctx (BOS added, cut, then removed)
    assert T.str_tokens(runner.tokenizer, ids) == m.to_str_tokens(torch.tensor(ids))
    acts = runner.capture([CaptureRequest(ids, [spec.hook_name])])[0][spec.hook_name]
    feats = F.encode(sae, acts)
    _, _, ref = R.feature_acts(str(pack_dir), text, "res-demo", spec.layer)
    assert torch.allclose(feats, ref, rtol=1e-5, atol=1e-5)
    rows = F.rank_features(feats, 5, [], ignore_bos=True)
    assert all(r.values[0] == 0 for r in rows)
    assert all(0 <= r.max_value_index < len(ids) for r in rows)
