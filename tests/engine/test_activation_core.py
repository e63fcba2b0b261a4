"""The compute core (tokens, capture, features) against TransformerLens + SAE Lens called directly."""

from __future__ import annotations

import math

import pytest
import torch

from deployments.engine import features as F
from deployments.engine import tokens as T
from deployments.engine.capture import CaptureRequest, ModelRunner, stop_layer_for
from deployments.engine.errors import RequestError
from deployments.engine.loading import load_model, load_sae
from deployments.specs import resolve_sae_specs
from tests.compare import is_first_argmax_up_to_drift
from tests import reference as R

PROMPTS = ["The cat sat on the mat.", "red blue", "one two three four five six seven", "x"]
RTOL = 1e-5


def close(a, b, rtol=RTOL, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def runner(pack_dir):
    return ModelRunner(load_model(str(pack_dir)))


@pytest.fixture(scope="module")
def specs(pack_dir):
    return resolve_sae_specs(str(pack_dir), ["res-demo"])


@pytest.fixture(scope="module")
def saes(specs):
    return {s.id: load_sae(s) for s in specs}


def test_specs_cover_every_layer(pack_dir, specs):
    m = R.model(str(pack_dir))
    assert [s.id for s in specs] == [f"{i}-res-demo" for i in range(m.cfg.n_layers)]
    assert all(s.hook_name == f"blocks.{s.layer}.hook_resid_post" for s in specs)


@pytest.mark.parametrize("text", PROMPTS + ["", "  spaced  ", "<|bos|>already has bos"])
def test_feature_tokens_match_transformer_lens(pack_dir, runner, text):
    m = R.model(str(pack_dir))
    ids = T.feature_tokens(runner.tokenizer, text)
    prompt = R.feature_prompt(m, text)
    assert ids == m.to_tokens(prompt, prepend_bos=False, truncate=False)[0].tolist()
    assert T.str_tokens(runner.tokenizer, ids) == m.to_str_tokens(prompt, prepend_bos=False)
    assert ids.count(m.tokenizer.bos_token_id) == 1  # BOS exactly once, never doubled
    assert T.special_flags(runner.tokenizer, ids)[0] is True


def test_token_table_is_the_tokenizer_asked_each_time(pack_dir):
    """str_tokens / special_flags memoise per tokenizer: the same answers as asking the tokenizer, every id of the
    vocabulary, repeated and unseen ids mixed; a tokenizer that gains a special token gets a fresh table."""
    tok = load_model(str(pack_dir)).tokenizer  # its own copy: the test adds a token to it
    ids = list(range(len(tok)))
    asked = lambda xs: tok.batch_decode([[i] for i in xs], clean_up_tokenization_spaces=False)
    assert T.str_tokens(tok, ids[:7] + ids[:3]) == asked(ids[:7] + ids[:3])
    assert T.str_tokens(tok, ids[::-1]) == asked(ids[::-1])
    special = set(tok.all_special_ids)
    assert T.special_flags(tok, ids) == [i in special for i in ids] and any(T.special_flags(tok, ids))
    tok.add_special_tokens({"additional_special_tokens": ["<|test-added|>"]})
    new = tok.convert_tokens_to_ids("<|test-added|>")
    assert new == len(tok) - 1 and T.special_flags(tok, [new]) == [True]
    assert T.str_tokens(tok, [new, 0]) == asked([new, 0]) == ["<|test-added|>", asked([0])[0]]


def test_default_bos_policy_matches_to_tokens(pack_dir, runner):
    m = R.model(str(pack_dir))
    for prepend in (True, False):
        assert T.encode(runner.tokenizer, "hello world", prepend) == m.to_tokens("hello world", prepend_bos=prepend)[0].tolist()
    assert T.tokenizer_prepends_bos(runner.tokenizer) == bool(m.cfg.default_prepend_bos)


def test_batched_capture_equals_direct(pack_dir, runner, specs):
    """Prompts of different lengths right-padded into one pass give each prompt's own activations."""
    hooks = [specs[0].hook_name, specs[-1].hook_name]
    reqs = [CaptureRequest(T.feature_tokens(runner.tokenizer, p), hooks) for p in PROMPTS]
    out = runner.capture(reqs)
    for p, o in zip(PROMPTS, out):
        for h in hooks:
            ids, ref = R.hook_acts(str(pack_dir), R.feature_prompt(R.model(str(pack_dir)), p), h, prepend_bos=False)
            assert o[h].shape == tuple(ref.shape)
            assert close(o[h], ref)


def test_capture_stops_at_deepest_needed_layer(runner, specs):
    n = runner.model.cfg.n_layers
    assert stop_layer_for([specs[0].hook_name], n) == 1 or n == 1
    assert stop_layer_for([s.hook_name for s in specs], n) is None
    assert stop_layer_for(["ln_final.hook_normalized"], n) is None
    with pytest.raises(RequestError):
        runner.capture([CaptureRequest([1, 2], ["blocks.0.hook_nonsense"])])


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_equals_sae_lens(pack_dir, runner, specs, saes, text):
    for spec in specs:
        ids, _, ref = R.feature_acts(str(pack_dir), text, "res-demo", spec.layer)
        acts = runner.capture([CaptureRequest(ids, [spec.hook_name])])[0][spec.hook_name]
        assert close(F.encode(saes[spec.id], acts), ref)


def _feats(pack_dir, runner, saes, spec, text):
    ids = T.feature_tokens(runner.tokenizer, text)
    acts = runner.capture([CaptureRequest(ids, [spec.hook_name])])[0][spec.hook_name]
    return ids, F.encode(saes[spec.id], acts)


def test_single_feature_bos_policy(pack_dir, runner, specs, saes):
    spec = specs[-1]
    text = "The cat<|bos|> sat"  # a second BOS inside the text is zeroed too
    ids, ref_strs, ref = R.feature_acts(str(pack_dir), text, "res-demo", spec.layer)
    ids2, feats = _feats(pack_dir, runner, saes, spec, text)
    assert ids == ids2
    bos = R.model(str(pack_dir)).tokenizer.bos_token_id
    zero = [i for i, t in enumerate(ids) if t == bos]
    assert len(zero) == 2
    col_ref = ref[:, :].clone()
    idx = int(ref[1:].max(dim=0).values.argmax())  # a feature that fires
    expected = col_ref[:, idx].clone()
    expected[zero] = 0
    expected = expected[1:]
    res = F.single_feature(feats, idx, zero, drop_first=True)
    assert close(res.values, expected)
    assert math.isclose(res.max_value, float(expected.max()), rel_tol=RTOL)
    assert is_first_argmax_up_to_drift(expected.tolist(), res.max_value_index)  # batched vs alone: a near tie may move it
    assert len(res.values) == len(ids) - 1


def test_vector_projection_equals_direct(pack_dir, runner):
    hook = "blocks.0.hook_resid_post"
    d = runner.model.cfg.d_model
    vec = torch.linspace(-1, 1, d)
    ids, ref = R.hook_acts(str(pack_dir), "The cat sat", hook)
    acts = runner.capture([CaptureRequest(ids, [hook])])[0][hook]
    res = F.vector_projection(acts, vec.tolist())
    assert close(res.values, ref @ vec, rtol=1e-4, atol=1e-4)
    with pytest.raises(RequestError, match="length"):
        F.vector_projection(acts, [1.0] * (d + 1))


@pytest.mark.parametrize("sort_idx", [[], [1], [1, 2]])
@pytest.mark.parametrize("ignore_bos", [True, False])
def test_ranking_across_sources_matches_brute_force(pack_dir, runner, specs, saes, sort_idx, ignore_bos):
    text = "The cat sat on the mat."
    per_source_feats = [_feats(pack_dir, runner, saes, s, text)[1] for s in specs]
    ref_feats = [R.feature_acts(str(pack_dir), text, "res-demo", s.layer)[2] for s in specs]
    n = 30
    got = F.merge_ranked(
        [F.rank_features(f, n, sort_idx, ignore_bos) for f in per_source_feats], n, by_sum=bool(sort_idx)
    )
    want = R.ranked(ref_feats, n, sort_idx, ignore_bos)
    # Equal scores may legitimately differ in the last ulp between the two paths; compare scores strictly
    # and identities wherever the reference has no near-tie.
    for (src, row), (rsrc, rfeat, rmax, rat, rsum, rvals) in zip(got, want):
        assert math.isclose(row.max_value, rmax, rel_tol=RTOL, abs_tol=1e-5)
        assert math.isclose(row.sum_values, rsum, rel_tol=RTOL, abs_tol=1e-4)
    keys = [(-(r[4] if sort_idx else r[2])) for r in want]
    for k, ((src, row), r) in enumerate(zip(got, want)):
        neighbours = [keys[j] for j in (k - 1, k + 1) if 0 <= j < len(keys)]
        if all(abs(keys[k] - nb) > 1e-3 * max(1.0, abs(keys[k])) for nb in neighbours):
            assert (src, row.index, row.max_value_index) == (r[0], r[1], r[3])
            assert close(row.values, r[5])


def test_ties_keep_source_then_index_order():
    zeros = torch.zeros(3, 5)
    merged = F.merge_ranked([F.rank_features(zeros, 4), F.rank_features(zeros, 4)], 6, by_sum=False)
    assert [(s, r.index) for s, r in merged] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    f = torch.tensor([[0.0, 2.0, 2.0, 1.0], [0.0, 2.0, 2.0, 3.0]])
    rows = F.rank_features(f, 4)
    assert [r.index for r in rows] == [3, 1, 2, 0]
    assert rows[1].max_value_index == 0  # first argmax


def test_feature_filter_and_sort_index_errors():
    f = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    rows = F.rank_features(f, 10, feature_filter=[2, 0])
    assert [r.index for r in rows] == [2, 0]
    with pytest.raises(RequestError, match="out of range"):
        F.rank_features(f, 10, sort_by_token_indexes=[3])
    with pytest.raises(RequestError, match="out of range"):
        F.rank_features(f, 10, sort_by_token_indexes=[-1])


def test_topk_by_token_and_active_entries(pack_dir, runner, specs, saes):
    spec = specs[0]
    _, _, ref = R.feature_acts(str(pack_dir), "red blue green", "res-demo", spec.layer)
    _, feats = _feats(pack_dir, runner, saes, spec, "red blue green")
    idx, vals = F.topk_by_token(feats, 5)
    ref_vals = torch.sort(ref, dim=1, descending=True).values[:, :5]
    assert close(vals, ref_vals)
    for p in range(ref.shape[0]):
        assert close(ref[p, idx[p]], vals[p])
    active = F.active_entries(feats, skip_positions=1)
    nz = torch.nonzero(ref[1:])
    assert sum(len(v) for v in active.values()) == nz.shape[0]
    for f, entries in active.items():
        for pos, val in entries:
            assert pos >= 1 and math.isclose(val, float(ref[pos, int(f)]), rel_tol=RTOL, abs_tol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_topk_by_token_equals_a_stable_sort_with_ties(seed):
    """The fast top-k gives exactly the stable descending sort's first k: values and, among ties, index order
    (SAE features are mostly exactly 0, so ties at the k-th value are the common case)."""
    g = torch.Generator().manual_seed(seed)
    n, d = 9, 300
    feats = torch.relu(torch.randn(n, d, generator=g) - 1.5)  # ~7% non-zero: rows with fewer than k positives
    feats[:, ::7] = torch.round(feats[:, ::7])  # ties among non-zero values too
    feats[0] = 0.0  # an all-zero row
    feats[1, 5:9] = 3.0  # a tie straddling the k-th place
    for k in (1, 3, 5, 40, d, d + 10):
        idx, vals = F.topk_by_token(feats, k)
        ref = torch.sort(feats, dim=1, descending=True, stable=True)
        kk = min(k, d)
        assert idx == ref.indices[:, :kk].tolist() and vals == ref.values[:, :kk].tolist()
        row = F.stable_topk(feats[3:4], k)  # one row, as rank_features uses it
        assert row.tolist() == ref.indices[3:4, :kk].tolist()
    assert F.stable_topk(feats, 0).shape == (n, 0) and F.stable_topk(feats[:, :0], 5).shape == (n, 0)
    feats[2, 4] = float("nan")  # still answers (by the sort)
    idx, _ = F.topk_by_token(feats, 5)
    assert idx[3:] == torch.sort(feats, dim=1, descending=True, stable=True).indices[3:, :5].tolist()


def test_token_limit_message():
    with pytest.raises(RequestError, match=r"^Text too long: 7 tokens, max is 5$"):
        T.check_token_limit(7, 5)


def _stacked(seed: int, lengths: list[int], d: int = 200) -> torch.Tensor:
    """Codes of several prompts stacked along positions, with exact ties: zeros (most features), a repeated value
    across features, a prompt's max at two positions, an all-zero prompt, negative codes (not every SAE is ReLU)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(sum(lengths), d, generator=g) - 1.2)
    f[:, 10] = f[:, 11] = 2.5
    f[:, ::9] = torch.round(f[:, ::9])
    f[:, 3] = -torch.rand(f.shape[0], generator=g)  # a feature that is negative everywhere
    at = 0
    for i, n in enumerate(lengths):
        if i == 1:
            f[at:at + n] = 0.0
        elif n > 2:
            f[at + 1, 20] = f[at + n - 1, 20] = 7.0
        at += n
    return f


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lengths", [[5, 3, 1, 8], [1], [12, 12], [4, 1, 1, 6, 2]])
def test_rank_many_equals_rank_features_exactly(seed, lengths):
    """The shard's batched ranking (several prompts' codes in one set of ops) answers as rank_features does for
    each prompt alone: the same features, order among ties, values, maxima, first argmax, bit for bit."""
    feats = _stacked(seed, lengths)
    ks = [(5, 1, 40, 300, 0, 7)[i % 6] for i in range(len(lengths))]
    for bos in ([True] * len(lengths), [False] * len(lengths), [i % 2 == 0 for i in range(len(lengths))]):
        got = F.rank_many(feats, lengths, ks, bos)
        want, at = [], 0
        for n, k, b in zip(lengths, ks, bos):
            want.append(F.rank_features(feats[at:at + n], k, None, b))
            at += n
        assert got == want, (lengths, ks, bos)


def test_rank_many_with_non_finite_codes_ranks_prompt_by_prompt():
    lengths = [4, 3]
    feats = _stacked(0, lengths)
    feats[5, 7] = float("nan")
    feats[1, 8] = float("inf")
    got = F.rank_many(feats, lengths, [5, 5], [True, True])
    want = [F.rank_features(feats[:4], 5, None, True), F.rank_features(feats[4:], 5, None, True)]
    assert repr(got) == repr(want)  # NaN != NaN: compare the printed rows
    assert F.rank_many(feats, [], [], []) == []
    # each kind of non-finite code alone, where the fast path must notice it (a NaN or an infinity in a body, a
    # feature at -inf over a whole body) or may go on (a NaN in a left-out BOS row, -inf beside finite codes)
    lengths = [4, 3, 1]
    for row, col, value in [(5, 7, float("nan")), (1, 8, float("inf")), (2, 9, float("-inf")), (0, 4, float("nan")),
                            (4, 4, float("nan")), (7, 6, float("-inf")), (7, 6, float("nan"))]:
        for bos in ([True] * 3, [False] * 3, [False, True, True]):
            f = _stacked(1, lengths)
            f[row, col] = value
            if value == float("-inf") and row == 7:
                f[4:7, 12] = float("-inf")  # and a feature at -inf over the second prompt's whole body
            got = F.rank_many(f, lengths, [6, 300, 2], bos)
            want = [F.rank_features(f[:4], 6, None, bos[0]), F.rank_features(f[4:7], 300, None, bos[1]),
                    F.rank_features(f[7:], 2, None, bos[2])]
            assert repr(got) == repr(want), (row, col, value, bos)
