"""How far two answers to the same request may differ when they were computed in different batches, and a
comparator for JSON answers that allows exactly that and nothing more.

Why answers move at all: the model runs prompts batched with whatever else is in flight, right-padded to the
longest. A float32 matmul over a differently shaped batch may pick another kernel or blocking, so its sums are
added in another order. Reassociating a float32 sum of n terms moves it by at most about n * 2**-24 of the sum of
magnitudes, and in practice by ~sqrt(n) * 2**-24. Through a few layers the drift seen on the demo pack is up to
2.4e-6 of an activation's magnitude (issue 13's failure: 0.15178561 vs 0.15178525). Its natural scale is the
magnitude of the numbers in the same answer, not each number itself: an activation near 0 is a difference of
O(|x|) terms and moves by the same absolute amount as its large neighbours.

So values compare with ``|a - b| <= REL * scale + ABS``, ``scale`` = the largest magnitude in the same list (or
the same ranking). REL = 1e-5 is 4x the largest drift ever seen and 170 float32 ulps of the scale; ABS = 1e-6
covers answers whose values are all ~0.

What a drift of that size can change besides values, and what this comparator accepts for it:
- the order of two ranked entries whose scores are within tolerance (a near tie), and which of them makes the
  cut at the end of a top-k list;
- the argmax position (``max_value_index``) when two positions hold values within tolerance, and with it the
  DFA row (which is computed at that position);
- whether an activation that is ~0 is reported at all (``activeFeatures`` holds non-zeros only).
Everything else (token strings, ids, lengths, sources, flags, generated text) must be equal exactly.
"""

from __future__ import annotations

import math
from typing import Any

REL = 1e-5
ABS = 1e-6

# Ranked lists: the key holding each entry's score; the keys naming what an entry is.
# Sums first: a ranking by sum over sort_by_token_indexes also carries (unsorted) maxima; all-zero sums rank nothing.
SCORE_KEYS = ("sum_values", "sumValues", "max_value", "maxValue", "activation_value", "cosine_similarity", "activation",
              "score")
RANK_KEYS = ("rank",)  # an entry's position, which a near tie may change
IDENTITY_KEYS = ("source", "layer", "index", "feature_index", "feature", "text", "token_index")
ARGMAX_KEYS = ("max_value_index", "maxValueIndex")
ARGMAX_DEPENDENT = ("dfa_values", "dfa_max_value", "dfa_target_index", "dfaValues", "dfaMaxValue", "dfaTargetIndex")
SPARSE_KEYS = ("activeFeatures", "active_features")


def close(a: float, b: float, scale: float = 0.0) -> bool:
    """Within float32 batch drift of each other, for numbers whose natural magnitude is ``scale``."""
    if isinstance(a, float) and isinstance(b, float) and (math.isnan(a) or math.isnan(b)):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL * max(abs(a), abs(b), scale) + ABS


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _magnitude(xs) -> float:
    nums = [abs(x) for x in xs if _is_num(x) and math.isfinite(x)]
    return max(nums, default=0.0)


def _score_key(entries: list) -> str | None:
    """The key a list of entries is ranked by: present in every entry, not all zero, non-increasing."""
    if not entries or not all(isinstance(e, dict) for e in entries):
        return None
    for k in SCORE_KEYS:
        if not all(k in e and _is_num(e[k]) for e in entries):
            continue
        scores = [e[k] for e in entries]
        s = _magnitude(scores)
        if any(scores) and all(x >= y or close(x, y, s) for x, y in zip(scores, scores[1:])):
            return k
    return None


def _identity(e: dict):
    return tuple((k, repr(e[k])) for k in IDENTITY_KEYS if k in e)


class Mismatch(AssertionError):
    pass


def assert_same_answer(a: Any, b: Any, path: str = "$", scale: float = 0.0) -> None:
    """``a`` and ``b`` (JSON trees) are the same answer up to float32 batch drift (see the module docstring)."""
    if _is_num(a) and _is_num(b):
        if isinstance(a, int) and isinstance(b, int):
            if a != b:
                raise Mismatch(f"{path}: {a!r} vs {b!r}")
        elif not close(float(a), float(b), scale):
            raise Mismatch(f"{path}: {a!r} vs {b!r} (scale {scale:g}, rel {REL}, abs {ABS})")
        return
    if isinstance(a, dict):
        _dicts(a, b, path, scale)
    elif isinstance(a, list):
        _lists(a, b, path, scale)
    elif a != b:
        raise Mismatch(f"{path}: {a!r} vs {b!r}")


def _lists(a, b, path, scale):
    if not isinstance(b, list):
        raise Mismatch(f"{path}: list vs {b!r}")
    key = _score_key(a)
    if key is not None and key == _score_key(b):
        return _ranked(a, b, key, path, scale)
    if len(a) != len(b):
        raise Mismatch(f"{path}: length {len(a)} vs {len(b)}")
    inner = max(scale, _magnitude(a), _magnitude(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert_same_answer(x, y, f"{path}[{i}]", inner)


def _ranked(a: list, b: list, key: str, path: str, scale: float) -> None:
    """A ranking: scores equal position by position; entries may swap within a near tie, and at the cut-off an
    entry tied with the last one may be replaced by another."""
    if len(a) != len(b):
        raise Mismatch(f"{path}: {len(a)} ranked entries vs {len(b)}")
    s = max(scale, _magnitude(e[key] for e in a), _magnitude(e[key] for e in b))
    for i, (x, y) in enumerate(zip(a, b)):
        if not close(x[key], y[key], s):
            raise Mismatch(f"{path}[{i}].{key}: {x[key]!r} vs {y[key]!r} (scale {s:g})")
    by_id = {_identity(y): (j, y) for j, y in enumerate(b)}
    for i, x in enumerate(a):
        j, y = by_id.get(_identity(x), (None, None))
        if y is None:
            last = a[-1][key]
            if not close(x[key], last, s):
                raise Mismatch(f"{path}[{i}]: {dict(_identity(x))} is missing from the other ranking, and its score "
                               f"{x[key]!r} is not tied with the cut-off {last!r}")
            continue
        if i != j and not close(x[key], a[j][key], s):
            raise Mismatch(f"{path}[{i}]: {dict(_identity(x))} ranked {i} vs {j}, which is no near tie")
        assert_same_answer({k: v for k, v in x.items() if k not in RANK_KEYS},
                           {k: v for k, v in y.items() if k not in RANK_KEYS}, f"{path}[{i}]", s)


def _dicts(a: dict, b: dict, path: str, scale: float) -> None:
    if not isinstance(b, dict) or a.keys() != b.keys():
        raise Mismatch(f"{path}: keys {sorted(a)} vs {sorted(b) if isinstance(b, dict) else b!r}")
    skip: set[str] = set()
    for k in ARGMAX_KEYS:
        if k in a and a[k] != b[k]:
            values = a.get("values")
            mx = a.get("max_value", a.get("maxValue"))
            if values is None or mx is None:
                raise Mismatch(f"{path}.{k}: {a[k]!r} vs {b[k]!r}")
            s = max(scale, _magnitude(values))
            if not (close(values[a[k]], mx, s) and close(values[b[k]], mx, s)):
                raise Mismatch(f"{path}.{k}: {a[k]!r} vs {b[k]!r}, and they are not a near tie in values")
            skip |= {k, *ARGMAX_DEPENDENT}  # DFA is computed at the argmax: a different (tied) position, other numbers
    for k in a:
        if k in skip:
            continue
        if k in SPARSE_KEYS:
            _sparse(a[k], b[k], f"{path}.{k}", scale)
        else:
            assert_same_answer(a[k], b[k], f"{path}.{k}", scale)


def _sparse(a: dict, b: dict, path: str, scale: float) -> None:
    """``{"<feature>": [[position, value], ...]}`` of non-zeros: an entry ~0 may be present on one side only."""
    ea = {(f, p): v for f, pv in a.items() for p, v in pv}
    eb = {(f, p): v for f, pv in b.items() for p, v in pv}
    s = max(scale, _magnitude(ea.values()), _magnitude(eb.values()))
    for k in ea.keys() | eb.keys():
        x, y = ea.get(k, 0.0), eb.get(k, 0.0)
        if not close(x, y, s):
            raise Mismatch(f"{path}[{k[0]!r}] at position {k[1]}: {x!r} vs {y!r} (scale {s:g})")


def is_first_argmax_up_to_drift(values: list[float], index: int) -> bool:
    """``index`` holds the maximum of ``values`` up to batch drift, and no earlier position is clearly larger
    (the reported argmax is the first one; a near tie may make another position first)."""
    s = _magnitude(values)
    top = max(values)
    return close(values[index], top, s) and all(v <= top or close(v, top, s) for v in values[:index])


def assert_same_ranking(got: list[tuple], want: list[tuple]) -> None:
    """Two rankings given as ``(identity, score)`` pairs, best first: the same up to near ties."""
    assert_same_answer([{"index": repr(i), "score": float(v)} for i, v in got],
                       [{"index": repr(i), "score": float(v)} for i, v in want])


def same_ranking(got: list[tuple], want: list[tuple]) -> bool:
    try:
        assert_same_ranking(got, want)
    except Mismatch:
        return False
    return True


def same_answer(a, b) -> bool:
    try:
        assert_same_answer(a, b)
    except Mismatch:
        return False
    return True
