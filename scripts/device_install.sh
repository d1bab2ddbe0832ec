# Sourced by scripts/gpu_check.sh and scripts/gpu_quantize.sh on a device machine (no network):
# `device_install PY` installs into /tmp/pq-site the carried wheels (.whl/, written by
# `bash scripts/gpu_check.sh --prepare`) when the image lacks compressed-tensors, gguf or jsonargparse, then
# pq-lightning itself from a copy of the sources, and puts /tmp/pq-site on PYTHONPATH.
device_install() {
  local py=$1 site=/tmp/pq-site
  if ! "$py" -c "import compressed_tensors, gguf, jsonargparse, typeshed_client, docstring_parser" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    else
      echo "device_install: compressed-tensors / gguf / jsonargparse are missing and no wheels were carried. On the CPU machine run"
      echo "  bash scripts/gpu_check.sh --prepare"
      echo "then carry .whl in the device call."
      return 1
    fi
  fi
  # imports are tried from /tmp: in the checkout, python finds the bare source folder first
  if ! (cd /tmp && PYTHONPATH="$site" "$py" -c "import pq_lightning.callbacks" 2>/dev/null); then
    # a plain (not editable) install from a copy of the sources: no network, no build/ left in the tree
    local src
    src=$(mktemp -d)
    cp -r pyproject.toml README.md pq_lightning callbacks "$src"/
    echo "== installing pq-lightning into $site"
    if ! "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$site" "$src" >"$src.log" 2>&1; then
      tail -20 "$src.log"; echo "device_install: installing pq-lightning failed (needs setuptools>=68 on the machine)"
      rm -rf "$src" "$src.log"
      return 1
    fi
    rm -rf "$src" "$src.log"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  (cd /tmp && "$py" -c "import pq_lightning.callbacks, compressed_tensors; print('pq_lightning from', pq_lightning.__file__)")
}
