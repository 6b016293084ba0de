#!/usr/bin/env bash
# coarpy GPU check: collection and regression speed on one GPU, as one table.
#
#   OUT=/path/to/folder bash bench/gpu.sh            # full size (CUDA; < 8 min on one H200)
#   OUT=/tmp/gpu bash bench/gpu.sh --small           # tiny, on the CPU (what CI runs)
#   OUT=/tmp/gpu bash bench/gpu.sh --only imagenet   # only setups B and C (torchvision)
#   OUT=/tmp/gpu bash bench/gpu.sh --only stream     # streamed vs on-device examples
#
# Everything goes to $OUT (default bench/out/gpu): log.txt (all output), results.md
# (the table), results.json, env.txt, nvidia-smi.txt. Extra flags go to
# bench/gpu_check.py (--budget SECONDS, --no-compile, --target-s, --threads,
# --only core|imagenet|stream). LIMIT (seconds, default 460) is the hard stop of the
# whole run.
# coarpy is imported from src/ (PYTHONPATH), so the tree needs no install; only torch
# (with CUDA), numpy, scipy and tqdm, and torchvision for the ImageNet sections (skipped
# with a note without it: nothing is installed).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
OUT="${OUT:-$root/bench/out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PY="$root/.venv/bin/python"; else PY=python3; fi
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi; } >"$OUT/nvidia-smi.txt" 2>&1 || true
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Hard stop after LIMIT seconds (7 min 40 s) whatever happens (the script stops starting
# sections at --budget, 400 s, and saves its table after every row).
timeout --signal=INT --kill-after=10 "${LIMIT:-460}" "$PY" -u "$here/gpu_check.py" --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "gpu.sh: exit $status; results in $OUT" | tee -a "$OUT/log.txt"
exit "$status"
