#!/usr/bin/env bash
# Injected faults against a live `loramux serve` (issue #11; scenarios in scripts/faults.py).
#
#   scripts/faults.sh [SCENARIO...]      default: all; results/faults/{faults.json,faults.txt,*.server.log}
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "faults: needs python3" >&2; exit 2; }
# The binary must be the source's (a no-op when it is up to date).
cargo build --release --locked
./target/release/loramux models pull smollm2-135m --quiet
exec python3 scripts/faults.py "$@"
