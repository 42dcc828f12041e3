#!/usr/bin/env bash
# The web page (issue #25) in a real browser: headless Chromium from Debian's packages, driven
# over WebDriver by chromedriver from tests/web/test_web.py (Python's standard library only).
# Installs chromium and chromium-driver with apt-get when they are missing and this runs as root
# (or with sudo); skips itself, saying why, where they cannot be installed. Starts a server with
# an API key on SmolLM2 with the example adapters pirate and cowboy (on the tiny fixture model
# and its adapters when SmolLM2 is not cached) and chromedriver, on free loopback ports.
# Screenshots go to $WEB_SCREENSHOTS (default: $TMPDIR/loramux-web-screenshots; `WEB_SCREENSHOTS=docs/figures`
# renews the README's). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${LORAMUX_CACHE:-$HOME/.cache/loramux}

skip() { echo "skipped tests/web/run.sh: $*"; exit 0; }

command -v python3 >/dev/null || skip "needs python3"
find_browser() {
    CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
    CHROMEDRIVER=$(command -v chromedriver || true)
    [ -n "$CHROMIUM" ] && [ -n "$CHROMEDRIVER" ]
}
if ! find_browser; then
    SUDO=
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
        echo "web: installing chromium and chromium-driver (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
            { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } ||
            true
    fi
    find_browser || skip "Chromium and chromedriver are not installed and cannot be (apt-get install chromium chromium-driver needs root and Debian's packages)"
fi

BIN=${LORAMUX_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release --quiet -p loramux --bin loramux
    BIN=$ROOT/target/release/loramux
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
healthy() { # healthy URL PID LOG
    for _ in $(seq 1 600); do
        if python3 -c "import urllib.request; urllib.request.urlopen('$1', timeout=1)" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "web: $1 exited during startup:"; cat "$3"; exit 1
        fi
        sleep 0.1
    done
    echo "web: $1 did not answer within 60 s"; cat "$3"; exit 1
}

PIDS=()
TMP=$(mktemp -d "${TMPDIR:-/tmp}/loramux-web-XXXXXX")
stop() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap stop EXIT

SMOL=$CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$SMOL" ] && [ -d adapters/pirate ] && [ -d adapters/cowboy ]; then
    MODEL=$SMOL BASE=smollm2 A=pirate B=cowboy ADAPTERS=$ROOT/adapters
else
    echo "web: $SMOL is not cached: testing on the tiny fixture model (loramux models pull smollm2-135m for the real one)"
    MODEL=$ROOT/fixtures/tiny/llama BASE=tiny A=a B=b ADAPTERS=$ROOT/fixtures/tiny/llama/adapters
fi
PORT=$(free_port)
"$BIN" serve --model "$MODEL" --served-model-name "$BASE" --lora-modules "$A=$ADAPTERS/$A" "$B=$ADAPTERS/$B" \
    --api-key web-test-key --admin-api-key web-admin-key --enable-lora-updates --allowed-lora-root "$ADAPTERS" \
    --host 127.0.0.1 --port "$PORT" >"$TMP/server.log" 2>&1 &
PIDS+=($!)
healthy "http://127.0.0.1:$PORT/health" "$!" "$TMP/server.log"

DRIVER_PORT=$(free_port)
"$CHROMEDRIVER" --port="$DRIVER_PORT" >"$TMP/chromedriver.log" 2>&1 &
PIDS+=($!)
healthy "http://127.0.0.1:$DRIVER_PORT/status" "$!" "$TMP/chromedriver.log"

status=0
LORAMUX_URL="http://127.0.0.1:$PORT" LORAMUX_KEY=web-test-key LORAMUX_ADMIN_KEY=web-admin-key \
    LORAMUX_MODELS="$BASE,$A,$B" LORAMUX_LOAD_PATH="$ADAPTERS/$B" \
    WEBDRIVER_URL="http://127.0.0.1:$DRIVER_PORT" CHROMIUM="$CHROMIUM" \
    SCREENSHOTS="${WEB_SCREENSHOTS:-${TMPDIR:-/tmp}/loramux-web-screenshots}" \
    timeout 300 python3 tests/web/test_web.py || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log ---"; tail -40 "$TMP/server.log"
    echo "--- chromedriver log ---"; tail -20 "$TMP/chromedriver.log"
fi
exit "$status"
