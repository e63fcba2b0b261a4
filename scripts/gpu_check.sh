#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine (one H100/H200, 16 cores, no network, python3 with CUDA
# torch 2.11 but no TransformerLens, SAE Lens, pydantic, FastAPI or Ray).
#
#   scripts/gpu_check.sh prepare               # HERE, with pip: .whl/site.tar.xz, the packages that machine lacks
#   scripts/gpu_check.sh                       # THERE, in the repo root, with .whl carried: writes $OUT
#   scripts/gpu_check.sh --steps tests         # a rerun of some steps (env, tests, bench-gpt2-small, bench-gemma-2-2b)
#   scripts/gpu_check.sh --dry-run --out DIR   # anywhere, on the CPU: the same python entry points, tiny sizes
#
# With the device tool:  run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=450)
# Steps, each under its own timeout inside a 400 s budget (scripts/gpu_check.py): env; tests/gpu in float32,
# bfloat16 and float16 (parity with float32 TransformerLens + SAE Lens, batch invariance at 6, 70 and 1100 tokens,
# float16 overflow isolation, OOM under a memory cap -> 503, health check on a poisoned context); the benchmark
# on the gpt2-small and gemma-2-2b shapes at concurrency 1, 8, 16, the service over HTTP on cuda when Ray Serve
# imports from the bundle. Results: summary.md, summary.json, run.log, pytest.log, <shape>-cuda.json in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == prepare ]]; then
  shift
  exec python3 scripts/gpu_bundle.py "$@"
fi

dry=0
for arg in "$@"; do [[ "$arg" == --dry-run ]] && dry=1; done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false \
       RAY_USAGE_STATS_ENABLED=0
if (( dry )); then
  PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
else
  PY="${PYTHON:-python3}"
  SITE=/tmp/saeserve-site
  if [[ -f .whl/site.tar.xz && ! -f "$SITE/.unpacked" ]]; then
    mkdir -p "$SITE" && timeout 120 tar -xJf .whl/site.tar.xz -C "$SITE" && touch "$SITE/.unpacked" \
      || echo "!! could not unpack .whl/site.tar.xz: the project's packages will be missing" >&2
  elif [[ ! -f .whl/site.tar.xz ]]; then
    echo "!! no .whl/site.tar.xz (run 'scripts/gpu_check.sh prepare' here and carry .whl): using what python3 has" >&2
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-430}" "$PY" scripts/gpu_check.py "$@"
