#!/usr/bin/env bash
# Remote adapter sources (issue #23) for real: starts an S3-compatible server (moto, from PyPI,
# in its own venv under the cache) on a free loopback port with credentials enforced, then runs
# crates/loramux/tests/sources.rs against it (S3 with right and wrong credentials, a missing key,
# a checksum mismatch, single flight, a restart served from the disk cache, credentials from the
# AWS profile files) along with its hub/https tests against a local HTTP server; then
# `scripts/replicas.sh s3`: a fleet of three replicas sharing the bucket.
#
#   tests/sources/run.sh            (what scripts/test.sh runs)
#
# Bounded: moto listens on 127.0.0.1 only, the tests are killed after 300 s, moto is always
# stopped (trap).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${LORAMUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loramux}"
VENV="$CACHE/s3-venv"
if [ ! -x "$VENV/bin/moto_server" ]; then
  echo "sources: installing moto[server] into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'moto[server]==5.2.6'
fi

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$(mktemp "${TMPDIR:-/tmp}/loramux-moto.XXXXXX.log")"
# Three calls without credentials (the IAM user, its policy, its key); every later call must sign.
INITIAL_NO_AUTH_ACTION_COUNT=3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
MOTO=$!
cleanup() {
  kill "$MOTO" 2>/dev/null || true
  wait "$MOTO" 2>/dev/null || true
  rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ENDPOINT="http://127.0.0.1:$PORT"
for _ in $(seq 100); do
  python3 -c "import urllib.request, sys; urllib.request.urlopen('$ENDPOINT/moto-api/')" 2>/dev/null && break
  kill -0 "$MOTO" 2>/dev/null || { echo "sources: moto_server exited:" >&2; cat "$LOG" >&2; exit 1; }
  sleep 0.1
done
read -r KEY_ID SECRET < <("$VENV/bin/python" tests/sources/moto_setup.py "$ENDPOINT")
echo "sources: S3 (moto) at $ENDPOINT, credentials enforced"

export LORAMUX_TEST_S3_ENDPOINT="$ENDPOINT" LORAMUX_TEST_S3_KEY_ID="$KEY_ID" LORAMUX_TEST_S3_SECRET="$SECRET" LORAMUX_TEST_S3_BUCKET=loramux-test
timeout 300 cargo test --release --locked -p loramux --test sources -- --test-threads 2
# The test build above also built target/release/loramux, which the fleet check runs.
LORAMUX_S3_PYTHON="$VENV/bin/python" scripts/replicas.sh s3
