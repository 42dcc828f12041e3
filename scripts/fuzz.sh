#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another (issue #11, RELIABILITY.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 30 s, every target
#
# Targets: gguf, adapter, chat_template, openai_request, tenants_file, adapter_uri. Needs a nightly toolchain
# (`cargo +nightly`); installs cargo-fuzz from crates.io into ~/.cargo/bin if missing.
# Each target starts from its committed seeds (fuzz/corpus/<target>/, never written to) plus
# the corpus earlier runs grew (results/fuzz/corpus/<target>/, where new inputs go), so long
# campaigns resume. libFuzzer's output is kept in results/fuzz/<target>.log; crashing,
# timing-out and out-of-memory inputs land in fuzz/artifacts/<target>/. Prints executions,
# coverage (cov: edges, ft: features) and the crashes found per target, writes
# results/fuzz/summary.json, and exits 1 if any target found a crash (2 on a setup failure).
#
# Environment: FUZZ_SANITIZER (address|none|..., default address), FUZZ_TIMEOUT (seconds one
# input may take before it counts as a hang, default 10), FUZZ_RSS_LIMIT_MB (default 2048).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECS=${1:-30}
[ $# -gt 0 ] && shift
ALL=(gguf adapter chat_template openai_request routing_json tenants_file upload_multipart adapter_uri)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi
case "$SECS" in ''|*[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac
for t in "${TARGETS[@]}"; do
  case " ${ALL[*]} " in *" $t "*) ;; *) echo "unknown target '$t' (known: ${ALL[*]})" >&2; exit 2 ;; esac
done
SANITIZER=${FUZZ_SANITIZER:-address}
TIMEOUT=${FUZZ_TIMEOUT:-10}
RSS_LIMIT=${FUZZ_RSS_LIMIT_MB:-2048}

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked || { echo "fuzz: cannot install cargo-fuzz" >&2; exit 2; }
fi

echo "fuzz: building ${TARGETS[*]} (sanitizer: $SANITIZER)"
for t in "${TARGETS[@]}"; do
  (cd fuzz && cargo +nightly fuzz build --sanitizer "$SANITIZER" "$t") || { echo "fuzz: build of $t failed" >&2; exit 2; }
done

OUT=results/fuzz
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)   # the targets' temp files (GGUF and adapter copies) go here
trap 'rm -rf "$SCRATCH"' EXIT
crashed=0
rows=()
json="["
for t in "${TARGETS[@]}"; do
  mkdir -p "$OUT/corpus/$t" "fuzz/artifacts/$t"
  marker="$SCRATCH/start-$t"; touch "$marker"
  echo "fuzz: $t for ${SECS}s (log: $OUT/$t.log)"
  start=$(date +%s)
  (cd fuzz && TMPDIR="$SCRATCH" cargo +nightly fuzz run --sanitizer "$SANITIZER" "$t" \
      "$ROOT/$OUT/corpus/$t" "$ROOT/fuzz/corpus/$t" -- \
      -max_total_time="$SECS" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_LIMIT" -print_final_stats=1) \
      >"$OUT/$t.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  log="$OUT/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  [ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  corp=$(grep -oE 'corp: [0-9]+/[0-9A-Za-z]+' "$log" | tail -1 | awk '{print $2}')
  peak=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | tail -1 | awk '{print $2}')
  new=$(find "fuzz/artifacts/$t" -type f -newer "$marker" | sort)
  ncrash=$(printf '%s' "$new" | grep -c . || true)
  total=$(find "fuzz/artifacts/$t" -type f | wc -l)
  # A libFuzzer exit other than 0 without an artifact (a build or start failure) counts too.
  if [ "$ncrash" -gt 0 ] || [ "$rc" -ne 0 ]; then crashed=1; fi
  rows+=("$(printf '%-15s %10s %8s %7s %8s %11s %8s %7s %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${peak:-?}" "$ncrash" "$([ "$rc" -ne 0 ] && echo "exit $rc")")")
  for f in $new; do rows+=("    $f"); done
  json+=$(printf '%s{"target":"%s","seconds":%s,"exit_code":%s,"executions":%s,"exec_per_sec":%s,"cov":%s,"ft":%s,"corpus":"%s","peak_rss_mb":%s,"crashes":%s,"artifacts_total":%s}' \
    "$([ "$json" = "[" ] || echo ,)" "$t" "$secs" "$rc" "${execs:-null}" "${rate:-null}" "${cov:-null}" "${ft:-null}" "${corp:-}" "${peak:-null}" "$ncrash" "$total")
done
json+="]"
cat >"$OUT/summary.json" <<JSON
{"date":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","seconds_per_target":$SECS,"sanitizer":"$SANITIZER","commit":"$(git rev-parse --short HEAD 2>/dev/null)","targets":$json}
JSON

echo
printf '%-15s %10s %8s %7s %8s %11s %8s %7s\n' target executions exec/s cov ft corpus rss_mb crashes
for r in "${rows[@]}"; do echo "$r"; done
echo "summary: $OUT/summary.json"
if [ "$crashed" -ne 0 ]; then
  echo "fuzz: FAILED: a target crashed (inputs above; reproduce with: cd fuzz && cargo +nightly fuzz run TARGET ARTIFACT)" >&2
  exit 1
fi
echo "fuzz: no crash"
