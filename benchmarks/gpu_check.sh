#!/usr/bin/env bash
# One-shot GPU check: golden parity on the device, kernel / sync counts, forward times at 448 and 1024 px, a reduced
# scaling sweep under a 24 GB cap with its figure, and a JSON summary, all in one output folder.
#
#   bash benchmarks/gpu_check.sh [--device cuda|cuda:N|cpu] [--quick] [--out DIR] [--cap-gb 24]
#
# Runs with $PYTHON, else this checkout's .venv, else python3.  Where upbench or its pure-Python dependencies are
# missing (e.g. a GPU machine with only PyTorch, timm, torchmetrics, pandas, seaborn), it makes a virtual environment
# that sees the system's packages ($UPBENCH_GPU_VENV, default .gpu-venv) and installs them there offline from
# benchmarks/wheels (see benchmarks/wheels/README.md to rebuild that folder).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PY="$root/.venv/bin/python"; else PY="python3"; fi
fi
check='import hydra, omegaconf, upbench.upsamplers, upbench.launches'
if ! "$PY" -c "$check" 2>/dev/null; then
  venv="${UPBENCH_GPU_VENV:-$root/.gpu-venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "gpu_check: installing upbench and its missing pure-Python dependencies into $venv (offline)" >&2
    "$PY" -m venv --system-site-packages "$venv"
  fi
  PY="$venv/bin/python"
  if ! "$PY" -c "$check" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$here/wheels" hydra-core omegaconf antlr4-python3-runtime \
      submitit cloudpickle
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$root"
  fi
fi
exec "$PY" "$here/gpu_check.py" "$@"
