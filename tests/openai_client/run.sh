#!/usr/bin/env bash
# Talks to `loramux serve` with the official `openai` Python client (from PyPI).
# Makes a venv outside the repo (${LORAMUX_CACHE:-~/.cache/loramux}/openai-venv), starts the
# server on a tiny fixture model with adapters on a free loopback port (and others on
# SmolLM2 and Qwen2.5-Coder when cached, for tool calling), runs pytest, stops the servers. Exits
# non-zero on any failure.
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

free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_server LOG PORT ARGS...: serves in the background and waits until healthy.
SERVERS=()
start_server() {
    local log=$1 port=$2
    shift 2
    "$BIN" serve "$@" --host 127.0.0.1 --port "$port" --api-key test-key >"$log" 2>&1 &
    local pid=$!
    SERVERS+=("$pid")
    for _ in $(seq 1 300); do
        if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "server exited during startup:"; cat "$log"; exit 1
        fi
        sleep 0.1
    done
}
stop() {
    rm -rf "${ROUTED:-}"
    for pid in "${SERVERS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
}
trap stop EXIT

PORT=$(free_port)
LOG=$(mktemp "${TMPDIR:-/tmp}/loramux-openai-XXXXXX.log")
FIX=$ROOT/fixtures/tiny/llama
# Two routable adapters for model "auto": copies of the fixture adapters with routing examples.
ROUTED=$(mktemp -d "${TMPDIR:-/tmp}/loramux-openai-routed-XXXXXX")
cp -r "$FIX/adapters/a" "$ROUTED/weather" && cp -r "$FIX/adapters/b" "$ROUTED/cooking"
echo '{"description": "weather", "examples": ["Will it rain in Paris this weekend?", "What is the forecast for tomorrow?"]}' >"$ROUTED/weather/routing.json"
echo '{"description": "cooking", "examples": ["How do I make fluffy pancakes?", "A recipe for tomato soup, please."]}' >"$ROUTED/cooking/routing.json"
start_server "$LOG" "$PORT" --model "$FIX" --served-model-name tiny --lora-modules a="$FIX/adapters/a" b="$FIX/adapters/b" --lora-dir "$ROUTED"
SERVER=${SERVERS[0]}

# Real models, when cached: tool calling with a template that knows no tools (SmolLM2) and
# with one that reads them (Qwen2.5-Coder).
EXTRA_LOGS=()
serve_cached() { # serve_cached NAME GGUF URL_VARIABLE
    local log port
    if [ ! -f "$2" ]; then
        echo "openai client: $2 is not cached, its tests are skipped (loramux models pull)"
        return 0
    fi
    log=$(mktemp "${TMPDIR:-/tmp}/loramux-openai-$1-XXXXXX.log")
    EXTRA_LOGS+=("$log")
    port=$(free_port)
    start_server "$log" "$port" --model "$2" --served-model-name "$1"
    export "$3=http://127.0.0.1:$port/v1"
}
serve_cached smollm2 "$CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf" LORAMUX_SMOLLM2_URL
serve_cached qwen "$CACHE/models/qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct.gguf" LORAMUX_QWEN_URL

status=0
LORAMUX_URL="http://127.0.0.1:$PORT/v1" LORAMUX_KEY=test-key \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/openai_client/test_openai.py || status=$?

# Graceful shutdown: SIGTERM makes the server exit 0.
kill -TERM "$SERVER"
server_status=0
wait "$SERVER" || server_status=$?
stop
trap - EXIT
if [ "$server_status" -ne 0 ]; then
    echo "server exited with status $server_status after SIGTERM"; cat "$LOG"; status=1
fi
if [ "$status" -ne 0 ]; then
    echo "--- server log ---"; tail -50 "$LOG"
fi
rm -f "$LOG" "${EXTRA_LOGS[@]}"
exit "$status"
