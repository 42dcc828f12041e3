#!/usr/bin/env bash
# Regenerate fixtures/stats/scipy_reference.json (numpy/scipy reference values for
# crates/bench/src/stats.rs). Uses its own small venv, outside the repo:
# ${LORAMUX_CACHE:-$HOME/.cache/loramux}/stats-venv, with pinned numpy and scipy (~100 MB).
# Idempotent: the venv is created and filled only when the pins are missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${LORAMUX_CACHE:-$HOME/.cache/loramux}"
VENV="$CACHE/stats-venv"
PYTHON="${PYTHON:-python3}"
NUMPY=2.4.6
SCIPY=1.17.1

have_pins() {
  "$VENV/bin/python" -c "
import importlib.metadata as md, sys
sys.exit(0 if (md.version('numpy'), md.version('scipy')) == ('$NUMPY', '$SCIPY') else 1)" 2>/dev/null
}

if ! { [ -x "$VENV/bin/python" ] && have_pins; }; then
  mkdir -p "$CACHE"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "numpy==$NUMPY" "scipy==$SCIPY" >&2
  have_pins || { echo "stats venv: numpy $NUMPY / scipy $SCIPY not installed" >&2; exit 1; }
fi

exec "$VENV/bin/python" "$HERE/make_stats_fixtures.py"
