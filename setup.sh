#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with torch installed FIRST and pinned (constraints.txt), so no
# later requirement can swap in a CUDA build.  Idempotent: re-running only checks what is already there.
# GPU machines: export UPBENCH_ALLOW_CUDA=1 after installing the torch/torchvision build for your CUDA into .venv.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install -c constraints.txt "torch==2.13.0"
$PIP install -c constraints.txt -e ".[dev,slurm,gen]"
if [ -z "${UPBENCH_ALLOW_CUDA:-}" ] && .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia'; then
  echo "setup: CUDA packages (nvidia-*) were installed on a CPU set-up; remove .venv and re-run" >&2
  exit 1
fi
