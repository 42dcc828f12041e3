#!/usr/bin/env bash
# Talks to `loramux serve` with the official `openai` Python client (from PyPI).
# Makes a venv outside the repo (${LORAMUX_CACHE:-~/.cache/loramux}/openai-venv), starts the
# server on a tiny fixture model with adapters on a free loopback port, runs pytest, stops
# the server. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

OPENAI_VERSION=3.51.0
PYTEST_VERSION=9.2.0
CACHE=${LORAMUX_CACHE:-$HOME/.cache/loramux}
VENV=$CACHE/openai-venv
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, pytest, sys; sys.exit(0 if openai.__version__ == '$OPENAI_VERSION' else 1)" 2>/dev/null; then
    echo "openai client: creating $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" "pytest==$PYTEST_VERSION"
fi

BIN=${LORAMUX_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release --quiet -p loramux --bin loramux
    BIN=$ROOT/target/release/loramux
fi

PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
LOG=$(mktemp "${TMPDIR:-/tmp}/loramux-openai-XXXXXX.log")
FIX=$ROOT/fixtures/tiny/llama
# Two routable adapters for model "auto": copies of the fixture adapters with routing examples.
ROUTED=$(mktemp -d "${TMPDIR:-/tmp}/loramux-openai-routed-XXXXXX")
cp -r "$FIX/adapters/a" "$ROUTED/weather" && cp -r "$FIX/adapters/b" "$ROUTED/cooking"
echo '{"description": "weather", "examples": ["Will it rain in Paris this weekend?", "What is the forecast for tomorrow?"]}' >"$ROUTED/weather/routing.json"
echo '{"description": "cooking", "examples": ["How do I make fluffy pancakes?", "A recipe for tomato soup, please."]}' >"$ROUTED/cooking/routing.json"
"$BIN" serve --model "$FIX" --served-model-name tiny \
    --lora-modules a="$FIX/adapters/a" b="$FIX/adapters/b" --lora-dir "$ROUTED" \
    --host 127.0.0.1 --port "$PORT" --api-key test-key >"$LOG" 2>&1 &
SERVER=$!
stop() {
    rm -rf "$ROUTED"
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
}
trap stop EXIT

for _ in $(seq 1 100); do
    if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "server exited during startup:"; cat "$LOG"; exit 1
    fi
    sleep 0.1
done

status=0
LORAMUX_URL="http://127.0.0.1:$PORT/v1" LORAMUX_KEY=test-key \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/openai_client/test_openai.py || status=$?

# Graceful shutdown: SIGTERM makes the server exit 0.
kill -TERM "$SERVER"
server_status=0
wait "$SERVER" || server_status=$?
trap - EXIT
if [ "$server_status" -ne 0 ]; then
    echo "server exited with status $server_status after SIGTERM"; cat "$LOG"; status=1
fi
if [ "$status" -ne 0 ]; then
    echo "--- server log ---"; tail -50 "$LOG"
fi
rm -f "$LOG"
exit "$status"
