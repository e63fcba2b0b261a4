"""The dtype matrix: the three steering methods and generation in float32, bfloat16 and float16 against float64
math and float32 TransformerLens, with tolerances derived from each dtype's epsilon (CPU, the small random pack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.protocol import METHODS
from deployments.engine.generate import GenerationEngine, GenerationRequest, generate, tokens_of
from deployments.engine.pack import load_model_dir

from .test_generate import tl_hook

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HOOK = "blocks.0.hook_resid_post"


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    return write_random_pack(tmp_path_factory.mktemp("dtypepack"), n_layers=2, d_model=32, n_heads=4, n_ctx=96, d_sae=64,
                             vocab_size=300, seed=3)


@pytest.fixture(scope="module")
def ref_model(pack):
    return load_model_dir(pack)


@pytest.fixture(scope="module")
def vec():
    return (np.random.RandomState(0).randn(32) * 3).astype(np.float32)


def reference64(h, method, v, coeff):
    """The method's formula in float64 on the same (dtype-rounded) activations."""
    return tl_hook(method, v, coeff)(torch.as_tensor(h).double(), None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_steering_methods_round_once_to_the_dtype(dtype, method, vec):
    """float32 arithmetic, one rounding to the activations' dtype at the end: each element within one ulp of the
    float64 result (half an ulp of rounding plus float32's own error, far smaller for bf16/fp16)."""
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(3, 5, 32, generator=g) * 4).to(dtype)
    coeff = 0.5 if method == St.PROJECTION_CAP else 3.0
    ref = reference64(h, method, vec, coeff)
    n = h.shape[0]
    out = St.apply(h, method, torch.as_tensor(vec).expand(n, -1), torch.full((n,), coeff), torch.ones(n, dtype=torch.bool))
    st = St.SlotSteering(n, {"x": 32}, "cpu")
    for i in range(n):
        st.set_row(i, [St.SteerVector("x", vec, coeff, method)])
    bad = torch.zeros(n, dtype=torch.long)
    slots = st.apply("x", h, slice(0, n), None, bad)
    # one rounding to dtype (eps/2 relative) after float32 work whose error is ~1e-6 of the largest term
    tol = eps(dtype) * ref.abs() + 4 * eps(torch.float32) * float(ref.abs().max())
    for got in (out, slots):
        assert got.dtype == dtype
        assert torch.all((got.double() - ref).abs() <= tol)
    assert not bad.any()


def test_a_float16_strength_above_65504_is_not_inf():
    """Stored in float16 the coefficient 1e5 would be inf (and the residual NaN); in float32 it is just a number."""
    h = torch.zeros(1, 2, 4, dtype=torch.float16)
    v = np.array([1e-3, 0, 0, 0], dtype=np.float32)
    for method, expect in ((St.SIMPLE_ADDITIVE, 100.0), (St.PROJECTION_CAP, 0.0)):
        out = St.apply(h, method, torch.as_tensor(v)[None], torch.tensor([1e5]), torch.ones(1, dtype=torch.bool))
        assert torch.isfinite(out).all() and float(out[0, 0, 0]) == pytest.approx(expect, rel=1e-3)


def test_a_bfloat16_coefficient_is_not_rounded():
    """bfloat16 holds 1.0078125 or 1.0, not 1.004: the product is formed in float32 and rounded once."""
    h = torch.full((1, 1, 1), 1000.0, dtype=torch.bfloat16)
    v = torch.ones(1, 1)
    out = St.apply(h, St.ORTHOGONAL_DECOMP, v, torch.tensor([1.004]), torch.ones(1, dtype=torch.bool))
    assert float(out) == float(torch.tensor(1004.0).to(torch.bfloat16))  # 1004, not 1000 or 1008


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", [None, *METHODS])
def test_generation_in_each_dtype_against_float32_transformer_lens(pack, ref_model, vec, dtype, method):
    """Our logprobs along our own greedy continuation, against float32 TransformerLens teacher-forced on it.

    Tolerance: 4 eps (1 + the logprob scale) per layer. Measured here: ~9 eps (f32), ~1.5 eps (bf16, f16) at a
    scale of ~9, i.e. a margin of 4x (float32) to 25x (bfloat16) without letting a wrong result through: a wrong
    position, token or steering shifts logprobs by far more than eps(bf16) = 0.008."""
    model = ref_model if dtype == torch.float32 else load_model_dir(pack, dtype=dtype)
    coeff = 0.5 if method == St.PROJECTION_CAP else 4.0
    steering = [] if method is None else [St.SteerVector(HOOK, vec, coeff, method)]
    p = [model.tokenizer.bos_token_id] + torch.randint(3, 300, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    ev = generate(model, [GenerationRequest(tokens=p, max_new_tokens=8, stop_tokens=[], n_logprobs=3, steering=steering)])[0]
    ours = tokens_of(ev)
    assert len(ours) == 8
    hooks = [] if method is None else [(HOOK, tl_hook(method, vec, coeff))]
    with torch.no_grad(), ref_model.hooks(fwd_hooks=hooks):
        lp = torch.log_softmax(ref_model(torch.tensor([p + ours]))[0].double(), -1)
    scale = float(lp[len(p) - 1:].abs().max())
    tol = 4 * ref_model.cfg.n_layers * eps(dtype) * (1 + scale)
    for k, e in enumerate(ev):
        row = lp[len(p) - 1 + k]
        assert abs(e.logprob - float(row[e.token])) <= tol
        assert np.allclose(e.top_logprobs, row[e.top_tokens].numpy(), atol=tol)


def test_float16_overflow_fails_that_row_alone(pack):
    """A float16 residual pushed past 65504 is inf: that request gets a 400 naming the hook; its neighbour's
    tokens are exactly those it has alone."""
    model = load_model_dir(pack, dtype=torch.float16)
    p = [model.tokenizer.bos_token_id, 5, 17, 40, 9]
    unit = np.eye(32, dtype=np.float32)[0]
    hostile = GenerationRequest(tokens=p, max_new_tokens=6, stop_tokens=[], steering=[St.SteerVector(HOOK, unit, 7e4)])
    normal = GenerationRequest(tokens=p, max_new_tokens=6, stop_tokens=[], temperature=0.9, seed=4, n_logprobs=2)
    eng = GenerationEngine(model, capacity=8)
    ids = eng.add([hostile, normal])
    events, failed = [], {}
    while not eng.idle:
        res = eng.step()
        events += res.events
        failed.update(res.failed)
    err = failed[ids[0]]
    assert err.status == 400 and HOOK in err.message and "lower the strength" in err.message
    mine = [e for e in events if e.row == ids[1]]
    alone = generate(model, [normal], capacity=8)[0]
    assert tokens_of(mine) == tokens_of(alone) and [e.logprob for e in mine] == [e.logprob for e in alone]
