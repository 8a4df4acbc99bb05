#!/usr/bin/env bash
# Download, into ./.whl, the wheels that the GPU machine of `scripts/device_check.sh` lacks
# (its Python 3.12 has torch, numpy, matplotlib, tqdm, threadpoolctl and pytest; nothing can be
# downloaded there). Run here, where PyPI is reachable; the versions are those of ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl
for pkg in gymnasium farama-notifications mujoco glfw pyopengl; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$pkg==$(version "$pkg")"
done
ls -la .whl
