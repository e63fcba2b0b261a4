"""Stage marks (deployments.stage_trace) from the real replicas of the session's app, which run with
``SAESERVE_STAGE_TRACE`` set (tests/conftest.py), and the harness's figures from them (benchmarks.stages)."""

from __future__ import annotations

import time

from benchmarks import stages
from deployments import stage_trace
from tests.conftest import STAGE_TRACE_DIR

from .conftest import MODEL_ID


def test_the_replicas_mark_each_stage_of_an_activation_all_request(http):
    start = time.time()
    r = http.post("/v1/activation/all", json={"prompt": "The cat sat on the mat.", "model": MODEL_ID,
                                              "source_set": "res-demo", "selected_sources": [], "num_results": 5,
                                              "sort_by_token_indexes": [], "ignore_bos": True})
    end = time.time()
    assert r.status_code == 200, r.text
    marks = stage_trace.read(STAGE_TRACE_DIR)
    spans = {k: [s for s in marks.get(k, []) if start <= s[0] and s[1] <= end] for k in stages.STAGES}
    # one ingress call; inside it the model's call, and in that a forward pass then a shard round trip; inside the
    # round trip the shard's call, and in that its compute; each call carrying its caller's items (other tests may
    # run requests meanwhile: look for one such chain, not for exactly one span of each stage)
    chains = [(i, mc, c, rt, shc, sc) for i in spans["ingress_call"] for mc in spans["model_call"] for c in spans["capture"]
              for rt in spans["shard_round_trip"] for shc in spans["shard_call"] for sc in spans["shard_compute"]
              if i[0] <= mc[0] <= c[0] <= c[1] <= rt[0] <= shc[0] <= sc[0] <= sc[1] <= shc[1] <= rt[1] <= mc[1] <= i[1]
              and c[2] >= 1 and mc[2] == i[2] and 1 <= sc[2] == shc[2] <= rt[2]]
    assert chains, spans
    s = stages.summary(marks, start, end)
    p = s["per_ingress_call_ms"]
    assert p["total"] > 0 and p["capture"] > 0 and p["shard_compute"] > 0
    assert p["ingress_model_transport"] > 0  # a call's span contains its callee's
    assert 0 <= s["neither_computes_share"] <= 1 and s["ingress_call"]["count"] >= 1
