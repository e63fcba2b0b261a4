"""SAE weights in bfloat16/float16, and the bytes an SAE shard counts for each resident SAE.

* ``load_sae`` folds the decoder norms in float32 and casts once: its half-precision weights are exactly the
  float32 reference's (SAE Lens, folded in float32) rounded to that dtype, with no double rounding.
* ``LoadedSAE.nbytes`` (what ``max_sae_bytes`` is checked against) is every byte the SAE holds, the cosine
  index's included, and ``estimated_nbytes`` (the room made before a load) is the same number.
"""

from __future__ import annotations

import pytest
import torch

from deployments.engine import geometry as G
from deployments.engine.loading import load_sae, parse_dtype, sae_nbytes
from deployments.specs import resolve_sae_specs
from tests import reference as R

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module")
def spec(pack_dir):
    return resolve_sae_specs(str(pack_dir), ["res-demo"])[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_weights_are_the_float32_fold_rounded_once(pack_dir, spec, dtype):
    ref = R.sae(str(pack_dir), spec.set_name, spec.layer)  # SAE Lens: loaded and folded in float32
    sae = load_sae(spec, "cpu", dtype)
    t = parse_dtype(dtype)
    assert sae.dtype == t and sae.cfg.dtype == dtype  # SAE Lens casts its inputs to this in encode
    for name, p in ref.named_parameters():
        got = dict(sae.named_parameters())[name]
        assert got.dtype == t, name
        # exact: one rounding of the float32 fold. Folding after the cast rounds W_enc twice (the cast, then the
        # product with norms of the rounded decoder) and differs from this in many elements.
        assert torch.equal(got, p.detach().to(t)), name


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a tensor that shares another's storage is free)."""
    seen = {}
    for x in tensors:
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_budget_counts_every_copy(spec, dtype):
    from deployments.sae_shard import LoadedSAE, estimated_nbytes

    sae = load_sae(spec, "cpu", dtype)
    loaded = LoadedSAE(spec, sae)
    assert estimated_nbytes(spec, dtype) == loaded.nbytes  # the room made before the load is what it takes
    index = loaded.decoder_index  # the cosine index, built on the first query
    held = _storage_bytes([*sae.parameters(), index.rows, index.inv_norm])
    assert held == loaded.nbytes == sae_nbytes(sae) + index.nbytes
    if dtype == "float32":
        assert index.rows.data_ptr() == sae.W_dec.data_ptr()  # no copy of a float32 decoder
        assert index.nbytes == spec.d_sae * 4
    else:
        assert index.rows.dtype == torch.float32 and index.nbytes == spec.d_sae * (spec.d_in + 1) * 4


def test_cosine_index_keeps_float32_precision(spec):
    """A bfloat16 decoder's cosines are computed in float32 on its (rounded) rows: equal to a float64 computation
    on the same rows to float32 accuracy, not to bfloat16's."""
    sae = load_sae(spec, "cpu", "bfloat16")
    query = torch.randn(spec.d_in, generator=torch.Generator().manual_seed(0))
    idx, cos = G.DecoderIndex(sae.W_dec).top_cosine(query, 20)
    rows = sae.W_dec.detach().double()
    want = (rows @ query.double()) / rows.norm(dim=1) / query.double().norm()
    # float32 dot products of length d_in: |error| <= d_in * 2**-24 (worst case), far below bfloat16's 2**-8
    tol = spec.d_in * 2.0**-24
    assert torch.allclose(torch.tensor(cos, dtype=torch.float64), want[idx], rtol=0, atol=tol)
    assert (want[idx] >= want.sort(descending=True).values[19] - 2 * tol).all()
