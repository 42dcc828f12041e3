#!/usr/bin/env python3
"""Closed-loop load against an OpenAI-compatible server, for the A/B switch figures in
BENCHMARKS.md until `loramux bench switch` lands (issue 4).

usage: serve_load.py URL MODE N CONCURRENCY MAX_TOKENS [A B]
  MODE: single (all requests on adapter A) | ab (alternating A/B) | base
Prints throughput (req/s, completion tok/s) and TTFT / end-to-end p50/p95.
"""
import json, sys, threading, time, urllib.request

url, mode, n, conc, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
a, b = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else ("pirate", "cowboy")
lock = threading.Lock()
next_i, ttft, e2e, tokens = [0], [], [], [0]


def model_for(i):
    return {"single": a, "ab": a if i % 2 == 0 else b, "base": "smollm2-135m"}[mode]


def one(i):
    body = json.dumps({"model": model_for(i), "messages": [{"role": "user", "content": "Reply with exactly: ok"}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t = time.time(); first = None; used = 0
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                used = d["usage"]["completion_tokens"]
            if first is None and d.get("choices") and d["choices"][0]["delta"].get("content"):
                first = time.time() - t
    with lock:
        ttft.append(first or 0.0); e2e.append(time.time() - t); tokens[0] += used


def worker():
    while True:
        with lock:
            i = next_i[0]; next_i[0] += 1
        if i >= n:
            return
        one(i)


start = time.time()
threads = [threading.Thread(target=worker) for _ in range(conc)]
[t.start() for t in threads]; [t.join() for t in threads]
el = time.time() - start
pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]
print(json.dumps({"mode": mode, "requests": n, "concurrency": conc, "max_tokens": max_tokens,
                  "req_per_s": round(n / el, 3), "tok_per_s": round(tokens[0] / el, 1),
                  "ttft_p50_ms": round(pct(ttft, .5) * 1e3, 1), "ttft_p95_ms": round(pct(ttft, .95) * 1e3, 1),
                  "e2e_p50_ms": round(pct(e2e, .5) * 1e3, 1), "e2e_p95_ms": round(pct(e2e, .95) * 1e3, 1)}))
