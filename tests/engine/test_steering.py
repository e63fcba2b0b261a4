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


def slot_apply(st, name, h, rows=None, positions=None):
    bad = torch.zeros(h.shape[0], dtype=torch.long)
    out = st.apply(name, h, slice(0, h.shape[0]) if rows is None else rows, positions, bad)
    return out, bad


def test_slot_steering_applies_each_vector_once_at_its_own_hook():
    d = 8
    v1, v2, v3 = (np.eye(d, dtype=np.float32)[k] for k in range(3))
    st = St.SlotSteering(4, {"a": d, "b": d}, "cpu")
    st.set_row(0, [St.SteerVector("a", v1, 2.0), St.SteerVector("b", v2, 3.0)])  # one at each hook
    st.set_row(1, [St.SteerVector("a", v1, 1.0), St.SteerVector("a", v3, 5.0, St.PROJECTION_CAP)])  # two at one hook
    st.set_row(2, [])  # DEFAULT
    assert st.active_hooks == {"a", "b"}
    h = torch.ones(3, 2, d) * 10
    (a, _), (b, _) = slot_apply(st, "a", h.clone()), slot_apply(st, "b", h.clone())
    assert torch.equal(a[0, :, 0], torch.full((2,), 12.0)) and torch.equal(a[0, :, 1], torch.full((2,), 10.0))
    assert torch.equal(b[0, :, 1], torch.full((2,), 13.0)) and torch.equal(b[0, :, 0], torch.full((2,), 10.0))
    assert torch.allclose(a[1, :, 0], torch.full((2,), 11.0)) and torch.allclose(a[1, :, 2], torch.full((2,), 5.0))
    assert torch.equal(b[1], h[1]) and torch.equal(a[2], h[2]) and torch.equal(b[2], h[2])
    # hook_z-shaped activations are steered on the flattened heads
    z = torch.zeros(3, 2, 2, d // 2)
    assert torch.equal(slot_apply(st, "a", z)[0][0].reshape(2, d)[:, 0], torch.full((2,), 2.0))
    # a positions mask, and rows addressed by slot index
    a, _ = slot_apply(st, "a", h.clone(), positions=torch.tensor([[False, True]] * 3))
    assert torch.equal(a[0, 0], h[0, 0]) and a[0, 1, 0] == 12.0
    a, _ = slot_apply(st, "a", h[:2].clone(), rows=torch.tensor([2, 0]))
    assert torch.equal(a[0], h[0]) and a[1, 0, 0] == 12.0
    # rows leave and move: their tables go with them, and a cleared hook is inactive
    st.move_row(0, 3)
    a, _ = slot_apply(st, "a", h[:1].clone(), rows=torch.tensor([3]))
    assert a[0, 0, 0] == 12.0 and torch.equal(slot_apply(st, "a", h[:1].clone(), rows=torch.tensor([0]))[0], h[:1])
    st.clear_row(3)
    assert st.active_hooks == {"a"}
    st.clear_row(1)
    assert st.active_hooks == set()


@pytest.mark.parametrize("method", METHODS)
def test_slot_steering_equals_the_reference_functions(hv, method):
    """The engine's fused per-slot update against ``apply`` (float32 rounding apart: 1e-5 relative)."""
    h, v, c = hv
    if method == St.PROJECTION_CAP:
        c = c - 3
    st = St.SlotSteering(B, {"x": D}, "cpu")
    for i in range(B):
        st.set_row(i, [St.SteerVector("x", v[i].numpy(), float(c[i]), method)])
    out, bad = slot_apply(st, "x", h)
    ref = St.apply(h, method, v, c, torch.ones(B, dtype=torch.bool))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5) and not bad.any()
    for i in range(B):  # and each row alone, bit for bit
        alone, _ = slot_apply(st, "x", h[i:i + 1], rows=torch.tensor([i]))
        assert torch.equal(alone[0], out[i])


@pytest.mark.parametrize("method", [St.ORTHOGONAL_DECOMP, St.PROJECTION_CAP])
def test_a_tiny_vector_projects_like_its_direction(hv, method):
    """|v|^2 of a 1e-30 vector underflows float32: the engine normalises in float64, so only the direction counts."""
    h, v, _ = hv
    st = St.SlotSteering(2, {"x": D}, "cpu")
    st.set_row(0, [St.SteerVector("x", (v[0] * 1e-30).numpy(), 0.5, method)])
    st.set_row(1, [St.SteerVector("x", (v[0] / v[0].norm()).numpy(), 0.5, method)])
    out, bad = slot_apply(st, "x", h[:1].expand(2, P, D).clone())
    assert torch.isfinite(out).all() and not bad.any()
    assert torch.allclose(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_non_finite_steering_is_reported_for_its_row_only(hv):
    h, v, _ = hv
    st = St.SlotSteering(B, {"x": D}, "cpu")
    st.set_row(1, [St.SteerVector("x", v[1].numpy(), 3e38, St.ORTHOGONAL_DECOMP)])  # (coeff - 1) h.v overflows
    st.set_row(2, [St.SteerVector("x", v[2].numpy(), 2.0)])
    out, bad = slot_apply(st, "x", h)
    assert bad.tolist() == [0, st.hook_ids["x"], 0]
    assert torch.equal(out[0], h[0]) and torch.isfinite(out[2]).all()


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
    # finite in float64, not in the float32 arithmetic: refused before the row joins, naming the field
    with pytest.raises(RequestError, match="beyond float32"):
        prepare_vector([1.0, 0.0], 1e39, St.ORTHOGONAL_DECOMP, normalize=False, what="vectors[0]")
    with pytest.raises(RequestError, match="vectors\\[0\\].*overflows float32"):
        prepare_vector([1e30, 0.0], 1e9, St.SIMPLE_ADDITIVE, normalize=False, what="vectors[0]")
    with pytest.raises(RequestError, match="zero vector in float32"):
        prepare_vector([1e-50, 0.0], 1.0, St.PROJECTION_CAP, normalize=False)  # float32 flushes it to 0
    assert np.all(prepare_vector([1e-30, 1e-30], 1.0, St.PROJECTION_CAP, normalize=False) > 0)  # tiny is fine
