"""The engine on the GPU in float32, bfloat16 and float16 against float32 TransformerLens + SAE Lens on the CPU:
capture, encode, ranking (feature_filter, sort_by_token_indexes, one-token prompts), topk-by-token, source, DFA,
cosine, sae-vector, and a steering hook. Run by ``scripts/gpu_check.sh``.

Bounds are tests/engine/tolerances.py's, with two allowances for CUDA (both from the dtype's epsilon): cuBLAS may
reduce a half-precision product in split-K partial sums rounded to the dtype (torch's
``allow_{bf16,fp16}_reduced_precision_reduction``, on by default), counted as up to 4 more roundings of each
product (``PARTIAL_SUMS``); and the model runs other kernels than the CPU's, so capture gets twice the CPU bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import features as F
from deployments.engine import geometry as G
from deployments.engine import tokens as T
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.loading import load_model, load_sae, parse_dtype
from deployments.specs import resolve_sae_specs
from tests import reference as R
from tests.engine.tolerances import U32, capture_tolerance, check_selection, encode_tolerance, unit_roundoff
from tests.gpu.conftest import DTYPES

PROMPTS = {"short": "the cat sat on the mat", "one-token": "",
           "long": "one two three four five six seven, hello world, big city river park house. " * 5}
PARTIAL_SUMS = 4
KERNEL_FACTOR = 2


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def specs(pack_dir):
    return resolve_sae_specs(str(pack_dir), ["res-demo"])


@pytest.fixture(scope="module")
def ref_model(pack_dir):
    return R.model(str(pack_dir))


@pytest.fixture(scope="module")
def ids(ref_model):
    return {k: T.feature_tokens(ref_model.tokenizer, v) for k, v in PROMPTS.items()}


@pytest.fixture(scope="module")
def ref_cache(ref_model, ids):
    out = {}
    with torch.no_grad():
        for k, toks in ids.items():
            _, cache = ref_model.run_with_cache(torch.tensor([toks]))
            out[k] = {h: v[0] for h, v in cache.items()}
    return out


@pytest.fixture(scope="module")
def runner(pack_dir, device, dtype):
    r = ModelRunner(load_model(str(pack_dir), device, dtype), device)
    assert next(r.model.parameters()).device.type == torch.device(device).type
    return r


def test_capture(runner, dtype, ids, ref_cache, specs):
    hooks = [s.hook_name for s in specs] + ["hook_embed", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v"]
    got = runner.capture([CaptureRequest(ids[k], hooks) for k in ids])  # one padded batch on the device
    for k, g in zip(ids, got):
        for h in hooks:
            want = ref_cache[k][h].numpy()
            assert g[h].dtype == np.float32 and g[h].shape == want.shape
            flat = want.reshape(want.shape[0], -1) if not h.endswith("pattern") else want.transpose(1, 0, 2).reshape(want.shape[1], -1)
            gflat = g[h].reshape(flat.shape) if not h.endswith("pattern") else g[h].transpose(1, 0, 2).reshape(flat.shape)
            scale = np.ones((flat.shape[0], 1)) if h.endswith("pattern") else np.abs(flat).max(axis=1, keepdims=True)
            err = np.abs(gflat - flat).max(axis=1, keepdims=True)
            tol = KERNEL_FACTOR * capture_tolerance(h, dtype)
            assert (err <= tol * scale).all(), (dtype, k, h, float((err / scale).max()))


@pytest.fixture(scope="module")
def saes(specs, device, dtype):
    return {s.id: load_sae(s, device, dtype) for s in specs}


def test_sae_functions(specs, saes, ref_cache, device, dtype, pack_dir):
    u = unit_roundoff(dtype)
    t = parse_dtype(dtype)
    for spec in specs:
        ref = R.sae(str(pack_dir), spec.set_name, spec.layer)
        sae = saes[spec.id]
        assert sae.W_enc.device.type == torch.device(device).type and sae.W_enc.dtype == t
        for k in PROMPTS:
            x = ref_cache[k][spec.hook_name]
            feats = F.encode(sae, x.numpy())
            assert feats.device.type == torch.device(device).type and feats.dtype == torch.float32
            want = ref.encode(x).detach()
            tol = encode_tolerance(ref, x, dtype, partial_sum_roundings=PARTIAL_SUMS)
            assert ((feats.cpu() - want).abs() <= tol).all(), (spec.id, k)
            # activation/all on the device: plain, feature_filter, sort_by_token_indexes (one-token prompts too)
            for kw in (dict(sort_by_token_indexes=[], feature_filter=None),
                       dict(sort_by_token_indexes=[], feature_filter=[900, 3, 77, 512, 40]),
                       dict(sort_by_token_indexes=[i for i in (0, 1, 3) if i < x.shape[0]], feature_filter=None)):
                rows = F.rank_features(feats, 8, ignore_bos=True, **kw)
                w, tl = want.clone(), tol.clone()
                w[0] = tl[0] = 0
                idx = [i for i in kw["sort_by_token_indexes"] if i != 0]
                by_sum = bool(kw["sort_by_token_indexes"])
                ref_scores = w[idx].sum(0) if by_sum else w.max(0).values
                score_tol = tl[idx].sum(0) if by_sum else tl.max(0).values
                cands = sorted(set(kw["feature_filter"])) if kw["feature_filter"] else list(range(spec.d_sae))
                check_selection([r.index for r in rows], [r.sum_values if by_sum else r.max_value for r in rows],
                                ref_scores, score_tol, cands, f"{dtype} {spec.id} {k} {kw}")
            idx, vals = F.topk_by_token(feats, 5)
            for p in range(x.shape[0]):
                check_selection(idx[p], vals[p], want[p], tol[p], list(range(spec.d_sae)), f"topk {p}")
            active = F.active_entries(feats, 1)
            for f, entries in active.items():
                for p, v in entries:
                    assert abs(v - float(want[p, int(f)])) <= float(tol[p, int(f)])
        # util routes: sae-vector is the float32 fold rounded once; cosine in float32 on the device
        for i in (0, 17):
            assert torch.equal(torch.tensor(G.encoder_vector(sae.W_enc, i)), ref.W_enc[:, i].detach().to(t).float())
        query = G.decoder_rows(sae.W_dec, [4])[0]
        assert query.device.type == "cpu"
        got_idx, got_cos = G.DecoderIndex(sae.W_dec).top_cosine(query, 20)
        W = ref.W_dec.detach().double()
        want_cos = (W @ query.double()) / W.norm(dim=1) / query.double().norm()
        cos_tol = torch.full_like(want_cos, 1.01 * (4 * u + 2 * spec.d_in * U32))
        check_selection(got_idx, got_cos, want_cos, cos_tol, list(range(spec.d_sae)), f"cosine {spec.id}")


def test_dfa_on_device(pack_dir, ref_model, ref_cache, device, dtype, tmp_path):
    from deployments.specs import sae_spec_from_dir
    from tests.packs import write_hook_z_sae

    d = write_hook_z_sae(tmp_path / "att" / "1", ref_model.cfg.n_heads, ref_model.cfg.d_head, layer=1, seed=3)
    spec = sae_spec_from_dir("1-att", "att", d)
    sae = load_sae(spec, device, dtype)
    from sae_lens import SAE

    ref = SAE.load_from_disk(str(d))
    ref.fold_W_dec_norm()
    cache = ref_cache["long"]
    v, pat = cache["blocks.1.attn.hook_v"], cache["blocks.1.attn.hook_pattern"]
    n_heads, d_head = pat.shape[0], v.shape[-1]
    W = ref.W_enc.detach().double().reshape(n_heads, d_head, -1)
    u = unit_roundoff(dtype)
    for feature, dest in ((0, 5), (7, v.shape[0] - 1)):
        got = torch.tensor(F.direct_feature_attribution(sae.W_enc, v.numpy(), pat.numpy(), feature, dest), dtype=torch.float64)
        want = torch.einsum("hs,shd,hd->s", pat[:, dest, :].double(), v.double(), W[:, :, feature])
        mag = torch.einsum("hs,shd,hd->s", pat[:, dest, :].double(), v.double().abs(), W[:, :, feature].abs())
        assert ((got - want).abs() <= 1.01 * (u + (d_head + n_heads) * U32) * mag).all()


def test_steering_hook_on_device(pack_dir, specs, device):
    """A decoder row added at the SAE's hook moves the device model's next-token logits as it moves the CPU's."""
    spec = specs[-1]
    vec = load_sae(spec, "cpu", "float32").W_dec[3].detach()
    out = {}
    for dev in ("cpu", device):
        m = load_model(str(pack_dir), dev, "float32")
        toks = m.to_tokens(PROMPTS["short"]).to(dev)
        v = (vec * 8).to(dev)
        with torch.no_grad(), m.hooks(fwd_hooks=[(spec.hook_name, lambda a, hook: a + v)]):
            steered = m(toks)[0, -1]
        with torch.no_grad():
            plain = m(toks)[0, -1]
        out[dev] = (steered - plain).float().cpu()
    scale = float(out["cpu"].abs().max())
    # float32 both ways: other kernels, the same sums in another order (rel 1e-5, as for batch shapes)
    torch.testing.assert_close(out[device], out["cpu"], rtol=1e-5, atol=1e-5 * scale)
