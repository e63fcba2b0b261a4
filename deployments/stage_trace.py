"""Stage timings of the feature path, for the benchmark harness (``python -m benchmarks.run --stages``).

Where a batch's wall time goes between the replicas is not visible from any one of them: a batch spends part of
its life computing (the model's forward pass, the shard's encodes) and the rest on the hops between processes.
With ``SAESERVE_STAGE_TRACE`` set to a directory in the replicas' environment, each process appends one line per
stage it runs to ``<dir>/<pid>.log``: the stage's name, its start and end (wall clock, comparable between the
processes of one machine) and its item count. Unset (the default), :func:`mark` is one global test and a return.

Stages (each a span of one process): ``ingress_call`` (an ingress batch's ModelDeployment call, sent to answered),
``model_call`` (that call inside the model replica: ``features`` entered to returned), ``capture`` (a forward pass
on the model's compute thread), ``shard_round_trip`` (the model's SAEShard calls of one batch, sent to answered),
``shard_call`` (one of them inside the shard replica: ``run`` entered to returned), ``shard_compute`` (its encodes
and rankings on the shard's compute thread). A call's span less the span of the same call inside its callee is
the transport between them: serialisation, gRPC, Serve's request handling, waiting for a core.
``benchmarks.stages`` reads them back into per-cell figures.
"""

from __future__ import annotations

import os
import threading
import time

ENV = "SAESERVE_STAGE_TRACE"

_dir = os.environ.get(ENV) or None
_file = None
_lock = threading.Lock()  # the compute threads and the event loop both mark


def now() -> float:
    """The clock of the marks (wall time: the processes' monotonic clocks are not comparable)."""
    return time.time()


def mark(stage: str, start: float, n: int = 0) -> None:
    """Record ``stage`` as running from ``start`` (a :func:`now`) until now, over ``n`` items."""
    if _dir is None:
        return
    end = time.time()
    global _file
    with _lock:
        if _file is None:
            os.makedirs(_dir, exist_ok=True)
            _file = open(os.path.join(_dir, f"{os.getpid()}.log"), "a", buffering=1)
        _file.write(f"{stage} {start:.6f} {end:.6f} {n}\n")


def read(directory: str) -> dict[str, list[tuple[float, float, int]]]:
    """Every process's marks in ``directory``: per stage, ``(start, end, n)`` sorted by start."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    out.setdefault(parts[0], []).append((float(parts[1]), float(parts[2]), int(parts[3])))
    for spans in out.values():
        spans.sort()
    return out
