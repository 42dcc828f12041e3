#!/usr/bin/env bash
# Runs the real lm-eval-harness (PyPI lm_eval[api], model local-completions) against a live
# `loramux serve` (issue #19): SmolLM2-135M-Instruct with the `date` and `sentiment` task
# adapters, on a generation task (date, exact match), a log-likelihood task (date answer) and
# a multiple-choice task (sentiment), over local files made from the adapters' held-out sets,
# for the base and for each adapter, with --apply_chat_template and the server's tokenizer
# endpoints (lm-eval's remote tokenizer). check.py then asserts that lm-eval's numbers equal
# a reference computed independently through the server (and `loramux bench quality`'s, when
# that command exists), item by item, and that the adapter beats the base.
#
# Makes a venv outside the repo (${LORAMUX_CACHE:-~/.cache/loramux}/lm-eval-venv). Prints
# "skipped: ..." and exits 0 when lm_eval cannot be installed (no network) or the task
# adapters are absent; any other failure exits non-zero.
#
# Environment: LORAMUX_BIN (the loramux binary; built when unset), LORAMUX_TASK_ADAPTERS
# (task adapter folder when adapters/tasks is not in the checkout), LMEVAL_LIMIT (items per
# task, default 20), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/lm_eval

LM_EVAL_VERSION=0.4.13
CACHE=${LORAMUX_CACHE:-$HOME/.cache/loramux}
VENV=$CACHE/lm-eval-venv
PY=${PYTHON:-python3}
LIMIT=${LMEVAL_LIMIT:-20}
MODEL=smollm2-135m
START=$SECONDS

ADAPTERS=$ROOT/adapters/tasks
if [ ! -f "$ADAPTERS/date/heldout.jsonl" ] && [ -n "${LORAMUX_TASK_ADAPTERS:-}" ]; then
    ADAPTERS=$LORAMUX_TASK_ADAPTERS
fi
for task in date sentiment; do
    if [ ! -f "$ADAPTERS/$task/heldout.jsonl" ] || [ ! -f "$ADAPTERS/$task/adapter_config.json" ]; then
        echo "skipped tests/lm_eval: no task adapter $task in $ADAPTERS (set LORAMUX_TASK_ADAPTERS)"
        exit 0
    fi
done

venv_ok() {
    "$VENV/bin/python" -c "import importlib.metadata as m, sys, aiohttp, tenacity, pyarrow, lm_eval; sys.exit(0 if m.version('lm_eval') == '$LM_EVAL_VERSION' else 1)" 2>/dev/null
}
if [ ! -x "$VENV/bin/python" ] || ! venv_ok; then
    echo "lm-eval: creating $VENV (lm_eval[api]==$LM_EVAL_VERSION)"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    if ! "$PY" -m venv "$VENV"; then
        echo "skipped tests/lm_eval: $PY cannot make a venv"
        rm -rf "$VENV"
        exit 0
    fi
    PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/loramux-lmeval-pip-XXXXXX.log")
    t0=$SECONDS
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "lm_eval[api]==$LM_EVAL_VERSION" >"$PIP_LOG" 2>&1; then
        rm -rf "$VENV"
        if grep -qiE "from versions: none|connection (refused|reset|error)|network is unreachable|name resolution|resolve host|timed out|proxyerror|sslerror" "$PIP_LOG"; then
            echo "skipped tests/lm_eval: lm_eval[api]==$LM_EVAL_VERSION cannot be installed (no network?):"
            tail -3 "$PIP_LOG"
            rm -f "$PIP_LOG"
            exit 0
        fi
        echo "lm-eval: pip install failed:"; cat "$PIP_LOG"; rm -f "$PIP_LOG"
        exit 1
    fi
    rm -f "$PIP_LOG"
    echo "lm-eval: installed in $((SECONDS - t0)) s"
fi
venv_ok || { echo "lm-eval: $VENV does not import lm_eval $LM_EVAL_VERSION"; exit 1; }

BIN=${LORAMUX_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release --quiet -p loramux --bin loramux
    BIN=$ROOT/target/release/loramux
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/loramux-lmeval-XXXXXX")
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
URL=http://127.0.0.1:$PORT
LOG=$WORK/server.log
"$BIN" serve --model "$MODEL" \
    --lora-modules date="$ADAPTERS/date" sentiment="$ADAPTERS/sentiment" \
    --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

up=0
for _ in $(seq 1 600); do
    if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$URL/health', timeout=1)" 2>/dev/null; then
        up=1; break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "server exited during startup:"; cat "$LOG"; exit 1
    fi
    sleep 0.1
done
[ "$up" = 1 ] || { echo "server not up after 60 s:"; tail -20 "$LOG"; exit 1; }

"$VENV/bin/python" "$HERE/make_tasks.py" --url "$URL" --adapters "$ADAPTERS" --limit "$LIMIT" --out "$WORK/tasks"

# lm-eval with everything local: no hub, its dataset cache in the temp dir.
run_lm_eval() { # served model name, tasks
    echo "lm-eval: model=$1 tasks=$2"
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_HOME="$WORK/hf" TOKENIZERS_PARALLELISM=false \
        "$VENV/bin/python" "$HERE/lm_eval_cli.py" \
        --model local-completions \
        --model_args "model=$1,base_url=$URL/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=True" \
        --tasks "$2" --include_path "$WORK/tasks" --apply_chat_template \
        --log_samples --output_path "$WORK/out/$1" >"$WORK/lm_eval-$1.log" 2>&1 || {
        echo "lm_eval failed for model=$1:"; tail -40 "$WORK/lm_eval-$1.log"; return 1
    }
    # lm-eval's own summary table.
    grep -E '^\|' "$WORK/lm_eval-$1.log" || true
}
status=0
run_lm_eval "$MODEL" loramux_date_gen,loramux_date_ll,loramux_sentiment_mc || status=1
run_lm_eval date loramux_date_gen,loramux_date_ll || status=1
run_lm_eval sentiment loramux_sentiment_mc || status=1

BENCH_ARGS=()
if [ "$status" -eq 0 ] && "$BIN" bench quality --help >/dev/null 2>&1; then
    # The engine-side measurement over the same items (no server), when the command exists.
    echo "bench quality: date, sentiment, first $LIMIT items"
    if "$BIN" bench quality --model "$MODEL" --adapters "$ADAPTERS" --only date,sentiment --limit "$LIMIT" \
        --no-sweep --speed-tokens 1 --out "$WORK/bench" >"$WORK/bench.log" 2>&1; then
        BENCH_JSON=$(find "$WORK/bench" -name quality.json | head -1)
        if [ -n "$BENCH_JSON" ]; then
            BENCH_ARGS=(--bench "$BENCH_JSON")
        else
            echo "bench quality wrote no quality.json under $WORK/bench"; status=1
        fi
    else
        echo "bench quality failed:"; tail -20 "$WORK/bench.log"; status=1
    fi
fi

if [ "$status" -eq 0 ]; then
    "$VENV/bin/python" "$HERE/check.py" --url "$URL" --tasks "$WORK/tasks" --out "$WORK/out" --base "$MODEL" "${BENCH_ARGS[@]}" || status=$?
fi

kill -TERM "$SERVER"
server_status=0
wait "$SERVER" || server_status=$?
if [ "$server_status" -ne 0 ]; then
    echo "server exited with status $server_status after SIGTERM"; status=1
fi
if [ "$status" -ne 0 ]; then
    echo "--- server log ---"; tail -30 "$LOG"
fi
echo "tests/lm_eval: $((SECONDS - START)) s"
exit "$status"
