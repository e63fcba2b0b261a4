"""Smoke test of the benchmark harness at a tiny size: the baseline, the load loop, the tables, the README splice.

No timing assertions: this checks that the harness runs and that its baseline computes the right thing.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from benchmarks import report, run
from benchmarks.baseline import Baseline
from benchmarks.load import run_concurrent
from benchmarks.shapes import SHAPES, ensure_pack
from benchmarks.workloads import WORKLOADS, make_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    shape = SHAPES["tiny"]
    return shape, ensure_pack(shape, tmp_path_factory.mktemp("bench"))


def test_baseline_and_load_loop(tiny, monkeypatch):
    shape, pack = tiny
    monkeypatch.setattr("benchmarks.workloads.STEER_TOKENS", 2)
    from deployments.engine.pack import load_tokenizer

    prompts = make_prompts(load_tokenizer(pack / "model"), shape, 6)
    lo, hi = shape.prompt_tokens
    assert all(lo <= n for _, n in prompts)
    cells = run.run_baseline(pack, shape, list(WORKLOADS.values()), prompts, n=2, max_seconds=30, device="cpu", steer_n=1)
    assert set(cells) == set(WORKLOADS)
    assert all(c.requests >= 1 and c.units > 0 for c in cells.values())

    b = Baseline(pack, shape)

    async def send(i):  # the in-process load loop, driving the baseline from threads
        text, ntok = prompts[i % len(prompts)]
        await asyncio.to_thread(b.run, WORKLOADS["all-1"], text, i)
        return True, ntok, None

    svc = asyncio.run(run_concurrent("all-1", send, n=4, concurrency=2, max_seconds=30, warmup=1))
    assert svc.requests == 4 and svc.errors == 0 and len(svc.latencies_ms) == 4

    result = {"shape": shape.name, "machine": {"device": "cpu"}, "settings": {"prompt_tokens": [lo, hi]},
              "baseline": {k: v.summary() for k, v in cells.items()}, "service": [svc.summary()], "steer_served": False}
    result["service"] = run.ratios(result["baseline"], result["service"])
    result["targets"] = run.check_targets(result)
    table = run.markdown_table(result)
    assert "activation/all, 1 SAE" in table and "baseline" in table
    json.dumps(result)  # serialisable

    readme = "# x\n\n## Performance\n\n<!-- perf:begin -->\nold\n<!-- perf:end -->\n\n## Tests\n"
    section = report.render([result])
    out = report.splice(readme, section)
    assert "old" not in out and "activation/all, 1 SAE" in out and out.endswith("## Tests\n")
    no_markers = report.splice("# x\n\n## Tests\n", section)
    assert no_markers.index("<!-- perf:begin -->") < no_markers.index("## Tests")


def test_baseline_matches_reference(tiny):
    """The baseline's activation/all top features are the brute-force reference's."""
    from tests import reference

    shape, pack = tiny
    b = Baseline(pack, shape)
    text = "the cat sat on the mat"
    got = b.run(WORKLOADS["all-1"], text, 0)["activations"]
    _, _, feats = reference.feature_acts(str(pack), text, shape.set_name, shape.single_layer)
    want = reference.ranked([feats], 5, [], ignore_bos=True)
    assert [r["index"] for r in got[:5]] == [r[1] for r in want]
    torch.testing.assert_close(torch.tensor([r["max_value"] for r in got[:5]]), torch.tensor([r[2] for r in want]))


def test_targets_take_the_lower_bar_and_name_the_shape():
    """Demo all-set at c=16 must reach the lower of 2x the baseline and 75% of tokenize's req/s (issue 14)."""
    def result(all_rps):
        svc = [{"workload": "tokenize", "concurrency": 16, "rps": 100.0, "rps_ratio": 0.5},
               {"workload": "all-set", "concurrency": 16, "rps": all_rps, "rps_ratio": all_rps / 40.0},
               {"workload": "all-set", "concurrency": 1, "rps": 10.0, "rps_ratio": 0.4, "added_p50_ms": 12.0}]
        return {"shape": "demo", "service": svc}

    miss = {c["target"]: c for c in run.check_targets(result(70.0))}
    bar = next(c for t, c in miss.items() if t.startswith("all-set req/s"))
    assert "= 75.0" in bar["target"] and not bar["ok"]  # min(2 x 40, 0.75 x 100) = 75
    assert next(c for t, c in miss.items() if "added p50" in t)["ok"]
    assert next(c for c in run.check_targets(result(76.0)) if c["target"].startswith("all-set req/s"))["ok"]
    assert run.check_targets({"shape": "tiny", "service": result(76.0)["service"]}) == []
