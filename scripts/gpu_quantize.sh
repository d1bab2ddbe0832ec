#!/usr/bin/env bash
# `pq-lightning quantize` end to end on a GPU machine with the real SmolLM2-135M-Instruct, at the
# protocol size (64 x 512 WikiText-2 validation tokens, KL on WikiText-2 raw test), 4.5 and 6.0 bpp:
# wall time per stage and the KL figures, to compare with the same config on the CPU (README).
#
# A device call carries at most 64 MiB and the GGUF is 98 MB, so it travels in two halves, one per
# call, while the machine stays warm between them (30 s):
#
# ---- 1. Once, on the CPU machine --------------------------------------------------------------
#
#     bash scripts/gpu_check.sh --prepare        # the wheels the device image lacks (.whl/)
#     bash scripts/gpu_quantize.sh --prepare     # .carry/gguf1, .carry/gguf2, .carry/data (git-ignored)
#
# ---- 2. In the GPU session: two device calls, the second right after the first -----------------
#
#     run(command="bash scripts/gpu_check.sh", carry=[".whl", "out/gpu_check_assets", ".carry/gguf1"])
#     run(command="bash scripts/gpu_quantize.sh", carry=[".whl", ".carry/gguf2", ".carry/data"])
#
#   The second call joins the halves, checks the sha256, installs what the image lacks (as
#   gpu_check.sh) and runs quantize; $OUT gets report.md, report.json and the log. If the first half
#   is gone (the machine was given back in between), it says so and exits 3.
#   Extra arguments go to `pq-lightning quantize` (e.g. `--target_bits 6.0`). With GPU_QUANTIZE_AB set
#   (e.g. GPU_QUANTIZE_AB="--tune.codes_lr 0.01;--tune.codes_lr 0.03") the same call then reruns a copy
#   of the output folder per ';'-separated entry with its arguments added (cached stages reused),
#   reports in $OUT/b1, $OUT/b2...
#
#   `bash scripts/gpu_quantize.sh --random-weights` (carry [".whl", "out/gpu_check_assets"]): one call,
#   the same chain (every stage, norm tuning included) on SmolLM2's shapes with random weights and
#   small sizes: whether everything runs on the GPU, not what quality it gives.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ "${1:-}" = "--prepare" ]; then
  set -e
  PY=${PYTHON:-.venv/bin/python}
  src=$("$PY" -c "from pq_lightning.embedded import gguf_path, DEFAULT_EMBEDDED; print(gguf_path(DEFAULT_EMBEDDED))")
  echo "$GGUF_SHA256  $src" | sha256sum -c --quiet
  rm -rf .carry && mkdir -p .carry/gguf1 .carry/gguf2 .carry/data
  half=$(( ($(stat -c %s "$src") + 1) / 2 ))
  head -c "$half" "$src" > .carry/gguf1/part
  tail -c +"$((half + 1))" "$src" > .carry/gguf2/part
  cp ../shared/data/wikitext-2-valid-tokenized.txt ../shared/data/wikitext-2-raw-test.txt .carry/data/
  du -sh .carry/*
  exit 0
fi

OUT_DIR=${OUT:-$ROOT/out/gpu_quantize}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

run_quantize() {  # run_quantize OUTPUT_DIR CONFIG QUANTIZE-ARGS...: quantize on the GPU, its report copied to $OUT
  local out=$1 config=$2 rc
  shift 2
  set -x
  # run from /tmp: in the checkout, python would import the bare source folder instead of the install
  time (cd /tmp && timeout --signal=INT --kill-after=20 "${GPU_QUANTIZE_TIMEOUT:-400}" "$PY" -m pq_lightning.cli \
    quantize --config "$config" --trainer.accelerator gpu --target_bits '[4.5,6.0]' --output_dir "$out" "$@")
  rc=$?
  set +x
  cp "$out/report.md" "$out/report.json" "$OUT_DIR"/ 2>/dev/null
  [ $rc -eq 124 ] && echo "gpu_quantize.sh: quantize was stopped after ${GPU_QUANTIZE_TIMEOUT:-400} s"
  echo "== quantize exit code $rc"
  return $rc
}

{
  echo "== machine"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if [ "${1:-}" = "--random-weights" ]; then
    # the same chain on SmolLM2's shapes with random weights (config and tokenizer from
    # out/gpu_check_assets, `gpu_check.sh --prepare`): one call, every stage on the GPU, KL meaningless
    shift
    source scripts/device_install.sh
    device_install "$PY" || exit 5
    (cd /tmp && "$PY" - "$ROOT/out/gpu_check_assets/smollm2-135m" /tmp/pq-random <<'PYEOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
model.save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PYEOF
    ) || exit 6
    run_quantize /tmp/pq-out-random "$ROOT/configs/smollm2-135m.yaml" --model /tmp/pq-random \
      --calibration.num_samples 16 --calibration.seqlen 128 --evaluation.max_windows 4 "$@"
    exit $?
  fi
  if [ ! -f .carry/gguf1/part ] || [ ! -f .carry/gguf2/part ]; then
    echo "gpu_quantize.sh: a half of the GGUF is missing ($(ls .carry 2>/dev/null | tr '\n' ' ')); carry .carry/gguf1 in" \
         "the call before this one (the machine must still be warm) and .carry/gguf2 in this one"
    exit 3
  fi
  mkdir -p /tmp/pq-model
  cat .carry/gguf1/part .carry/gguf2/part > /tmp/pq-model/$GGUF_NAME
  echo "$GGUF_SHA256  /tmp/pq-model/$GGUF_NAME" | sha256sum -c || exit 4
  source scripts/device_install.sh
  device_install "$PY" || exit 5
  real=(--model /tmp/pq-model/$GGUF_NAME --calibration.source "$ROOT/.carry/data/wikitext-2-valid-tokenized.txt"
        --evaluation.path "$ROOT/.carry/data/wikitext-2-raw-test.txt" --evaluation.max_windows 32)
  run_quantize /tmp/pq-out "$ROOT/configs/smollm2-135m-wikitext.yaml" "${real[@]}" "$@" || exit $?
  # A/B in the same call: per ';'-separated entry of GPU_QUANTIZE_AB, a copy of the output folder (its
  # caches: probe, fold, refine reused) rerun with those arguments added; reports in $OUT/b1, $OUT/b2...
  IFS=';' read -ra variants <<< "${GPU_QUANTIZE_AB:-}"
  worst=0
  for i in "${!variants[@]}"; do
    b=/tmp/pq-out-b$((i + 1))
    rm -rf "$b" && cp -r /tmp/pq-out "$b" && mkdir -p "$OUT_DIR/b$((i + 1))"
    echo "== variant b$((i + 1)): ${variants[$i]}"
    # shellcheck disable=SC2086  # each entry is a list of arguments
    OUT_DIR="$OUT_DIR/b$((i + 1))" run_quantize "$b" "$ROOT/configs/smollm2-135m-wikitext.yaml" "${real[@]}" "$@" \
      --overwrite true ${variants[$i]} || worst=$?
  done
  exit $worst
} 2>&1 | tee "$OUT_DIR/gpu_quantize.log"
exit "${PIPESTATUS[0]}"
