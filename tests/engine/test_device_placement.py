"""Every engine function a route calls, run with its tensors on a second device (tests/engine/offdevice.py).

A host tensor mixed into device work is a crash on CUDA (``indices should be on the same device``, ``expected
all tensors to be on the same device``) that no CPU-only run shows. Here each function runs on the other device
and must (1) not mix devices, (2) give the answer it gives on the CPU, and (3) leave its dense results on the
device it was given, not copied to the host.

The other device computes with the same CPU kernels on copies of the same values, so selections (ranking, top-k,
sparse entries) are compared exactly. Products go through BLAS, whose vectorised paths depend on how a buffer is
aligned (a copy is aligned differently from safetensors' memory-mapped weights), so their last bits may differ:
those compare with ``BLAS_RTOL`` = 1e-6, a few float32 ulps (2**-23 = 1.2e-7) of a reduction's result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import features as F
from deployments.engine import geometry as G
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.devices import same_device
from deployments.engine.loading import load_model, load_sae
from deployments.specs import resolve_sae_specs, sae_spec_from_dir
from tests.engine.offdevice import DeviceMismatch, OffDevice, is_other, to_other
from tests.packs import write_hook_z_sae

BLAS_RTOL, BLAS_ATOL = 1e-6, 1e-7


def _feats(seq: int = 7, d_sae: int = 48, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative features with exact ties (zeros, and a repeated value) like real SAE outputs."""
    g = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(seq, d_sae, generator=g) - 0.5)
    f[:, 5] = f[:, 9] = 1.25  # a tie across features
    return f


# --- the harness can fail -------------------------------------------------------------------------------


def test_harness_catches_what_cuda_would_refuse():
    with OffDevice() as dev:
        x = to_other(torch.arange(6.0))
        with pytest.raises(DeviceMismatch):
            x + torch.ones(6)  # host operand in device arithmetic
        with pytest.raises(DeviceMismatch):
            torch.arange(6)[torch.tensor([1, 2], device=dev)]  # host tensor indexed by a device index
        with pytest.raises(DeviceMismatch):
            torch.stack([x, torch.zeros(6)])
        with pytest.raises(TypeError):
            x.numpy()  # as for a CUDA tensor: .cpu() first
        # what CUDA allows: 0-dim host scalars, host indices into a device tensor, lists, copies across
        assert (x * torch.tensor(2.0)).tolist() == [0, 2, 4, 6, 8, 10]
        assert x[torch.tensor([1, 3])].tolist() == [1, 3]
        x[[0]] = 7
        assert is_other(x) and x.tolist()[0] == 7
        assert type(x.cpu()) is torch.Tensor and x.cpu().tolist()[0] == 7
        assert is_other(torch.zeros(2, device=x.device)) and is_other(torch.tensor([1], device=dev))


# --- features -------------------------------------------------------------------------------------------


RANK_CASES = [
    dict(num_results=5, sort_by_token_indexes=[], ignore_bos=True, feature_filter=None),
    dict(num_results=5, sort_by_token_indexes=[], ignore_bos=True, feature_filter=[9, 3, 5, 3, 40]),  # the CUDA crash
    dict(num_results=60, sort_by_token_indexes=[], ignore_bos=False, feature_filter=None),  # more than d_sae
    dict(num_results=4, sort_by_token_indexes=[0, 2, 3], ignore_bos=True, feature_filter=None),
    dict(num_results=4, sort_by_token_indexes=[1], ignore_bos=False, feature_filter=[1, 2, 5, 9]),
]


@pytest.mark.parametrize("case", RANK_CASES)
@pytest.mark.parametrize("seq", [7, 1])  # one token with ignore_bos: the other CUDA crash (max_values on the host)
def test_rank_features_on_device(case, seq):
    feats = _feats(seq)
    case = {**case, "sort_by_token_indexes": [i for i in case["sort_by_token_indexes"] if i < seq]}
    want = F.rank_features(feats, **case)
    with OffDevice():
        got = F.rank_features(to_other(feats), **case)
    assert got == want  # dataclass equality: indices, values, max, argmax, sums, exactly


def test_stable_topk_on_device_both_paths():
    clean = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))  # no ties: the fast path
    tied = _feats(5, 30)  # zeros tie at the k-th value: the sorted path
    for values in (clean, tied):
        want = F.stable_topk(values, 6)
        with OffDevice():
            got = F.stable_topk(to_other(values), 6)
            assert is_other(got)
            assert got.cpu().tolist() == want.tolist()


def test_topk_by_token_and_active_entries_on_device():
    feats = _feats()
    with OffDevice():
        f = to_other(feats)
        assert F.topk_by_token(f, 4) == F.topk_by_token(feats, 4)
        assert F.active_entries(f, 1) == F.active_entries(feats, 1)
        assert F.active_entries(torch.zeros_like(f), 1) == {}


def test_single_feature_and_projection_on_device():
    feats = _feats()
    acts = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    vec = [float(x) for x in np.linspace(-1, 1, 16)]
    with OffDevice():
        f = to_other(feats)
        for zero, drop in (([0], True), ([0, 3], False), ([], False)):
            assert F.single_feature(f, 5, zero, drop) == F.single_feature(feats, 5, zero, drop)
        # the route passes host activations; a device tensor must work as well
        assert F.vector_projection(to_other(torch.from_numpy(acts)), vec) == F.vector_projection(acts, vec)
        assert F.vector_projection(acts, vec) == F.vector_projection(acts.copy(), vec)


@pytest.fixture(scope="module")
def pack_sae(pack_dir):
    spec = resolve_sae_specs(str(pack_dir), ["res-demo"])[1]
    return spec, load_sae(spec)


def _sae_on_other(spec, dev, dtype="float32"):
    sae = load_sae(spec, str(dev), dtype)  # the loader's own move to the device
    assert is_other(sae.W_enc) and is_other(sae.W_dec) and sae.W_enc.dtype == getattr(torch, dtype)
    return sae


def test_encode_on_device(pack_sae):
    spec, sae = pack_sae
    acts = np.random.default_rng(1).standard_normal((6, spec.d_in)).astype(np.float32)
    want = F.encode(sae, acts)
    with OffDevice() as dev:
        other = _sae_on_other(spec, dev)
        got = F.encode(other, acts)  # host (numpy) activations in, as the shard receives them
        assert is_other(got) and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, rtol=BLAS_RTOL, atol=BLAS_ATOL)
        feats = F.encode(other, np.concatenate([acts, acts[:2]]))  # a batch, split as the shard splits it
        parts = torch.split(feats, [6, 2])
        assert all(is_other(p) for p in parts)
        assert F.rank_features(parts[0], 5, [], True, [1, 2, 3]) == F.rank_features(got.cpu(), 5, [], True, [1, 2, 3])


def test_encode_columns_on_device(pack_sae):
    """activation/single's few-column encode (the shard's path for it): its column index on the SAE's device."""
    spec, sae = pack_sae
    acts = np.random.default_rng(2).standard_normal((5, spec.d_in)).astype(np.float32)
    full = F.encode(sae, acts)
    with OffDevice() as dev:
        got = F.encode_columns(_sae_on_other(spec, dev), acts, [3, 40, 41])
        assert is_other(got) and got.dtype == torch.float32 and got.shape == (5, 3)
        torch.testing.assert_close(got.cpu(), full[:, [3, 40, 41]], rtol=BLAS_RTOL, atol=BLAS_ATOL)
        row, ref = F.single_feature(got, 40, [0], True, column=1), F.single_feature(full, 40, [0], True)
        assert (row.index, row.max_value_index, len(row.values)) == (40, ref.max_value_index, 4)
        np.testing.assert_allclose(row.values, ref.values, rtol=BLAS_RTOL, atol=BLAS_ATOL)


def test_dfa_on_device(pack_dir, tmp_path):
    from tests import reference as R

    m = R.model(str(pack_dir))
    d = write_hook_z_sae(tmp_path / "att" / "0", m.cfg.n_heads, m.cfg.d_head)
    spec = sae_spec_from_dir("0-att", "att", d)
    sae = load_sae(spec)
    rng = np.random.default_rng(2)
    v = rng.standard_normal((5, m.cfg.n_heads, m.cfg.d_head)).astype(np.float32)
    pattern = rng.random((m.cfg.n_heads, 5, 5)).astype(np.float32)
    want = F.direct_feature_attribution(sae.W_enc, v, pattern, 7, 3)
    with OffDevice():
        got = F.direct_feature_attribution(to_other(sae.W_enc), v, pattern, 7, 3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=BLAS_RTOL, atol=BLAS_ATOL)


# --- geometry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cosine_vectors_on_device(pack_sae, dtype):
    spec, _ = pack_sae
    sae = load_sae(spec, "cpu", dtype)
    query = torch.from_numpy(G.decoder_rows(sae.W_dec, [4]).numpy()[0])
    want = G.DecoderIndex(sae.W_dec).top_cosine(query, 10)
    with OffDevice() as dev:
        other = _sae_on_other(spec, dev, dtype)
        index = G.DecoderIndex(other.W_dec)
        assert is_other(index.rows) and is_other(index.inv_norm)
        got = index.top_cosine(query, 10)  # a host query against the device index
        assert got[0] == want[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=BLAS_RTOL, atol=BLAS_ATOL)
        rows = G.decoder_rows(other.W_dec, [4, 0])
        assert type(rows) is torch.Tensor and rows.dtype == torch.float32  # returned on the host, float32
        assert torch.equal(rows, G.decoder_rows(sae.W_dec, [4, 0]))
        assert G.encoder_vector(other.W_enc, 3) == G.encoder_vector(sae.W_enc, 3)


# --- capture --------------------------------------------------------------------------------------------


def test_capture_on_device(pack_dir):
    """The whole TransformerLens forward pass on the other device: padding, stop_at_layer, attention maps."""
    specs = resolve_sae_specs(str(pack_dir), ["res-demo"])
    hooks_deep = [specs[-1].hook_name, "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v"]
    reqs = [CaptureRequest([1, 5, 7, 9, 11], hooks_deep), CaptureRequest([1], hooks_deep),
            CaptureRequest([1, 4, 4], [specs[0].hook_name])]  # a shallow group of its own (stop_at_layer=1)
    want = ModelRunner(load_model(str(pack_dir))).capture(reqs)
    with OffDevice() as dev:
        model = load_model(str(pack_dir), str(dev))
        assert is_other(model.W_E) and is_other(model.blocks[0].attn.W_Q)
        runner = ModelRunner(model, str(dev))
        got = runner.capture(reqs)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for h in w:
            assert isinstance(g[h], np.ndarray) and g[h].dtype == np.float32 and g[h].shape == w[h].shape
            np.testing.assert_allclose(g[h], w[h], rtol=BLAS_RTOL * 10, atol=BLAS_ATOL * 10)  # four layers of products


# --- health checks --------------------------------------------------------------------------------------


def test_same_device():
    assert same_device(torch.device("cpu"), "cpu")
    assert not same_device(torch.device("cpu"), "meta")
    assert same_device("meta", torch.device("meta"))


def test_rank_many_on_device():
    lengths = [7, 1, 4]
    feats = torch.cat([_feats(n, seed=i) for i, n in enumerate(lengths)])
    args = (lengths, [5, 60, 3], [True, True, False])
    want = F.rank_many(feats, *args)
    with OffDevice():
        got = F.rank_many(to_other(feats), *args)
    assert got == want


def test_lazy_rankings_and_their_merge_on_device():
    """rank_many(lazy=True) on the other device, and merge_rankings of its answers, give the CPU's answer."""
    lengths = [7, 1, 4]
    feats = torch.cat([_feats(n, seed=i) for i, n in enumerate(lengths)])
    args = (lengths, [5, 60, 3], [True, True, False])
    want = F.merge_rankings(list(enumerate(F.rank_many(feats, *args, lazy=True))), 9)
    with OffDevice():
        got = F.merge_rankings(list(enumerate(F.rank_many(to_other(feats), *args, lazy=True))), 9)
    assert got == want
