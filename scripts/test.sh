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
