"""The dtype matrix: every activation/util computation in float32, bfloat16 and float16 against float32
TransformerLens + SAE Lens called directly, with tolerances derived from each dtype's machine epsilon.

Stages are checked one at a time, each with its own error bound, because the service runs them that way: the
model (``model_dtype``) hands float32 activations to the SAE shard (``sae_dtype``). So the model rows compare
captures; the SAE rows feed the float32 reference activations to an SAE held in the dtype.

The bounds and their derivations are in tests/engine/tolerances.py. Selections (top-k, ranking) are accepted when
right up to the tolerance; exactness is demanded only where there is nothing to round (all-zero one-token
prompts) and where the answer is a stored weight (sae-vector).
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
from deployments.specs import resolve_sae_specs, sae_spec_from_dir
from tests import reference as R
from tests.engine.tolerances import (SECOND_ORDER, U32, capture_tolerance, check_selection, encode_tolerance, eps,
                                     unit_roundoff)
from tests.packs import write_hook_z_sae

DTYPES = ["float32", "bfloat16", "float16"]

PROMPTS = {
    "short": "The cat sat on the mat.",
    "one-token": "",  # BOS alone
    "long": "one two three four five six seven eight nine ten, red blue green, the dog sees the bird. " * 4,
}


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_model(pack_dir):
    return R.model(str(pack_dir))


@pytest.fixture(scope="module")
def token_ids(ref_model):
    ids = {k: T.feature_tokens(ref_model.tokenizer, v) for k, v in PROMPTS.items()}
    assert len(ids["one-token"]) == 1 and len(ids["long"]) > 64
    return ids


@pytest.fixture(scope="module")
def ref_cache(ref_model, token_ids):
    """Float32 TransformerLens activations, one prompt at a time."""
    out = {}
    with torch.no_grad():
        for k, ids in token_ids.items():
            _, cache = ref_model.run_with_cache(torch.tensor([ids]))
            out[k] = {h: cache[h][0] for h in cache}
    return out


@pytest.fixture(scope="module")
def specs(pack_dir, ref_model, tmp_path_factory):
    """Two residual SAEs of the pack and an attention-output (hook_z) SAE for DFA."""
    res = resolve_sae_specs(str(pack_dir), ["res-demo"])
    d = write_hook_z_sae(tmp_path_factory.mktemp("att") / "att-demo" / "1", ref_model.cfg.n_heads,
                         ref_model.cfg.d_head, layer=1, seed=3)
    return {"res": res[1], "res-deep": res[-1], "att": sae_spec_from_dir("1-att-demo", "att-demo", d)}


def _ref_sae(spec):
    from sae_lens import SAE

    s = SAE.load_from_disk(spec.path)  # float32
    s.fold_W_dec_norm()
    return s.eval()


@pytest.fixture(scope="module")
def ref_saes(specs):
    return {k: _ref_sae(s) for k, s in specs.items()}


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def saes(specs, dtype):
    return {k: load_sae(s, "cpu", dtype) for k, s in specs.items()}


# --- capture --------------------------------------------------------------------------------------------


CAPTURE_HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_v", "blocks.1.attn.hook_pattern",
                 "blocks.1.attn.hook_z", "blocks.3.hook_resid_pre", "blocks.3.hook_resid_post"]


@pytest.mark.parametrize("path", ["lean", "hooked"])
def test_capture(pack_dir, dtype, token_ids, ref_cache, path):
    """Both forward paths (engine.capture): per-position hooks go through engine.decoder's forward pass; a set with
    an attention pattern through TransformerLens's hooks."""
    runner = ModelRunner(load_model(str(pack_dir), "cpu", dtype))
    hooks = [h for h in CAPTURE_HOOKS if path == "hooked" or not h.endswith("hook_pattern")]
    keys = list(token_ids)
    got = runner.capture([CaptureRequest(token_ids[k], hooks) for k in keys])  # one padded batch
    assert runner.stats[f"{path}_passes"] == 1 and sum(runner.stats.values()) == 1
    for k, g in zip(keys, got):
        for h in hooks:
            want = ref_cache[k][h].numpy()
            assert g[h].dtype == np.float32 and g[h].shape == want.shape, (k, h)
            tol = capture_tolerance(h, dtype)
            if h.endswith("hook_pattern"):
                scale = np.ones((want.shape[1], 1))  # per query position; probabilities are <= 1
                err = np.abs(g[h] - want).max(axis=(0, 2))[:, None]
            else:
                flat = want.reshape(want.shape[0], -1)
                scale = np.abs(flat).max(axis=1, keepdims=True)
                err = np.abs(g[h].reshape(flat.shape) - flat).max(axis=1, keepdims=True)
            assert (err <= tol * scale).all(), f"{dtype} {k} {h}: {float((err / scale).max()) / eps(dtype):.2f} eps"


# --- encode ---------------------------------------------------------------------------------------------


def _acts(spec, ref_cache, prompt):
    x = ref_cache[prompt][spec.hook_name]
    return x.reshape(x.shape[0], -1) if x.dim() == 3 else x


@pytest.fixture(scope="module")
def encoded(specs, ref_saes, saes, ref_cache, dtype):
    """{(sae, prompt): (ours [seq, d_sae] float32, reference, elementwise tolerance)}"""
    out = {}
    with torch.no_grad():
        for key, spec in specs.items():
            for prompt in PROMPTS:
                raw = ref_cache[prompt][spec.hook_name]  # hook_z: [seq, heads, d_head]; SAE Lens flattens it
                ours = F.encode(saes[key], raw.numpy())
                out[key, prompt] = (ours, ref_saes[key].encode(raw),
                                    encode_tolerance(ref_saes[key], _acts(spec, ref_cache, prompt), dtype))
    return out


def test_encode(encoded, dtype):
    for (key, prompt), (ours, want, tol) in encoded.items():
        assert ours.dtype == torch.float32 and ours.shape == want.shape
        bad = (ours - want).abs() > tol
        assert not bad.any(), f"{dtype} {key} {prompt}: {int(bad.sum())} features out of bound"


def test_encode_columns(encoded, saes, specs, ref_cache, dtype):
    """activation/single's path in the shard: only the asked features' columns encoded, held to the full encode's
    bound against float32 SAE Lens (the column product rounds as often as the full one)."""
    for (key, prompt), (_, want, tol) in encoded.items():
        cols = [0, 5, 6, want.shape[1] // 2, want.shape[1] - 1]
        got = F.encode_columns(saes[key], ref_cache[prompt][specs[key].hook_name].numpy(), cols)
        assert got.dtype == torch.float32 and got.shape == (want.shape[0], len(cols))
        bad = (got - want[:, cols]).abs() > tol[:, cols]
        assert not bad.any(), f"{dtype} {key} {prompt}: {int(bad.sum())} values out of bound"


# --- ranking (activation/all), top-k by token, source --------------------------------------------------


def test_check_selection_can_fail():
    scores = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0])
    tol = torch.full((5,), 0.1)
    check_selection([1, 3], [3.0, 2.0], scores, tol, list(range(5)), "ok")
    check_selection([1, 4], [3.0, 2.05], scores, tol, list(range(5)), "a tie within tolerance")
    bad = [([1, 2], [3.0, 1.0]), ([3, 1], [2.0, 3.0]), ([1, 3], [3.0, 2.5]), ([4, 3], [2.0, 2.0])]
    for chosen, got in bad:  # misses 3/4; wrong order; value off; ties out of index order
        with pytest.raises(AssertionError):
            check_selection(chosen, got, scores, tol, list(range(5)), "bad")


RANK_CASES = {
    "plain": dict(num_results=12, sort_by_token_indexes=[], ignore_bos=True, feature_filter=None),
    "keep-bos": dict(num_results=12, sort_by_token_indexes=[], ignore_bos=False, feature_filter=None),
    "filter": dict(num_results=5, sort_by_token_indexes=[], ignore_bos=True, feature_filter=[900, 3, 77, 3, 512, 40, 41, 8]),
    "sort-by-tokens": dict(num_results=10, sort_by_token_indexes=[0, 1, 3], ignore_bos=True, feature_filter=None),
    "sort-and-filter": dict(num_results=4, sort_by_token_indexes=[2], ignore_bos=False, feature_filter=list(range(0, 1024, 7))),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_rank_features(encoded, dtype, case, prompt):
    kw = dict(RANK_CASES[case])
    ours, want, tol = encoded["res", prompt]
    seq = want.shape[0]
    kw["sort_by_token_indexes"] = [i for i in kw["sort_by_token_indexes"] if i < seq]
    rows = F.rank_features(ours, **kw)
    zero_bos = kw["ignore_bos"]
    want, tol = want.clone(), tol.clone()
    if zero_bos:
        want[0] = 0
        tol[0] = 0  # the BOS column is set to 0 exactly on both sides
    idx = [i for i in kw["sort_by_token_indexes"] if not (zero_bos and i == 0)]
    by_sum = bool(kw["sort_by_token_indexes"])
    ref_scores = want[idx].sum(0) if by_sum else want.max(0).values
    score_tol = tol[idx].sum(0) if by_sum else tol.max(0).values
    candidates = sorted(set(kw["feature_filter"])) if kw["feature_filter"] is not None else list(range(want.shape[1]))
    assert len(rows) == min(kw["num_results"], len(candidates))
    check_selection([r.index for r in rows], [r.sum_values if by_sum else r.max_value for r in rows],
                    ref_scores, score_tol, candidates, f"{dtype} {case} {prompt}")
    for r in rows:
        col, col_tol = want[:, r.index], tol[:, r.index]
        assert all(abs(v - float(w)) <= float(t) for v, w, t in zip(r.values, col, col_tol)), r.index
        # the reported argmax is the first position holding the reported max, and a near-max of the reference
        assert r.values[r.max_value_index] == r.max_value and r.max_value == max(r.values)
        assert float(col[r.max_value_index]) >= float(col.max()) - 2 * float(col_tol.max())
    if prompt == "one-token" and zero_bos:  # every value is exactly 0: index order, nothing to round
        assert [r.index for r in rows] == candidates[: len(rows)]
        assert all(r.values == [0.0] and r.max_value == 0 and r.max_value_index == 0 for r in rows)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_topk_by_token(encoded, dtype, prompt):
    ours, want, tol = encoded["res", prompt]
    indices, values = F.topk_by_token(ours, 7)
    assert len(indices) == want.shape[0]
    for p, (idx, vals) in enumerate(zip(indices, values)):
        check_selection(idx, vals, want[p], tol[p], list(range(want.shape[1])), f"{dtype} {prompt} position {p}")


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_source_active_entries(encoded, dtype, prompt):
    ours, want, tol = encoded["res-deep", prompt]
    skip = 1
    got = F.active_entries(ours, skip)
    seen = set()
    for f, entries in got.items():
        for p, v in entries:
            assert p >= skip and v != 0
            assert abs(v - float(want[p, int(f)])) <= float(tol[p, int(f)]), (f, p)
            seen.add((p, int(f)))
    clearly_active = {(p, f) for p, f in (want[skip:] > tol[skip:]).nonzero().tolist()}
    assert {(p + skip, f) for p, f in clearly_active} <= seen  # nothing clearly active is missing


# --- DFA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_dfa(specs, ref_saes, saes, ref_cache, dtype, prompt):
    """``dfa[s] = sum_h pattern[h, dest, s] (v[s, h] . W_enc[h, :, f])`` with float32 reference v and pattern, and
    W_enc in the dtype: W_enc is rounded once (u |W|), the rest is float32 arithmetic (d_head + n_heads terms)."""
    spec = specs["att"]
    ref = ref_saes["att"]
    cache = ref_cache[prompt]
    v, pat = cache["blocks.1.attn.hook_v"], cache["blocks.1.attn.hook_pattern"]
    n_heads, d_head = pat.shape[0], v.shape[-1]
    W = ref.W_enc.detach().double().reshape(n_heads, d_head, -1)
    u = unit_roundoff(dtype)
    feats = ref.encode(cache[spec.hook_name])
    for feature in (0, 5, int(feats.max(0).values.argmax())):
        dest = int(feats[:, feature].argmax())
        got = F.direct_feature_attribution(saes["att"].W_enc, v.numpy(), pat.numpy(), feature, dest)
        terms = torch.einsum("hs,shd,hd->sh", pat[:, dest, :].double(), v.double(), W[:, :, feature])
        want = terms.sum(1)
        mag = torch.einsum("hs,shd,hd->s", pat[:, dest, :].double(), v.double().abs(), W[:, :, feature].abs())
        tol = SECOND_ORDER * (u + (d_head + n_heads) * U32) * mag
        assert len(got) == v.shape[0]
        assert ((torch.tensor(got, dtype=torch.float64) - want).abs() <= tol).all(), (dtype, prompt, feature)


# --- cosine and sae-vector (util routes) ----------------------------------------------------------------


def test_cosine(specs, ref_saes, saes, dtype):
    """Cosines against the dtype's decoder, computed in float32. Rounding each decoder element (u) moves a
    cosine by at most 2u; a query that is itself a rounded decoder row (the feature form of the route) by 2u
    more; float32 dot products and norms of length d_in add 2 d_in U32."""
    spec = specs["res"]
    W = ref_saes["res"].W_dec.detach().double()
    u = unit_roundoff(dtype)
    index = G.DecoderIndex(saes["res"].W_dec)
    rng = torch.Generator().manual_seed(1)
    queries = {"feature": (G.decoder_rows(saes["res"].W_dec, [4])[0], 4 * u),
               "vector": (torch.randn(spec.d_in, generator=rng), 2 * u)}
    for name, (q, rounding) in queries.items():
        idx, cos = index.top_cosine(q, 25)
        want = (W @ q.double()) / W.norm(dim=1) / q.double().norm()
        tol = torch.full_like(want, SECOND_ORDER * (rounding + 2 * spec.d_in * U32))
        check_selection(idx, cos, want, tol, list(range(spec.d_sae)), f"{dtype} cosine {name}")
    assert idx and abs(index.top_cosine(queries["feature"][0], 1)[1][0] - 1) <= 2 * spec.d_in * U32  # itself


def test_sae_vector(specs, ref_saes, saes, dtype):
    """util/sae-vector returns W_enc[:, i]: exactly the float32 fold rounded once to the dtype."""
    t = parse_dtype(dtype)
    W = ref_saes["res"].W_enc.detach()
    u = unit_roundoff(dtype)
    for i in (0, 17, specs["res"].d_sae - 1):
        got = torch.tensor(G.encoder_vector(saes["res"].W_enc, i))
        assert torch.equal(got, W[:, i].to(t).float())
        assert ((got - W[:, i]).abs() <= u * W[:, i].abs()).all()
