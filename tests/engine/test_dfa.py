"""Direct feature attribution for attention-output (hook_z) SAEs, against a direct computation."""

from __future__ import annotations

import pytest
import torch

from deployments.engine import features as F
from deployments.engine import tokens as T
from deployments.hooks import dfa_hooks
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.loading import load_model, load_sae
from deployments.specs import sae_spec_from_dir
from tests import reference as R
from tests.packs import write_hook_z_sae


@pytest.fixture(scope="module")
def setup(pack_dir, tmp_path_factory):
    m = R.model(str(pack_dir))
    d = write_hook_z_sae(tmp_path_factory.mktemp("att") / "att-demo" / "0", m.cfg.n_heads, m.cfg.d_head)
    spec = sae_spec_from_dir("0-att-demo", "att-demo", d)
    return ModelRunner(load_model(str(pack_dir))), spec, load_sae(spec), d


def test_dfa_equals_direct_and_sums_to_the_encoder_input(pack_dir, setup):
    runner, spec, sae, d = setup
    from sae_lens import SAE

    ref_sae = SAE.load_from_disk(str(d))
    ref_sae.fold_W_dec_norm()
    m = R.model(str(pack_dir))
    text = "The cat sat on the mat and the dog sat too"
    ids = T.feature_tokens(runner.tokenizer, text)
    hooks = [spec.hook_name, *dfa_hooks(spec.hook_name)]
    acts = runner.capture([CaptureRequest(ids, hooks)])[0]
    _, cache = m.run_with_cache(torch.tensor([ids]))
    z, v, pat = cache[spec.hook_name][0], cache["blocks.0.attn.hook_v"][0], cache["blocks.0.attn.hook_pattern"][0]
    feats_ref = ref_sae.encode(z)
    assert torch.allclose(F.encode(sae, acts[spec.hook_name]), feats_ref, rtol=1e-5, atol=1e-5)
    W = ref_sae.W_enc.detach()
    dh = m.cfg.d_head
    for feature in range(5):
        dest = int(feats_ref[:, feature].argmax())
        got = F.direct_feature_attribution(sae.W_enc, acts["blocks.0.attn.hook_v"], acts["blocks.0.attn.hook_pattern"], feature, dest)
        want = [sum(float(pat[h, dest, s] * (v[s, h] @ W[h * dh:(h + 1) * dh, feature])) for h in range(m.cfg.n_heads))
                for s in range(len(ids))]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
        # the attributions split z[dest] . W_enc[:, f] over source positions
        assert abs(sum(got) - float(z[dest].reshape(-1) @ W[:, feature])) < 1e-3 * max(1.0, abs(sum(got)))
        assert all(x == 0 for x in got[dest + 1:])  # causal: nothing from later positions
