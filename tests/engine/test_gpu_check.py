"""The GPU check's pieces on the CPU: scripts/gpu_check.sh --dry-run (the same python entry points: the GPU tests'
runner, the benchmark harness, the report), its budget, the bundle's unpacking, and the gemma-2-2b benchmark shape's
machinery (synthetic vocabulary, random fill, bfloat16 baseline) at a small size. The dry run that writes the report
runs in the session's background (tests/background.py) from the start of the run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from tests import background

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns from $OUT


def _dry_run(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAESERVE_BENCH_DIR": str(out.parent / "bench")}
    return subprocess.run([str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# No Ray in a dry run (the service is off): nothing to wait for before it starts.
@background.check("gpu-dry-run", order=2)
def dry_run_report() -> tuple[subprocess.CompletedProcess, Path]:
    out = Path(tempfile.mkdtemp(prefix="gpu-dry-")) / "out"
    return _dry_run(out, "--steps", "tests,bench-gpt2-small", "--budget-s", "300",
                    "--pytest-args", "-k health_check_and_sae_budget"), out


@pytest.mark.background("gpu-dry-run")
def test_dry_run_writes_the_report():
    r, out = background.result("gpu-dry-run")
    try:
        check_report(r, out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def check_report(r: subprocess.CompletedProcess, out: Path) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(NAME_OK.match(f) for f in files), files
    assert {"summary.json", "summary.md", "run.log", "pytest.log", "gpt2-small-cpu.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["device"] == "cpu"
    tests = summary["steps"]["tests"]
    assert tests["status"] == "ok" and tests["counts"]["passed"] == 1 and tests["counts"]["failed"] == 0
    assert [t["test"] for t in tests["tests"]] == ["test_cuda_behaviour::test_health_check_and_sae_budget_on_the_device"]
    bench = summary["steps"]["bench-gpt2-small"]
    assert bench["status"] == "ok" and bench["json"] == "gpt2-small-cpu.json" and bench["service"] is False
    data = json.loads((out / "gpt2-small-cpu.json").read_text())
    assert data["shape"] == "tiny" and set(data["baseline"]) == {"tokenize", "all-1", "all-3", "all-set", "single", "topk", "steer"}
    md = (out / "summary.md").read_text()
    assert "| tests | ok |" in md and "activation/all, 1 SAE — **baseline**" in md


def test_dry_run_skips_steps_past_the_budget(tmp_path):
    out = tmp_path / "out"
    r = _dry_run(out, "--steps", "tests,bench-gemma-2-2b", "--budget-s", "20")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["tests"]["status"] == "skipped" and "left of the budget" in steps["tests"]["why"]
    assert steps["bench-gemma-2-2b"]["status"] == "skipped"


def test_gpu_targets_read_the_right_cells():
    from scripts.gpu_check import gpu_targets

    result = {"service": [
        {"workload": "steer", "concurrency": 16, "tps_ratio": 12.5, "rps_ratio": 12.5},
        {"workload": "steer", "concurrency": 8, "tps_ratio": 30.0, "rps_ratio": 30.0},
        {"workload": "all-3", "concurrency": 16, "tps_ratio": 4.0, "rps_ratio": 4.0},
    ]}
    got = {t["target"].split(" ")[0]: (t["value"], t["ok"]) for t in gpu_targets(result)}
    assert got == {"steer/completion": (12.5, True), "all-3": (4.0, False)}


def test_bundle_unpack_keeps_programs_runnable_and_drops_what_serve_never_loads(tmp_path):
    from scripts.gpu_bundle import STUBS, unpack

    whl = tmp_path / "ray-0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, mode in (("ray/core/src/ray/raylet/raylet", 0o755), ("ray/__init__.py", 0o644),
                           ("ray/jars/ray_dist.jar", 0o644), ("ray/rllib/x.py", 0o644)):
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, "#!/bin/sh\n")
    site = tmp_path / "site"
    assert unpack([whl], site) == 2
    assert os.access(site / "ray/core/src/ray/raylet/raylet", os.X_OK)
    assert not (site / "ray/jars").exists() and not (site / "ray/rllib").exists()
    assert all((site / rel).is_file() for rel in STUBS)


def test_synthetic_vocabulary_has_the_exact_size_and_whole_words():
    from benchmarks.shapes import synthetic_bpe
    from benchmarks.workloads import _WORDS

    tok = synthetic_bpe(3000)
    assert len(tok) == 3000
    for w in _WORDS[:20]:
        assert len(tok(w)["input_ids"]) == 2 and len(tok("the " + w)["input_ids"]) == 3  # BOS + whole words
    assert tok.decode(tok("the cat runs")["input_ids"], skip_special_tokens=True) == "the cat runs"


def test_gemma_shaped_pack_at_a_small_size(tmp_path):
    """The gemma-2-2b shape's architecture flags, vocabulary and random fill, shrunk: the pack loads, serves a
    capture in bfloat16, and the bfloat16 baseline answers a request."""
    from benchmarks.baseline import Baseline
    from benchmarks.shapes import SHAPES, ensure_pack
    from benchmarks.workloads import WORKLOADS
    from deployments.engine.capture import CaptureRequest, ModelRunner
    from deployments.engine.loading import load_model

    big = SHAPES["gemma-2-2b"]
    assert big.cfg["original_architecture"] == "Gemma2ForCausalLM" and big.vocab_size == 256000 and big.dtype == "bfloat16"
    cfg = dict(big.cfg, n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, rotary_dim=16, n_key_value_heads=2,
               attn_types=["local", "global"], n_ctx=256)
    shape = dataclasses.replace(big, name="gemma-mini", cfg=cfg, layers=(0, 1), single_layer=1, d_sae=96, vocab_size=2000)
    pack = ensure_pack(shape, tmp_path)
    model = load_model(str(pack), "cpu", "bfloat16")
    assert model.cfg.d_vocab == 2000 and model.cfg.n_key_value_heads == 2
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert float(params["blocks.0.ln1.w"].float().mean()) == 1.0 and float(params["blocks.0.attn.b_Q"].abs().max()) == 0
    assert 0.01 < float(params["blocks.0.attn.W_Q"].float().std()) < 0.03  # the filled N(0, 0.02)
    runner = ModelRunner(model)
    acts = runner.capture([CaptureRequest([model.tokenizer.bos_token_id, 5, 9, 11], ["blocks.1.hook_resid_post"])])[0]
    assert torch.isfinite(torch.from_numpy(acts["blocks.1.hook_resid_post"])).all()
    b = Baseline(pack, shape, "cpu", "bfloat16")
    assert next(b.model.parameters()).dtype == torch.bfloat16 and b.saes[1].W_enc.dtype == torch.bfloat16
    out = b.run(WORKLOADS["all-1"], "the cat sat on the mat", 0)
    assert len(out["activations"]) == 25
