"""The README stays a front door: at most 15,000 characters, and every file it points to exists (the detail it
used to hold lives in those files)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_CHARS = 15_000


def test_the_readme_fits_in_15000_characters():
    n = len(README.read_text(encoding="utf-8"))
    assert n <= MAX_CHARS, f"README.md has {n} characters (at most {MAX_CHARS}): move detail next to what it describes"


def test_every_file_the_readme_links_or_names_exists():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    named = re.findall(r"`((?:docs|cluster|benchmarks|models|examples|ingress|deployments|jobs|tests)/[\w./-]+)`", text)
    assert links and named
    missing = sorted({p for p in links + named if not (REPO / p).exists()})
    assert not missing, f"README.md points to files that do not exist: {missing}"


def test_generated_sections_live_where_their_generators_write():
    from benchmarks import report
    from scripts.demo_pack import showcase

    bench = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert report.BEGIN in bench and report.END in bench
    pack = (REPO / "models" / "demo-lm" / "README.md").read_text(encoding="utf-8")
    assert showcase.BEGIN in pack and showcase.END in pack
    build = (REPO / "scripts" / "demo_pack" / "build.py").read_text(encoding="utf-8")
    assert 'PACK / "README.md"' in build
    for marker in (report.BEGIN, showcase.BEGIN):
        assert marker not in README.read_text(encoding="utf-8")
