#!/usr/bin/env bash
# The project's one test command (README "Tests"; CI runs exactly this).
# Builds in release (numeric tests are too slow unoptimised), fetches the real models the
# reference tests need into the cache (~590 MB once; see README "Models"), runs every Rust
# test, then the official OpenAI Python client against a live server.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
./target/release/loramux models pull smollm2-135m --quiet
./target/release/loramux models pull qwen2.5-coder-0.5b --quiet
cargo test --release --locked --workspace
if [ -x tests/openai_client/run.sh ]; then
  tests/openai_client/run.sh
fi
# The Kubernetes manifests (deploy/k8s) against the Kubernetes and GIE schemas, offline once its
# venv is installed (deploy/validate.sh); needs only python3 (with venv).
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  deploy/validate.sh
else
  echo "skipped deploy/validate.sh: needs python3 with venv"
fi
