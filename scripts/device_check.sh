#!/usr/bin/env bash
# The GPU checks of issues 3 and 5 in one call (about 6 minutes), for a session lent a GPU machine
# through the `device` tool. Here first: `bash scripts/fetch_device_wheels.sh`; then
#   run(command="bash scripts/device_check.sh 2", carry=[".whl"], timeout_s=560)
# The stages' own limits add up to 120 + 2 x 100 + (60 x minutes + 60) s, below that timeout_s.
# The argument is the whole minutes of paper cheetah-vel training (CUDA graphs on) at the end.
# Writes to $OUT: the CUDA tests' output, throughput.py's JSON (and stderr) without and with CUDA
# graphs, the training log, its progress.csv and learning curve (the 8 files that come back).
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-2}
[[ $MINUTES =~ ^[0-9]+$ ]] || { echo "minutes must be a whole number, got $MINUTES"; exit 2; }
OUT=${OUT:-/tmp/device-check}
RUN=/tmp/cheetah-vel
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# nothing is rendered here, and a GPU image may lack libEGL
export PYTHONPATH=$PWD/src:/tmp/site MUJOCO_GL=disable PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, mujoco, gymnasium as g; from gymnasium.envs.mujoco import MujocoEnv
print('torch', torch.__version__, 'mujoco', mujoco.__version__, 'gymnasium', g.__version__,
      torch.cuda.get_device_name())" || exit 1

echo "== CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_graphs.py 2>&1 \
  | tee "$OUT/test_cuda.txt"
for mode in eager graphs; do
  echo "== throughput, cheetah-vel paper, $mode"
  timeout 100 python3 benchmarks/throughput.py --device cuda --skip-rss --json --steps 50 \
    --set cuda_graphs=$([ $mode = graphs ] && echo true || echo false) \
    2>"$OUT/throughput_$mode.err" | tee "$OUT/throughput_$mode.json"
done
echo "== paper cheetah-vel on the GPU, $MINUTES minutes"
rm -rf "$RUN"
keep_run() {
  cp "$RUN/progress.csv" "$OUT/cheetah-vel-progress.csv" 2>/dev/null
  cp "$RUN/plots/learning_curve.png" "$OUT/cheetah-vel-learning-curve.png" 2>/dev/null
  ls -la "$OUT"
}
# --minutes is checked after each iteration: the timeout bounds a slow first one
timeout $((MINUTES * 60 + 60)) python3 benchmarks/learning.py cheetah-vel --preset paper \
  --set device=cuda --set cuda_graphs=true --minutes "$MINUTES" --out "$RUN" 2>&1 \
  | tee "$OUT/cheetah-vel.txt"
keep_run  # (after a timeout too: set -e is off)
