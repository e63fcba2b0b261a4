"""The three steering methods' math, the per-row/per-position masks, and vector checks (Ray-free, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.protocol import METHODS
from deployments.steer_vectors import prepare_vector
from deployments.engine.errors import RequestError

torch.manual_seed(0)
B, P, D = 3, 5, 16


@pytest.fixture
def hv():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, P, D, generator=g), torch.randn(B, D, generator=g), torch.tensor([2.0, -1.5, 0.5])


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def along(h, v):  # component of h along v_hat, [B, P]
    return (h * unit(v)[:, None, :]).sum(-1)


def test_additive_adds_coeff_times_v(hv):
    h, v, c = hv
    out = St.additive(h, v, c)
    assert torch.allclose(out, h + c[:, None, None] * v[:, None, :])


def test_orthogonal_decomp_projector_idempotent_and_complement_orthogonal(hv):
    h, v, _ = hv
    ones, zeros = torch.ones(B), torch.zeros(B)
    ph = h - St.orthogonal_decomp(h, v, zeros)  # P h  (coeff 0 leaves (I-P) h)
    complement = St.orthogonal_decomp(h, v, zeros)
    # P is idempotent: P(P h) = P h
    pph = ph - St.orthogonal_decomp(ph, v, zeros)
    assert torch.allclose(pph, ph, atol=1e-5)
    # (I - P) h is orthogonal to v, and P h is parallel to it
    assert torch.allclose((complement * v[:, None, :]).sum(-1), torch.zeros(B, P), atol=1e-4)
    assert torch.allclose(ph, along(h, v)[..., None] * unit(v)[:, None, :], atol=1e-5)
    # coeff 1 is the identity; coeff c scales the component along v and keeps the rest
    assert torch.allclose(St.orthogonal_decomp(h, v, ones), h, atol=1e-5)
    c = torch.tensor([3.0, -2.0, 0.25])
    out = St.orthogonal_decomp(h, v, c)
    assert torch.allclose(along(out, v), c[:, None] * along(h, v), atol=1e-4)
    assert torch.allclose(St.orthogonal_decomp(out, v, zeros), complement, atol=1e-4)


def test_projection_cap_bounds_the_projection(hv):
    h, v, _ = hv
    h = h + 4 * unit(v)[:, None, :] * torch.linspace(-1, 1, P)[None, :, None]  # some positions above, some below
    cap = torch.tensor([0.5, 0.0, -1.0])
    out = St.projection_cap(h, v, cap)
    comp_in, comp_out = along(h, v), along(out, v)
    assert torch.all(comp_out <= cap[:, None] + 1e-5)
    below = comp_in <= cap[:, None]
    assert torch.allclose(out[below], h[below])  # already under the cap: untouched
    assert torch.allclose(comp_out[~below], cap[:, None].expand(B, P)[~below], atol=1e-5)  # above: capped exactly
    ortho = lambda x: x - along(x, v)[..., None] * unit(v)[:, None, :]
    assert torch.allclose(ortho(out), ortho(h), atol=1e-5)  # the orthogonal part never changes


@pytest.mark.parametrize("method", METHODS)
def test_inactive_rows_and_masked_positions_are_untouched(hv, method):
    h, v, c = hv
    active = torch.tensor([True, False, True])
    positions = torch.ones(B, P, dtype=torch.bool)
    positions[0, :2] = False
    if method == St.PROJECTION_CAP:
        c = c - 10  # a cap below every component, so that steering changes something
    out = St.apply(h, method, v, c, active, positions)
    assert torch.equal(out[1], h[1])
    assert torch.equal(out[0, :2], h[0, :2])
    assert not torch.allclose(out[0, 2:], h[0, 2:])
    assert not torch.allclose(out[2], h[2])


def test_rows_do_not_depend_on_each_other(hv):
    h, v, c = hv
    for method in METHODS:
        full = St.apply(h, method, v, c, torch.ones(B, dtype=torch.bool))
        for i in range(B):
            alone = St.apply(h[i:i + 1], method, v[i:i + 1], c[i:i + 1], torch.ones(1, dtype=torch.bool))
            assert torch.equal(alone[0], full[i])


def test_batch_steering_hooks_apply_each_vector_once_at_its_own_hook():
    d = 8
    v1, v2, v3 = (np.eye(d, dtype=np.float32)[k] for k in range(3))
    rows = [
        [St.SteerVector("a", v1, 2.0), St.SteerVector("b", v2, 3.0)],  # one at each hook
        [St.SteerVector("a", v1, 1.0), St.SteerVector("a", v3, 5.0, St.PROJECTION_CAP)],  # two at one hook
        [],  # DEFAULT
    ]
    bs = St.BatchSteering(rows)
    hooks = dict(bs.fwd_hooks())
    assert set(hooks) == {"a", "b"}
    h = torch.ones(3, 2, d) * 10
    a, b = hooks["a"](h.clone()), hooks["b"](h.clone())
    assert torch.equal(a[0, :, 0], torch.full((2,), 12.0)) and torch.equal(a[0, :, 1], torch.full((2,), 10.0))
    assert torch.equal(b[0, :, 1], torch.full((2,), 13.0)) and torch.equal(b[0, :, 0], torch.full((2,), 10.0))
    assert torch.allclose(a[1, :, 0], torch.full((2,), 11.0)) and torch.allclose(a[1, :, 2], torch.full((2,), 5.0))
    assert torch.equal(b[1], h[1]) and torch.equal(a[2], h[2]) and torch.equal(b[2], h[2])
    # hook_z-shaped activations are steered on the flattened heads
    z = torch.zeros(3, 2, 2, d // 2)
    assert torch.equal(hooks["a"](z)[0].reshape(2, d)[:, 0], torch.full((2,), 2.0))
    # positions mask, read at call time
    bs.positions = torch.tensor([[False, True]] * 3)
    a = hooks["a"](h.clone())
    assert torch.equal(a[0, 0], h[0, 0]) and a[0, 1, 0] == 12.0


def test_prepare_vector_checks_and_normalises():
    v = prepare_vector([3.0, 4.0], 1.0, St.SIMPLE_ADDITIVE, normalize=True)
    assert np.allclose(v, [0.6, 0.8])
    assert np.allclose(prepare_vector([3.0, 4.0], 1.0, St.SIMPLE_ADDITIVE, normalize=False), [3, 4])
    with pytest.raises(RequestError) as e:
        prepare_vector([0.0, 0.0], 1.0, St.SIMPLE_ADDITIVE, normalize=True)
    assert e.value.status == 400 and "zero vector" in e.value.message
    for method in (St.ORTHOGONAL_DECOMP, St.PROJECTION_CAP):  # no direction to project on
        with pytest.raises(RequestError):
            prepare_vector([0.0, 0.0], 1.0, method, normalize=False)
    prepare_vector([0.0, 0.0], 1.0, St.SIMPLE_ADDITIVE, normalize=False)  # adding zero is fine
    for bad in ([float("nan"), 1.0], [float("inf"), 0.0]):
        with pytest.raises(RequestError):
            prepare_vector(bad, 1.0, St.SIMPLE_ADDITIVE, normalize=False)
    with pytest.raises(RequestError):
        prepare_vector([1.0], float("inf"), St.SIMPLE_ADDITIVE, normalize=False)
    with pytest.raises(RequestError):
        prepare_vector([1e39], 1.0, St.SIMPLE_ADDITIVE, normalize=False)  # not representable in float32
