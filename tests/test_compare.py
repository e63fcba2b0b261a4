"""The batch-drift comparator accepts what float32 reassociation can do and nothing else (see tests/compare.py)."""

from __future__ import annotations

import copy

import pytest

from tests.compare import REL, Mismatch, assert_same_answer, is_first_argmax_up_to_drift


def answer():
    def feat(src, i, mx, at, values):
        return {"source": src, "index": i, "max_value": mx, "max_value_index": at, "sum_values": 0.0, "values": values}

    return {"tokens": ["<bos>", " the", " cat"], "activations": [
        feat("0-s", 4, 3.0, 1, [0.0, 3.0, 1.0]),
        feat("1-s", 9, 2.0, 2, [0.0, 1.5, 2.0]),
        feat("0-s", 7, 2.0, 1, [0.0, 2.0, 0.5]),
        feat("1-s", 2, 1.0, 1, [0.0, 1.0, 0.25]),
    ]}


def test_equal_and_drifted_values_pass():
    a = answer()
    assert_same_answer(a, copy.deepcopy(a))
    b = copy.deepcopy(a)
    b["activations"][0]["values"][2] *= 1 + 2e-6  # issue 13's drift
    b["activations"][0]["max_value"] *= 1 - 2e-6
    assert_same_answer(a, b)


@pytest.mark.parametrize("mutate", [
    lambda b: b["activations"][0]["values"].__setitem__(2, 1.0 + 50 * REL),  # a real difference in a value
    lambda b: b["tokens"].__setitem__(1, " dog"),
    lambda b: b["activations"].reverse(),  # an order that is no near tie
    lambda b: b["activations"].__setitem__(3, {**b["activations"][3], "index": 3, "max_value": 0.9}),  # another score
    lambda b: b["activations"][0].update(index=11),  # another feature at the top, where no tie with the cut-off is
    lambda b: b["activations"].pop(),
    lambda b: b["activations"][0].update(max_value_index=2),  # argmax moved to a clearly smaller value
])
def test_real_differences_fail(mutate):
    a = answer()
    b = copy.deepcopy(a)
    mutate(b)
    with pytest.raises(Mismatch):
        assert_same_answer(a, b)


def test_near_ties_may_swap_and_change_the_cut():
    a = answer()
    b = copy.deepcopy(a)
    b["activations"][1], b["activations"][2] = b["activations"][2], b["activations"][1]  # tied at 2.0
    assert_same_answer(a, b)
    c = copy.deepcopy(a)
    c["activations"][3] = {**c["activations"][3], "index": 5, "values": [0.0, 0.5, 1.0], "max_value_index": 2}
    assert_same_answer(a, c)  # another feature tied with the cut-off (1.0) made the top 4


def test_argmax_near_tie_and_sparse_entries():
    a = {"values": [0.0, 2.0, 2.0 * (1 + 1e-7)], "max_value": 2.0 * (1 + 1e-7), "max_value_index": 2, "dfa_values": [1.0, 0.0, 0.0]}
    b = {**a, "max_value_index": 1, "dfa_values": [0.0, 1.0, 0.0]}
    assert_same_answer(a, b)
    with pytest.raises(Mismatch):
        assert_same_answer(a, {**a, "max_value_index": 0})
    sa = {"tokens": ["a"], "activeFeatures": {"3": [[1, 2.0]], "5": [[2, 1e-7]]}}
    assert_same_answer(sa, {"tokens": ["a"], "activeFeatures": {"3": [[1, 2.0]]}})  # ~0 reported on one side only
    with pytest.raises(Mismatch):
        assert_same_answer(sa, {"tokens": ["a"], "activeFeatures": {"5": [[2, 1e-7]]}})
    assert is_first_argmax_up_to_drift([0.0, 2.0, 2.0 + 1e-7], 1) and is_first_argmax_up_to_drift([0.0, 2.0, 2.0 + 1e-7], 2)
    assert not is_first_argmax_up_to_drift([0.0, 2.0, 1.0], 2)
