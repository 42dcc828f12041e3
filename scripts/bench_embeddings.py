"""Times /v1/embeddings against a running server (issue #24): one request of N inputs of ~25
tokens, REPS times (median), with the server to itself and again while 4 clients stream
64-token completions. Stdlib only.

    python3 scripts/bench_embeddings.py http://127.0.0.1:8000 32 5
"""
import json, sys, time, urllib.request, statistics, threading
url, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near".split()
inputs = [" ".join(words[(i + j) % len(words)] for j in range(24)) for i in range(n)]
def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=300))
post("/v1/embeddings", {"input": inputs[:2]})
def run():
    t = []
    for _ in range(reps):
        s = time.perf_counter(); r = post("/v1/embeddings", {"input": inputs}); t.append(time.perf_counter() - s)
    return r["usage"]["prompt_tokens"], t
tokens, alone = run()
stop = threading.Event()
def gen():
    while not stop.is_set():
        post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": True})
threads = [threading.Thread(target=gen) for _ in range(4)]
[th.start() for th in threads]
time.sleep(1)
_, loaded = run()
stop.set(); [th.join() for th in threads]
print(json.dumps({"inputs": n, "prompt_tokens": tokens, "alone_ms_median": statistics.median(alone) * 1e3, "alone_tok_s": tokens / statistics.median(alone), "with_4_generating_ms_median": statistics.median(loaded) * 1e3}))
