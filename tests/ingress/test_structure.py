"""The ingress's shape: no torch, no import cycles, and every endpoint declared once is a route, a handle method
and a handler."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_app_does_not_import_torch():
    code = "import sys, ingress.app; print('torch' in sys.modules, 'deployments.engine.features' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"], out.stdout


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at module level (relative or absolute)."""
    mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy on purpose
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n == package or n.startswith(package + ".")}
    return out


def test_no_import_cycles_in_the_ingress():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "ingress").rglob("*.py")}
    graph = {m: {t for t in _imports(p, "ingress") if t in files and t != m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_endpoint_is_a_route_a_handle_method_and_a_handler():
    from ingress import handlers as H
    from ingress.app import SAEServeIngress, app
    from ingress.endpoints import ENDPOINTS

    areas = {"activation": H.ActivationHandler, "util": H.UtilHandler, "steer": H.SteerHandler, "legacy": H.LegacyHandler,
             "lens": H.LensHandler}
    cls = SAEServeIngress.func_or_class
    paths = app.openapi()["paths"]
    assert len({e.name for e in ENDPOINTS}) == len(ENDPOINTS) and len({e.path for e in ENDPOINTS}) == len(ENDPOINTS)
    for e in ENDPOINTS:
        assert e.method.lower() in paths[e.path], e.path
        area, _, name = e.handler.partition(".")
        assert callable(getattr(areas[area], name, None)), e.handler
        assert hasattr(cls, e.name) == e.handle, e.name
