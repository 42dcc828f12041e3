#!/usr/bin/env bash
# Create (or reuse) the Python reference environment used to generate golden fixtures.
# The venv lives OUTSIDE the repo: ${LORAMUX_CACHE:-$HOME/.cache/loramux}/reference-venv
# Idempotent: does nothing when the pinned versions are already installed.
# Prints the venv path on the last line of stdout.
set -euo pipefail

CACHE="${LORAMUX_CACHE:-$HOME/.cache/loramux}"
VENV="${LORAMUX_REFERENCE_VENV:-$CACHE/reference-venv}"
PYTHON="${PYTHON:-python3}"

# Pinned reference stack (verified together on CPU, see shared MODELS.md).
PINS=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "peft==0.21.2"
  "safetensors==0.8.0"
  "gguf==0.19.0"
  "accelerate==1.15.0"
  "tokenizers==0.23.3"
  "numpy==2.4.6"
  "jinja2==3.1.6"
  "sentencepiece==0.2.3"
)

check() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
want = {"torch": "2.15.0", "transformers": "5.23.0", "peft": "0.21.2",
        "safetensors": "0.8.0", "gguf": "0.19.0", "accelerate": "1.15.0",
        "tokenizers": "0.23.3", "numpy": "2.4.6"}
for k, v in want.items():
    if md.version(k) != v:
        raise SystemExit(1)
import torch, transformers, peft, tokenizers, numpy, jinja2, gguf, safetensors  # noqa
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "reference venv ok: $VENV" >&2
  echo "$VENV"
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
# A plain install of torch from PyPI pulls its CUDA runtime wheels (~3 GB); it runs fine on CPU.
"$VENV/bin/python" -m pip install "${PINS[@]}" >&2
check || { echo "reference venv: version check failed" >&2; exit 1; }
echo "reference venv ready: $VENV" >&2
echo "$VENV"
