#!/usr/bin/env bash
# The project's one test command (README "Tests"; CI runs exactly this).
# Builds in release (numeric tests are too slow unoptimised), fetches the real models the
# reference tests need into the cache (~680 MB once; see README "Models"), runs every Rust
# test, then the official OpenAI Python client against a live server.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
./target/release/loramux models pull smollm2-135m --quiet
./target/release/loramux models pull qwen2.5-coder-0.5b --quiet
./target/release/loramux models pull all-minilm-l6-v2 --quiet   # the --router-model router (91 MB)
cargo test --release --locked --workspace
if [ -x tests/openai_client/run.sh ]; then
  tests/openai_client/run.sh
fi
# The web page (issue #25) in headless Chromium (Debian's chromium and chromium-driver, installed
# with apt-get when missing; skips itself where they cannot be): compare, server view, keys.
LORAMUX_BIN="$PWD/target/release/loramux" tests/web/run.sh
# The real lm-eval-harness (PyPI lm_eval, local-completions) against a live server with two task
# adapters, checked item by item against a reference through the server (tests/lm_eval/run.sh;
# skips itself without network for its venv or without adapters/tasks).
if command -v python3 >/dev/null; then
  LORAMUX_BIN="$PWD/target/release/loramux" tests/lm_eval/run.sh
else
  echo "skipped tests/lm_eval/run.sh: needs python3"
fi
# The Kubernetes manifests (deploy/k8s) against the Kubernetes and GIE schemas, offline once its
# venv is installed (deploy/validate.sh); needs only python3 (with venv).
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  deploy/validate.sh
else
  echo "skipped deploy/validate.sh: needs python3 with venv"
fi
# Remote adapter sources (issue #23): a loopback S3 server (moto, PyPI, in a venv under the
# cache) with credentials enforced, then crates/loramux/tests/sources.rs against it (errors,
# single flight, the disk cache across a restart, AWS profile files) and scripts/replicas.sh s3
# (a fleet of three replicas sharing one bucket).
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  tests/sources/run.sh
else
  echo "skipped tests/sources/run.sh: needs python3 with venv"
fi
# Reliability (issue #11, RELIABILITY.md): the short forms of the soak (8 clients, 60 s, with
# adapter churn, disconnects and over-long prompts; fails on any unexpected error, a server
# that does not return to idle, or RSS growth past its bound), the injected faults, and each
# fuzz target for 30 s (needs a nightly toolchain; the first build of fuzz/ takes minutes).
if command -v python3 >/dev/null; then
  scripts/soak.sh 8 60
  scripts/faults.sh
else
  echo "skipped scripts/soak.sh and scripts/faults.sh: needs python3"
fi
if cargo +nightly --version >/dev/null 2>&1; then
  scripts/fuzz.sh 30
else
  echo "skipped scripts/fuzz.sh: needs a nightly toolchain (cargo +nightly)"
fi
