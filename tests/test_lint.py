"""Static checks that catch what a test run can miss: an undefined name on a path no test reaches, an unused import.

pyflakes only (no style rules): every warning it gives on this code base is a real defect or dead code.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["deployments", "ingress", "jobs", "benchmarks", "scripts", "tests"]


def test_pyflakes_finds_nothing():
    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter

    class Collect:
        def __init__(self):
            self.lines: list[str] = []

        def write(self, s: str) -> None:
            self.lines.append(s)

    out = Collect()
    n = checkRecursive([str(REPO / p) for p in PACKAGES], Reporter(out, out))
    assert n == 0, "pyflakes:\n" + "".join(out.lines)
