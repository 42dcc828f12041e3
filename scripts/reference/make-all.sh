#!/usr/bin/env bash
# Regenerate every golden fixture and the example adapters, in order:
#   1. reference venv (outside the repo), 2. real models into the cache,
#   3. tiny random-model fixtures (and their embedding reference), 4. SentencePiece GGUF tokenizer fixture,
#   5. example adapters (trained), 6. GGUF LoRA adapters (llama.cpp's converter),
#   7. real-model fixtures, 7b. all-MiniLM-L6-v2 router embeddings, 8. task adapters with exact answers + rank sweep (trained, ~40 min).
# Environment: LORAMUX_CACHE (default ~/.cache/loramux). Steps can be skipped with
#   SKIP_TINY=1 SKIP_SPM=1 SKIP_TRAIN=1 SKIP_GGUF_LORA=1 SKIP_REAL=1 SKIP_MINILM=1 SKIP_TASKS=1 ./scripts/reference/make-all.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

VENV="$("$HERE/setup-venv.sh" | tail -n 1)"
PY="$VENV/bin/python"

"$PY" "$HERE/fetch_model.py" smollm2-135m qwen2.5-coder-0.5b

if [ "${SKIP_TINY:-0}" != 1 ]; then
  echo "== tiny fixtures" >&2
  "$PY" "$HERE/make_tiny_fixtures.py" --out "$REPO/fixtures/tiny"
fi
if [ "${SKIP_SPM:-0}" != 1 ]; then
  echo "== SentencePiece GGUF fixture" >&2
  "$PY" "$HERE/make_spm_fixture.py" --out "$REPO/fixtures/tiny/spm"
fi
if [ "${SKIP_TINY:-0}" != 1 ]; then
  echo "== embedding requests (pooled last-layer states, base and adapters)" >&2
  "$PY" "$HERE/make_embedding_fixture.py"
fi
if [ "${SKIP_SAMPLER:-0}" != 1 ]; then
  echo "== logits controls (transformers' logits processors)" >&2
  "$PY" "$HERE/make_sampler_fixture.py"
fi
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  echo "== example adapters" >&2
  "$PY" "$HERE/train_example_adapters.py" --out "$REPO/adapters"
fi
if [ "${SKIP_GGUF_LORA:-0}" != 1 ]; then
  echo "== GGUF LoRA adapters (llama.cpp's convert_lora_to_gguf.py)" >&2
  "$PY" "$HERE/make_gguf_lora_fixture.py" --tiny "$REPO/fixtures/tiny" --adapters "$REPO/adapters"
fi
if [ "${SKIP_REAL:-0}" != 1 ]; then
  echo "== real-model fixtures" >&2
  "$PY" "$HERE/make_real_fixtures.py" --out "$REPO/fixtures/real" --adapters "$REPO/adapters"
fi
if [ "${SKIP_MINILM:-0}" != 1 ]; then
  echo "== sentence-embedding router reference (all-MiniLM-L6-v2)" >&2
  MINILM="$(cargo run --release -q -p loramux -- models pull all-minilm-l6-v2 --quiet)"
  "$PY" "$HERE/make_minilm_fixture.py" --model "$MINILM" --out "$REPO/fixtures/real/all-minilm-l6-v2.json"
fi
if [ "${SKIP_TASKS:-0}" != 1 ]; then
  echo "== task adapters (exact answers) and rank sweep" >&2
  "$PY" "$HERE/make_task_adapters.py" --out "$REPO/adapters/tasks"
fi
echo "done" >&2
