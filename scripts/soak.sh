#!/usr/bin/env bash
# Soak and churn test of `loramux serve` on loopback (issue #11; details in scripts/soak.py).
#
#   scripts/soak.sh [CLIENTS] [SECONDS] [soak.py options...]     default: 64 clients, 600 s
#
# Serves the default model (smollm2-135m, pulled into the cache if missing) with 10 adapters
# in a --lora-dir and 3 more an admin thread loads and unloads every few seconds; CLIENTS
# clients send chat and completion requests, streaming and not, some hanging up mid-stream,
# some over the context. Writes results/soak/{soak.json,soak.txt,server.log} (and
# latency.png when matplotlib is importable). Exits non-zero on any unexpected error, a server
# that does not return to idle (KV usage 0, nothing running), RSS growth after warm-up beyond
# 1.25 x + 64 MiB, or a SIGTERM that does not exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "soak: needs python3" >&2; exit 2; }
# The binary must be the source's (a no-op when it is up to date).
cargo build --release --locked
./target/release/loramux models pull smollm2-135m --quiet
exec python3 scripts/soak.py "$@"
