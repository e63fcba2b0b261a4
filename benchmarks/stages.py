"""Per-cell stage figures from the replicas' stage marks (deployments.stage_trace; ``benchmarks.run --stages``).

An ingress call's wall time splits, on average, into seven parts: the transport to the model and back
(``ingress_call`` less ``model_call``), the model's queues (``model_call`` less its forward pass and its shard
round trip: the batcher, the compute thread's queue, the fan-out), the forward pass, the transport to the shard
and back (``shard_round_trip`` less ``shard_call``), the shard's queues (``shard_call`` less ``shard_compute``),
and the shard's compute. Each is a mean per ingress call, from sums over the cell; no span is matched to another
(a forward pass that serves two calls counts once, and the model's queues absorb the overlap). The shard's split
needs one shard call per round trip (one replica holding a batch's SAEs, as in the benchmark): where a round trip
made several calls at once, their spans overlap, and those figures are left out (None): the round trip
(``shard_round_trip``, also given) is then the finest split.
"""

from __future__ import annotations

import statistics

STAGES = ("ingress_call", "model_call", "capture", "shard_round_trip", "shard_call", "shard_compute")


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
    one_call_each = len(spans["shard_call"]) == len(spans["shard_round_trip"])
    out["per_ingress_call_ms"] = {k: None if v is None else round(v, 2) for k, v in {
        "total": per["ingress_call"],
        "ingress_model_transport": per["ingress_call"] - per["model_call"],
        "model_queues": per["model_call"] - per["capture"] - per["shard_round_trip"],
        "capture": per["capture"],
        "shard_round_trip": per["shard_round_trip"],
        "model_shard_transport": per["shard_round_trip"] - per["shard_call"] if one_call_each else None,
        "shard_queues": per["shard_call"] - per["shard_compute"] if one_call_each else None,
        "shard_compute": per["shard_compute"],
    }.items()}
    model, shard = busy(spans["capture"], start, end), busy(spans["shard_compute"], start, end)
    both = _length(_intersect(model, shard))
    out["neither_computes_share"] = round(1 - (_length(model) + _length(shard) - both) / window, 3)
    out["both_compute_share"] = round(both / window, 3)
    return out


def text(s: dict) -> str:
    """The split of an ingress call and who computes when, in words (the run's log, the report)."""
    p = s["per_ingress_call_ms"]
    shard = (f"model↔shard transport {p['model_shard_transport']:.1f} + shard queues {p['shard_queues']:.1f} + "
             f"shard compute {p['shard_compute']:.1f}" if p["shard_queues"] is not None else
             f"shard round trips {p['shard_round_trip']:.1f} ({s['shard_call']['count']} shard calls in "
             f"{s['shard_round_trip']['count']} round trips)")
    # negative where a call's forward passes and shard round trips ran side by side (a call split into several
    # batches): the spans' sums then exceed the call, and "queues" is the overlap, not a wait
    q = p["model_queues"]
    queues = f"model queues {q:.1f}" if q >= 0 else f"model queues −{-q:.1f} (its passes and round trips overlapped)"
    return (f"{p['total']:.1f} ms = ingress↔model transport {p['ingress_model_transport']:.1f} + {queues} "
            f"+ forward pass {p['capture']:.1f} + {shard}; the model computes "
            f"{s['capture']['busy_share']:.0%} of the time, the shard {s['shard_compute']['busy_share']:.0%}, neither "
            f"{s['neither_computes_share']:.0%}")


def line(s: dict) -> str:
    """One line for the run's log."""
    return "  stages: an ingress call " + text(s)
