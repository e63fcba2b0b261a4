"""Per-cell stage figures from the replicas' stage marks (deployments.stage_trace; ``benchmarks.run --stages``).

An ingress call's wall time splits, on average, into the model's forward pass, the shard's compute, the hops
between the model and the shards (``shard_round_trip`` less the shard's compute), and the rest: the hops between
the ingress and the model and the queues inside the model (``ingress_call`` less the other three). Averages per
ingress call are exact sums over the cell (a forward pass that serves two calls counts once, shared between them);
no span is matched to another.
"""

from __future__ import annotations

import statistics

STAGES = ("ingress_call", "capture", "shard_round_trip", "shard_compute")


def busy(spans: list[tuple[float, float, int]], start: float, end: float) -> list[tuple[float, float]]:
    """The union of ``spans`` clipped to ``[start, end]``, as disjoint sorted intervals."""
    out: list[list[float]] = []
    for a, b, _ in sorted(spans):
        a, b = max(a, start), min(b, end)
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def summary(marks: dict[str, list[tuple[float, float, int]]], start: float, end: float) -> dict | None:
    """The cell's figures: per stage its spans that lie wholly in ``[start, end]`` (count, median and mean ms, share
    of the window it ran), the mean split of an ingress call, and the share of the window when neither the model
    nor a shard computed. None when no ingress call lies in the window."""
    window = end - start
    spans = {k: [s for s in marks.get(k, []) if s[0] >= start and s[1] <= end] for k in STAGES}
    calls = len(spans["ingress_call"])
    if not calls or window <= 0:
        return None
    out: dict = {"window_s": round(window, 3)}
    total = {}
    for k, v in spans.items():
        ms = [1000 * (b - a) for a, b, _ in v]
        total[k] = sum(ms)
        out[k] = {"count": len(v), "median_ms": round(statistics.median(ms), 2) if ms else None,
                  "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
                  "busy_share": round(_length(busy(v, start, end)) / window, 3)}
    per = {k: total[k] / calls for k in STAGES}
    out["per_ingress_call_ms"] = {
        "total": round(per["ingress_call"], 2),
        "capture": round(per["capture"], 2),
        "shard_compute": round(per["shard_compute"], 2),
        "model_shard_hops": round(per["shard_round_trip"] - per["shard_compute"], 2),
        "rest": round(per["ingress_call"] - per["capture"] - per["shard_round_trip"], 2),
    }
    model, shard = busy(spans["capture"], start, end), busy(spans["shard_compute"], start, end)
    both = _length(_intersect(model, shard))
    out["neither_computes_share"] = round(1 - (_length(model) + _length(shard) - both) / window, 3)
    out["both_compute_share"] = round(both / window, 3)
    return out


def line(s: dict) -> str:
    """One line for the run's log."""
    p = s["per_ingress_call_ms"]
    return (f"  stages: an ingress call {p['total']:.1f} ms = capture {p['capture']:.1f} + shard compute "
            f"{p['shard_compute']:.1f} + model<->shard hops {p['model_shard_hops']:.1f} + rest (ingress<->model hops, "
            f"queues) {p['rest']:.1f}; model computes {s['capture']['busy_share']:.0%} of the time, a shard "
            f"{s['shard_compute']['busy_share']:.0%}, neither {s['neither_computes_share']:.0%}")
