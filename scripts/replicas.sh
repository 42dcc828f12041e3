#!/usr/bin/env bash
# Multi-replica check on loopback (issue #13): what GIE's endpoint picker sees of a pool.
#
# Starts three `loramux serve` replicas of the tiny fixture model (fixtures/tiny/llama: no model
# download), each with its own adapters and --max-loras, and --max-num-seqs 1 so that requests
# both run and wait. `loramux bench load` drives each replica with open-loop Poisson arrivals
# over that replica's models while every replica's /metrics is scraped and read as the picker
# reads it. Fails (exit 1) unless, on every replica:
#   - every vllm:lora_requests_info series names only that replica's adapters, running and
#     waiting, as a comma list without spaces, with max_lora = its --max-loras;
#   - each of its adapters was seen running, and some adapter was seen waiting;
#   - vllm:num_requests_running never exceeded 1 (--max-num-seqs) and requests waited;
#   - an adapter of another replica is refused (404), and bench load had no failed request
#     (HTTP 429, load shed on a busy machine, is counted but allowed for up to half of them);
#   - once the load ends: 0 running, 0 waiting, KV use 0, empty lists.
#
#   scripts/replicas.sh          (needs target/release/loramux: cargo build --release -p loramux)
#
# With `s3` (issue #23), a fleet sharing one S3 bucket instead: three replicas started with
# `--lora-dir s3://BUCKET/PREFIX/` and a disk cache each; an adapter is uploaded to the bucket
# once, after they started. Fails unless each replica serves it on its first request with the
# same tokens as the same adapter loaded from local disk (one download each), and a replica
# restarted serves it again from its disk cache without a download.
#
#   LORAMUX_TEST_S3_ENDPOINT=... LORAMUX_TEST_S3_KEY_ID=... LORAMUX_TEST_S3_SECRET=... \
#   LORAMUX_TEST_S3_BUCKET=... LORAMUX_S3_PYTHON=python-with-boto3 scripts/replicas.sh s3
#   (tests/sources/run.sh starts an S3 server, moto, and runs this)
#
# Bounded: servers listen on 127.0.0.1 only (port 0: the kernel picks free ports), each load
# lasts LORAMUX_REPLICAS_SECONDS (default 4) seconds, the whole check is killed after 180 s, and
# the servers are always stopped (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${LORAMUX_BIN:-target/release/loramux}"
SECONDS_OF_LOAD="${LORAMUX_REPLICAS_SECONDS:-4}"
MODEL=fixtures/tiny/llama
ADAPTERS="$MODEL/adapters"
[ -x "$BIN" ] || { echo "replicas: $BIN is missing: cargo build --release -p loramux" >&2; exit 2; }
command -v python3 >/dev/null || { echo "replicas: python3 is required" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/loramux-replicas.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # A replica drains in-flight requests on SIGTERM; kill it if it takes longer than 10 s.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts `loramux serve` on the fixture model as replica $1 with the rest as its arguments
# (logging to $WORK/$1.log); sets URL once it listens.
URL=""
start_replica() {
  local name="$1" log="$WORK/$1.log"
  shift
  : > "$log"
  LORAMUX_LOG=info "$BIN" serve --model "$MODEL" --served-model-name tiny --host 127.0.0.1 --port 0 "$@" > "$log" 2>&1 &
  PIDS+=("$!")
  URL=""
  for _ in $(seq 200); do
    URL="$(sed -n 's|.* at \(http://127\.0\.0\.1:[0-9]*\)/v1 .*|\1|p' "$log" | head -n 1 || true)"
    [ -n "$URL" ] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "replicas: $name exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "replicas: $name did not start within 20 s:" >&2
  cat "$log" >&2
  exit 1
}

if [ "${1:-}" = s3 ]; then
  for v in LORAMUX_TEST_S3_ENDPOINT LORAMUX_TEST_S3_KEY_ID LORAMUX_TEST_S3_SECRET LORAMUX_TEST_S3_BUCKET; do
    [ -n "${!v:-}" ] || { echo "replicas s3: $v is not set (tests/sources/run.sh starts an S3 server and sets it)" >&2; exit 2; }
  done
  PY="${LORAMUX_S3_PYTHON:-python3}"
  "$PY" -c 'import boto3' 2>/dev/null || { echo "replicas s3: $PY has no boto3 (set LORAMUX_S3_PYTHON)" >&2; exit 2; }
  export AWS_ENDPOINT_URL="$LORAMUX_TEST_S3_ENDPOINT" AWS_ACCESS_KEY_ID="$LORAMUX_TEST_S3_KEY_ID" \
    AWS_SECRET_ACCESS_KEY="$LORAMUX_TEST_S3_SECRET" AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
  PREFIX="fleet-$$-$(date +%s)"
  URLS=()
  for i in 0 1 2; do
    start_replica "r$i" --lora-dir "s3://$LORAMUX_TEST_S3_BUCKET/$PREFIX/" --lora-cache-dir "$WORK/cache-r$i" --lora-modules "local=$ADAPTERS/b"
    URLS+=("$URL")
    echo "replicas s3: r$i at $URL: --lora-dir s3://$LORAMUX_TEST_S3_BUCKET/$PREFIX/, its own disk cache"
  done
  # Uploaded once, after the replicas started: nothing is copied to or called on any replica.
  "$PY" - "$ADAPTERS/b" "$LORAMUX_TEST_S3_BUCKET" "$PREFIX/trained" <<'PY'
import os, sys, boto3
folder, bucket, key = sys.argv[1:]
s3 = boto3.client("s3")
for f in ("adapter_config.json", "adapter_model.safetensors"):
    s3.upload_file(os.path.join(folder, f), bucket, f"{key}/{f}")
print(f"replicas s3: uploaded {folder} once as s3://{bucket}/{key}/")
PY
  # Each replica: `trained` on its first request, one download, the tokens of the local copy.
  check() {
    python3 - "$1" "$2" <<'PY'
import json, re, sys, urllib.request
url, downloads = sys.argv[1], float(sys.argv[2])
def text(model):
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"]
remote, local = text("trained"), text("local")
metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
fetched = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith("loramux_lora_fetches_total{") and 'outcome="ok"' in l)
if remote != local or fetched != downloads:
    sys.exit(f"replicas s3: FAIL at {url}: remote {remote!r} vs local {local!r}; {fetched:g} downloads, expected {downloads:g}")
print(f"replicas s3: {url}: served `trained` on its first request, {fetched:g} download(s), same tokens as the local copy: {remote!r}")
PY
  }
  for url in "${URLS[@]}"; do check "$url" 1; done
  # r1 restarted on its disk cache: served again without a download.
  kill -TERM "${PIDS[1]}"
  wait "${PIDS[1]}" 2>/dev/null || true
  start_replica r1-restarted --lora-dir "s3://$LORAMUX_TEST_S3_BUCKET/$PREFIX/" --lora-cache-dir "$WORK/cache-r1" --lora-modules "local=$ADAPTERS/b"
  check "$URL" 0
  echo "replicas s3: OK: 3 replicas served an adapter stored once in S3; a restarted one from its disk cache"
  exit 0
fi

# name | --max-loras | adapters (fixture adapters a, b, c, d; b is on two replicas)
REPLICAS=(
  "r0|2|a b"
  "r1|3|c"
  "r2|4|b d"
)

SPEC="$WORK/replicas.json"
echo "[" > "$SPEC"
sep=""
for entry in "${REPLICAS[@]}"; do
  IFS='|' read -r name max_loras adapters <<< "$entry"
  modules=()
  for a in $adapters; do modules+=("$a=$ADAPTERS/$a"); done
  start_replica "$name" --max-num-seqs 1 --max-loras "$max_loras" --lora-modules "${modules[@]}"
  url="$URL"
  echo "replicas: $name at $url: adapters [$adapters], --max-loras $max_loras, --max-num-seqs 1"
  # shellcheck disable=SC2086  # word splitting wanted: one quoted name per adapter
  list="$(printf '"%s",' $adapters)"
  printf '%s{"name": "%s", "url": "%s", "max_loras": %s, "adapters": [%s]}\n' "$sep" "$name" "$url" "$max_loras" "${list%,}" >> "$SPEC"
  sep=","
done
echo "]" >> "$SPEC"

timeout -k 5 180 python3 - "$SPEC" "$BIN" "$SECONDS_OF_LOAD" "$WORK" <<'PY'
import glob
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

spec_path, binary, seconds, work = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
replicas = json.load(open(spec_path))
all_adapters = sorted({a for r in replicas for a in r["adapters"]})

SERIES = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)')
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def scrape(url):
    """Families of /metrics: name -> [(labels, value)]."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    families = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SERIES.match(line)
        if not m:
            raise ValueError(f"unparseable exposition line: {line!r}")
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in LABEL.findall(m.group("labels") or "")}
        families.setdefault(m.group("name"), []).append((labels, float(m.group("value"))))
    return families


def adapter_list(value, problems, where):
    if value == "":
        return []
    items = value.split(",")
    if any(not i or i != i.strip() or " " in i for i in items):
        problems.append(f"{where}: list {value!r} is not a comma list without spaces")
    return items


class Seen:
    def __init__(self, replica):
        self.replica = replica
        self.running, self.waiting = set(), set()
        self.max_running = self.max_waiting = 0
        self.max_lora = set()
        self.scrapes = 0
        self.problems = []


seen = {r["name"]: Seen(r) for r in replicas}
stop = threading.Event()


def observe(r, families):
    s = seen[r["name"]]
    s.scrapes += 1
    own = set(r["adapters"])
    for labels, value in families.get("vllm:lora_requests_info", []):
        where = f"{r['name']} vllm:lora_requests_info{labels}"
        running = adapter_list(labels.get("running_lora_adapters", ""), s.problems, where)
        waiting = adapter_list(labels.get("waiting_lora_adapters", ""), s.problems, where)
        foreign = (set(running) | set(waiting)) - own
        if foreign:
            s.problems.append(f"{where}: adapters {sorted(foreign)} are not this replica's {sorted(own)}")
        s.running |= set(running)
        s.waiting |= set(waiting)
        s.max_lora.add(labels.get("max_lora"))
    run = families.get("vllm:num_requests_running", [({}, 0.0)])[0][1]
    wait = families.get("vllm:num_requests_waiting", [({}, 0.0)])[0][1]
    s.max_running = max(s.max_running, run)
    s.max_waiting = max(s.max_waiting, wait)


def scraper():
    while not stop.is_set():
        for r in replicas:
            try:
                observe(r, scrape(r["url"]))
            except Exception as e:  # a failed scrape is a failure of the check
                seen[r["name"]].problems.append(f"scrape failed: {e}")
        time.sleep(0.005)


problems = []
# An adapter that another replica has is not here: 404, as the picker must not send it here.
for r in replicas:
    other = next((a for a in all_adapters if a not in r["adapters"]), None)
    if other is None:
        continue
    body = json.dumps({"model": other, "prompt": "hi", "max_tokens": 1}).encode()
    req = urllib.request.Request(r["url"] + "/v1/completions", data=body, headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        problems.append(f"{r['name']}: adapter {other} of another replica was served")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            problems.append(f"{r['name']}: adapter {other} of another replica: HTTP {e.code}, expected 404")

thread = threading.Thread(target=scraper, daemon=True)
thread.start()
benches = []
for i, r in enumerate(replicas):
    out = f"{work}/bench-{r['name']}"
    cmd = [binary, "bench", "load", "--url", r["url"], "--rates", "16", "--duration", str(seconds),
           "--adapters", ",".join(r["adapters"] + ["tiny"]), "--prompt-words", "4:16", "--output-tokens", "16:32",
           "--seed", str(i), "--out", out]
    benches.append((r, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"))))
for r, out, p in benches:
    try:
        rc = p.wait(timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = "timeout"
    if rc != 0:
        problems.append(f"{r['name']}: bench load exited {rc}: {open(out + '.log').read()[-2000:]}")
        continue
    results = [json.load(open(f)) for f in glob.glob(out + "/*.json")]
    samples = [x for res in results for pt in res.get("points", []) for x in pt.get("samples", [])]
    failed = [str(x.get("error")) for x in samples if not x.get("ok", True)]
    # HTTP 429 is the server shedding load (more than ~2 s of work queued), which a machine busy
    # with other work can cause: counted, not a failure. Any other error is.
    shed = [e for e in failed if e.startswith("HTTP 429")]
    other = [e for e in failed if not e.startswith("HTTP 429")]
    if not samples or other or len(shed) * 2 > len(samples):
        problems.append(f"{r['name']}: bench load sent {len(samples)} requests, {len(shed)} shed (429), "
                        f"{len(other)} failed: {sorted(set(e[:200] for e in other))[:3]}")
    else:
        print(f"replicas: {r['name']}: bench load sent {len(samples)} requests over {seconds:g} s, "
              f"{len(shed)} shed with 429, none failed")
stop.set()
thread.join(timeout=10)

for r in replicas:
    s = seen[r["name"]]
    problems += s.problems
    own = set(r["adapters"])
    if s.running != own:
        problems.append(f"{r['name']}: adapters seen running {sorted(s.running)}, expected each of {sorted(own)}")
    if not s.waiting:
        problems.append(f"{r['name']}: no adapter was ever seen waiting (max waiting requests {s.max_waiting:g})")
    if s.max_lora != {str(r["max_loras"])}:
        problems.append(f"{r['name']}: max_lora labels {sorted(s.max_lora)}, expected {r['max_loras']}")
    if s.max_running != 1:
        problems.append(f"{r['name']}: at most {s.max_running:g} requests running, expected 1 (--max-num-seqs 1)")
    # Idle again: the gauges settle within one batch-loop iteration of the last response.
    deadline = time.time() + 5
    while True:
        f = scrape(r["url"])
        run, wait, kv = (f[n][0][1] for n in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))
        latest = max(f["vllm:lora_requests_info"], key=lambda lv: lv[1])[0]
        idle = (run, wait, kv) == (0, 0, 0) and latest.get("running_lora_adapters") == "" and latest.get("waiting_lora_adapters") == ""
        if idle or time.time() > deadline:
            break
        time.sleep(0.05)
    if not idle:
        problems.append(f"{r['name']}: not idle after the load: running {run:g}, waiting {wait:g}, KV {kv:g}, lora {latest}")
    print(f"replicas: {r['name']}: {s.scrapes} scrapes; running adapters seen {sorted(s.running)}, waiting {sorted(s.waiting)}, "
          f"max_lora {sorted(s.max_lora)}; at most {s.max_running:g} running, {s.max_waiting:g} waiting")

if problems:
    for p in list(dict.fromkeys(problems))[:50]:
        print(f"replicas: FAIL {p}")
    sys.exit(1)
print(f"replicas: OK: {len(replicas)} replicas, each reporting exactly its own adapters, running and waiting")
PY
