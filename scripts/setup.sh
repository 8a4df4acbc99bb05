#!/usr/bin/env bash
# Create ./.venv and install metapearl (editable) with its test tools.
# PyTorch is installed first, as the CPU build where one is available: set TORCH_SPEC to choose
# another (e.g. TORCH_SPEC="torch>=2.3" with PIP_INDEX_URL pointing at a CUDA or CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,mujoco,tensorboard,video}

pip_install() {
  # pip's find-links may name folders missing on this machine: drop those warnings only
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "neither a file nor a directory" >&2)
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_SPEC" || pip_install "torch>=2.3"
fi
pip_install -e ".[${EXTRAS}]"
.venv/bin/python -c "import metapearl, torch; print('metapearl', metapearl.__version__, 'torch', torch.__version__)"
