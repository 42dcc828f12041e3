#!/usr/bin/env python3
"""Cold first-request TTFT of a ~10 MB adapter from a loopback S3 server vs local disk vs
resident, and 16 concurrent first requests for one new adapter (fetches made, their TTFT)
(issue #23, BENCHMARKS.md "Adapters from S3").

    ~/.cache/loramux/s3-venv/bin/python scripts/bench_sources.py [RUNS]

Needs the venv tests/sources/run.sh makes (moto, boto3) and a release build (LORAMUX_BIN, default
target/release/loramux). Serves smollm2-135m (from the cache) with the example adapter `pirate`
padded to ~10 MB (safetensors metadata: the same tensors, a bigger file), one copy per run under
an S3 prefix and in a local --lora-dir, so each first request is cold. Prints one JSON line.
"""
import http.client
import json
import os
import pathlib
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import boto3

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("LORAMUX_BIN", str(ROOT / "target/release/loramux"))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
PAD = 10 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def padded_weights():
    data = (ROOT / "adapters/pirate/adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"pad": "x" * (PAD - len(data))}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def ttft(port, model):
    """Seconds to the first streamed text chunk (and the status)."""
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        return None, r.status
    while True:
        line = r.readline()
        if not line:
            return None, r.status
        if line.startswith(b"data: {") and b'"text":"' in line and b'"text":""' not in line:
            out = time.perf_counter() - t
            r.read()
            return out, 200


def metric(port, name):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name) and 'outcome="ok"' in l)


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="loramux-bench-sources-"))
    procs = []
    try:
        mport = free_port()
        procs.append(subprocess.Popen([sys.executable.replace("python", "moto_server"), "-H", "127.0.0.1", "-p", str(mport)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoint = f"http://127.0.0.1:{mport}"
        env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true", LORAMUX_LOG="warn")
        for _ in range(100):
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench")
                s3.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        weights = padded_weights()
        config = (ROOT / "adapters/pirate/adapter_config.json").read_bytes()
        local = work / "local"
        names = [f"r{i}" for i in range(RUNS)] + ["c16"]
        for n in names:
            s3.put_object(Bucket="bench", Key=f"adapters/s3-{n}/adapter_config.json", Body=config)
            s3.put_object(Bucket="bench", Key=f"adapters/s3-{n}/adapter_model.safetensors", Body=weights)
            (local / f"disk-{n}").mkdir(parents=True)
            (local / f"disk-{n}/adapter_config.json").write_bytes(config)
            (local / f"disk-{n}/adapter_model.safetensors").write_bytes(weights)
        port = free_port()
        procs.append(subprocess.Popen([BIN, "serve", "--model", "smollm2-135m", "--lora-dir", str(local), "--lora-dir", "s3://bench/adapters/",
                                       "--lora-cache-dir", str(work / "cache"), "--max-loras", "32", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w")))
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        for _ in range(3):
            ttft(port, "smollm2-135m")
        rows = {"s3_cold": [], "disk_cold": [], "resident": [], "base": []}
        for n in names[:-1]:
            rows["base"].append(ttft(port, "smollm2-135m")[0])
            rows["s3_cold"].append(ttft(port, f"s3-{n}")[0])
            rows["resident"].append(ttft(port, f"s3-{n}")[0])
            rows["disk_cold"].append(ttft(port, f"disk-{n}")[0])
        before = metric(port, "loramux_lora_fetches_total")
        out = [None] * 16
        def one(i):
            out[i] = ttft(port, "s3-c16")[0]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fetches = metric(port, "loramux_lora_fetches_total") - before
        ms = lambda xs: round(statistics.median(xs) * 1e3, 1)
        print(json.dumps({
            "adapter_bytes": len(weights) + len(config), "runs": RUNS,
            "ttft_ms_median": {k: ms(v) for k, v in rows.items()},
            "ttft_ms_all": {k: [round(x * 1e3, 1) for x in v] for k, v in rows.items()},
            "concurrent16": {"fetches": fetches, "ttft_ms_min": round(min(out) * 1e3, 1), "ttft_ms_median": ms(out), "ttft_ms_max": round(max(out) * 1e3, 1)},
        }))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
