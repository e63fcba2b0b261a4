"""Self-contained slow checks that run in a background thread of the test session while the other tests run.

Why: the suite is CPU-bound on 2 cores only about 70% of the time; the rest it waits (on HTTP answers, on a Ray
node or replica coming up, on a subprocess that runs on one core). A few checks need nothing of the session: each
starts processes of its own (a multi-node Ray cluster, the real ``neuronpedia-server`` with its own Ray, the GPU
check's dry run) and only waits on them. They start as soon as collection ends (or their gate opens), one after another in one thread,
and the test that owns a check waits for its outcome (``result``): the same assertions, the same failures, but their
minutes overlap the rest of the suite instead of adding to it.

A check is a plain function registered with ``@check(name)`` in its test module; a test that uses it carries
``@pytest.mark.background(name)`` and calls ``result(name)``. Only checks some selected test uses are run (tests/
conftest.py starts them). A check never prints (its output would land in whichever test is being captured): it
returns what its test prints. A check that must not start before a point of the session names a gate, which the
session opens (``open_gate``) once its tests have passed that point; see the gates below.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

# Gates, opened by tests/conftest.py as the session passes a point:
# - the port of Ray's job agent (52365, which ray.init cannot move) is free for other Rays. The README's `make serve`
#   must be the Ray that holds it (its `ray job submit` cases need it), so a check that starts a plain ray.init Ray
#   waits until the README's tests (the first ones) are over.
JOB_AGENT_PORT = "job-agent-port"
# - the autoscaling test is over. Its scale-out has a time bound, and a check that starts several Ray nodes competes
#   for the same 2 cores; after it the suite waits on HTTP more than it computes, which is when such a check is cheap.
AFTER_AUTOSCALING = "after-autoscaling"


@dataclass
class Check:
    name: str
    fn: Callable[..., Any]
    order: int
    gate: str | None
    prepare: Callable[[], Any] | None = None  # run in the main thread when scheduled; its value is fn's argument
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None

    def run(self, prepared: tuple = ()) -> None:
        try:
            self.value = self.fn(*prepared)
        except BaseException as e:  # noqa: BLE001 - handed to the test that owns the check
            self.error = e
        finally:
            self.done.set()


CHECKS: dict[str, Check] = {}
_cond = threading.Condition()
_open: set[str] = set()
_scheduled: set[str] = set()


def check(name: str, *, order: int = 0, gate: str | None = None, prepare: Callable[[], Any] | None = None):
    """Register ``fn`` as the background check ``name``; of the checks whose gate is open, the lowest ``order`` runs
    first. Work that touches process-wide state (torch's global RNG: TransformerLens seeds it when it builds a
    model) must not run beside the foreground tests: put it in ``prepare``, which runs in the main thread when the
    check is scheduled and whose value ``fn`` receives."""
    def register(fn):
        CHECKS[name] = Check(name, fn, order, gate, prepare)
        return fn
    return register


def open_gate(name: str) -> None:
    with _cond:
        if name not in _open:
            _open.add(name)
            _cond.notify_all()


def start(names) -> None:
    """Run the named checks (those not yet scheduled) in a daemon thread, one at a time: the foreground never
    competes with more than one of them."""
    with _cond:
        todo = sorted((CHECKS[n] for n in set(names) - _scheduled), key=lambda c: c.order)
        _scheduled.update(c.name for c in todo)
    if not todo:
        return
    prepared = {}
    for c in todo:
        if c.prepare is not None:
            try:
                prepared[c.name] = (c.prepare(),)
            except BaseException as e:  # noqa: BLE001 - the check's test reports it
                c.error = e
                c.done.set()
    todo = [c for c in todo if not c.done.is_set()]

    def worker():
        while todo:
            with _cond:
                while not (ready := [c for c in todo if c.gate is None or c.gate in _open]):
                    _cond.wait()
            todo.remove(ready[0])
            ready[0].run(prepared.get(ready[0].name, ()))

    threading.Thread(target=worker, name="background-checks", daemon=True).start()


def result(name: str, timeout_s: float = 840) -> Any:
    """The check's return value, waiting for it (started now if nothing started it); its exception re-raised."""
    c = CHECKS[name]
    start([name])
    if not c.done.wait(timeout_s):
        raise TimeoutError(f"background check {name!r} not finished within {timeout_s:.0f} s of its test starting "
                           f"(gate {c.gate!r} {'open' if c.gate in _open else 'still closed'})")
    if c.error is not None:
        raise c.error
    return c.value
