#!/usr/bin/env python3
"""Soak and churn test of `loramux serve` (issue #11): bounded in clients and time, loopback only.

Starts `target/release/loramux serve` on the default model (smollm2-135m) with >= 8 adapters
in a --lora-dir (copies of adapters/pirate and adapters/cowboy under other names) plus churn
adapters an admin thread loads and unloads every few seconds from an allowed root. CLIENTS
closed-loop clients run for SECONDS over the base and the adapters: chat and completions,
streaming and not, some disconnecting mid-stream, some sending prompts longer than the
context. Then it checks that the server drains back to idle (no running request, KV usage 0),
that its RSS did not grow after warm-up beyond the bound, and that SIGTERM exits 0.

Expected refusals (counted, not errors): 429 server_overloaded anywhere; 404 model_not_found
for a churn adapter (it may be unloaded); 400 context_length_exceeded for an over-long prompt.
Everything else is an unexpected error and fails the run: any 5xx, any other status, a
connection reset or early close that we did not cause, a malformed or truncated SSE stream, an
error event inside a stream, a client timeout.

Stdlib only. Writes DIR/soak.json, DIR/soak.txt, DIR/server.log and, when matplotlib is
importable, DIR/latency.png (default DIR: results/soak).

    scripts/soak.sh [CLIENTS] [SECONDS]          # the wrapper: builds the binary if missing
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ADMIN_KEY = "soak-admin-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colours.",
    "How do I boil an egg?",
    "Say hello in Spanish.",
    "What is 12 times 12?",
    "Give me a short motto for a ship's crew.",
    "Describe a horse in five words.",
]


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


class Unexpected(Exception):
    """An answer the server must never give."""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = Counter()  # sent, completed, disconnected, stream, ...
        self.refused = Counter()  # "429 server_overloaded" -> n
        self.unexpected = Counter()  # kind -> n
        self.unexpected_examples = []
        self.samples = []  # (t_end_rel, latency_s, ttft_s or None, stream)
        self.admin = Counter()

    def inc(self, key, n=1):
        with self.lock:
            self.c[key] += n

    def refuse(self, status, code):
        with self.lock:
            self.refused[f"{status} {code}"] += 1

    def bad(self, kind, detail):
        with self.lock:
            self.unexpected[kind] += 1
            if len(self.unexpected_examples) < 40:
                self.unexpected_examples.append({"kind": kind, "detail": detail[:600], "t": round(time.time(), 3)})

    def sample(self, t, lat, ttft, stream):
        with self.lock:
            self.samples.append((t, lat, ttft, stream))


def error_code(body):
    try:
        e = json.loads(body)["error"]
        return e.get("code") or e.get("type") or "?", e.get("message", "")
    except Exception:
        return "unparsed", body[:200].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)[:200]


class Soak:
    def __init__(self, args):
        self.args = args
        self.stats = Stats()
        self.t0 = None
        self.deadline = None
        self.port = None
        self.proc = None
        self.base = "base"
        self.adapters = []  # --lora-dir names
        self.churn = []  # names the admin thread toggles
        self.churn_loaded = {}
        self.churn_lock = threading.Lock()
        self.memory = []  # {"t", "rss_mib", "kv_usage", "running", "waiting"}
        self.stop_sampling = threading.Event()

    # ---------- server ----------
    def setup_adapters(self, tmp):
        lora_dir = os.path.join(tmp, "loras")
        extra = os.path.join(tmp, "extra")
        os.makedirs(lora_dir)
        os.makedirs(extra)
        src = [os.path.join(ROOT, "adapters", n) for n in ("pirate", "cowboy")]
        for d in src:
            if not os.path.isfile(os.path.join(d, "adapter_model.safetensors")):
                sys.exit(f"soak: missing example adapter {d}")
        for i in range(self.args.adapters):
            name = f"a{i:02d}"
            shutil.copytree(src[i % 2], os.path.join(lora_dir, name))
            self.adapters.append(name)
        for i in range(self.args.churn_adapters):
            shutil.copytree(src[(i + 1) % 2], os.path.join(extra, f"c{i}"))
            self.churn.append(f"churn{i}")
            self.churn_loaded[f"churn{i}"] = False
        return lora_dir, extra

    def start_server(self, lora_dir, extra):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        cmd = [
            self.args.binary, "serve",
            "--model", self.args.model,
            "--served-model-name", self.base,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--lora-dir", lora_dir,
            "--allowed-lora-root", extra,
            "--enable-lora-updates",
            "--admin-api-key", ADMIN_KEY,
            "--max-model-len", str(self.args.max_model_len),
            "--max-loras", str(self.args.max_loras),
            "--shutdown-timeout-secs", str(self.args.shutdown_timeout),
        ] + self.args.server_arg
        self.server_log = open(os.path.join(self.args.out, "server.log"), "wb")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        for kv in self.args.server_env:
            k, _, v = kv.partition("=")
            env[k] = v
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.server_log, stderr=subprocess.STDOUT, env=env)
        t = time.time()
        while time.time() - t < self.args.startup_timeout:
            if self.proc.poll() is not None:
                sys.exit(f"soak: server exited with {self.proc.returncode} during startup (see {self.server_log.name})")
            try:
                st, _ = self.request("GET", "/health", timeout=2)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        sys.exit("soak: server did not become healthy in time")

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = {"content-type": "application/json"} if body is not None else {}
            h.update(headers or {})
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def rss_mib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def metrics(self):
        st, body = self.request("GET", "/metrics", timeout=10)
        if st != 200:
            raise Unexpected(f"/metrics answered {st}")
        out = {}
        for line in body.decode().splitlines():
            m = re.match(r'^(vllm:kv_cache_usage_perc|vllm:num_requests_running|vllm:num_requests_waiting)\{[^}]*\}\s+(\S+)', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def snapshot(self, label=None):
        rec = {"t": round(time.time() - self.t0, 1), "rss_mib": self.rss_mib()}
        try:
            m = self.metrics()
            rec.update(kv_usage=m.get("vllm:kv_cache_usage_perc"), running=m.get("vllm:num_requests_running"),
                       waiting=m.get("vllm:num_requests_waiting"))
        except Exception as e:  # noqa: BLE001 - a failed scrape is itself unexpected
            self.stats.bad("metrics", repr(e))
        if label:
            rec["label"] = label
        self.memory.append(rec)
        return rec

    def sampler(self):
        next_t = time.time() + self.args.sample_every
        while not self.stop_sampling.wait(max(0.0, next_t - time.time())):
            self.snapshot()
            next_t += self.args.sample_every

    # ---------- clients ----------
    def client(self, idx):
        rnd = random.Random(self.args.seed * 1000 + idx)
        while time.time() < self.deadline:
            try:
                self.one_request(rnd)
            except Exception as e:  # noqa: BLE001 - the driver itself must not die silently
                self.stats.bad("driver", f"{type(e).__name__}: {e}")
                time.sleep(0.5)

    def one_request(self, rnd):
        kind = rnd.choices(list(self.args.kinds), weights=list(self.args.kinds.values()))[0]
        group = rnd.choices(list(self.args.targets), weights=list(self.args.targets.values()))[0]
        model = self.base if group == "base" else rnd.choice(self.adapters if group == "adapters" else self.churn)
        chat = rnd.random() < 0.6
        if kind == "overlong":
            text = "the cat sat on the mat " * (self.args.max_model_len // 2)  # ~3 tokens a word: far over
        else:
            text = rnd.choice(PROMPTS)
        body = {"model": model, "max_tokens": rnd.randint(4, self.args.max_tokens), "temperature": rnd.choice([0, 0.7, 1.0]),
                "seed": rnd.randint(0, 1 << 30)}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = text
            path = "/v1/completions"
        stream = kind in ("stream", "disconnect") or (kind == "overlong" and rnd.random() < 0.5)
        if stream:
            body["stream"] = True
            if rnd.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        self.stats.inc("sent")
        self.stats.inc(f"sent_{kind}")
        t_start = time.time()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.args.client_timeout)
        try:
            try:
                conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
                resp = conn.getresponse()
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                self.stats.bad("connection", f"{type(e).__name__}: {e} ({model} {kind})")
                return
            if resp.status != 200:
                data = resp.read()
                code, msg = error_code(data)
                ok = (resp.status == 429 and code == "server_overloaded") or \
                     (resp.status == 404 and code == "model_not_found" and model in self.churn) or \
                     (resp.status == 400 and code == "context_length_exceeded" and kind == "overlong")
                if ok:
                    self.stats.refuse(resp.status, code)
                    if resp.status == 429:
                        time.sleep(rnd.uniform(0.2, 1.0))
                else:
                    self.stats.bad(f"http_{resp.status}", f"{code}: {msg} ({model} {kind} {path})")
                return
            if kind == "overlong":
                self.stats.bad("overlong_accepted", f"a prompt over the context was accepted ({model} {path})")
                resp.read()
                return
            if not stream:
                try:
                    data = json.loads(resp.read())
                    ch = data["choices"][0]
                    if ch.get("finish_reason") not in ("stop", "length") or "usage" not in data:
                        raise ValueError(f"bad completion: {str(data)[:200]}")
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    self.stats.bad("malformed_json", str(e))
                    return
                except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                    self.stats.bad("connection", f"{type(e).__name__}: {e} (reading {model} {kind})")
                    return
                t_end = time.time()
                self.stats.inc("completed")
                self.stats.sample(t_end - self.t0, t_end - t_start, None, False)
                return
            self.read_stream(resp, conn, kind, model, t_start)
        finally:
            conn.close()

    def read_stream(self, resp, conn, kind, model, t_start):
        ttft = None
        finished = False
        done = False
        events = 0
        try:
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.rstrip(b"\r\n")
                if not line:
                    continue
                if not line.startswith(b"data: "):
                    raise Unexpected(f"not an SSE data line: {line[:120]!r}")
                payload = line[6:]
                if done:
                    raise Unexpected("data after [DONE]")
                if payload == b"[DONE]":
                    done = True
                    continue
                ev = json.loads(payload)
                if "error" in ev:
                    code, msg = error_code(payload)
                    raise Unexpected(f"error event in stream: {code}: {msg}")
                if not isinstance(ev.get("choices"), list):
                    raise Unexpected(f"chunk without choices: {payload[:160]!r}")
                for c in ev["choices"]:
                    text = c.get("text") or (c.get("delta") or {}).get("content")
                    if text and ttft is None:
                        ttft = time.time() - t_start
                    if c.get("finish_reason"):
                        if c["finish_reason"] not in ("stop", "length"):
                            raise Unexpected(f"finish_reason {c['finish_reason']}")
                        finished = True
                events += 1
                if kind == "disconnect" and events >= 2:
                    # Our own disconnect, mid-stream: close the socket without reading on.
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    conn.close()
                    self.stats.inc("disconnected")
                    return
        except Unexpected as e:
            self.stats.bad("sse", f"{e} ({model})")
            return
        except ValueError as e:
            self.stats.bad("sse", f"malformed JSON in stream: {e} ({model})")
            return
        except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
            self.stats.bad("connection", f"{type(e).__name__} mid-stream: {e} ({model} {kind})")
            return
        if not done or not finished:
            self.stats.bad("sse", f"stream ended without {'[DONE]' if not done else 'a finish_reason'} ({model} {kind})")
            return
        t_end = time.time()
        self.stats.inc("completed")
        if kind == "disconnect":
            self.stats.inc("disconnect_too_short")  # finished before we could hang up
        self.stats.sample(t_end - self.t0, t_end - t_start, ttft, True)

    # ---------- admin churn ----------
    def admin(self):
        rnd = random.Random(self.args.seed + 7)
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        next_t = time.time() + 1.0
        while time.time() < self.deadline:
            time.sleep(max(0.0, next_t - time.time()))
            next_t += rnd.uniform(self.args.churn_every * 0.5, self.args.churn_every * 1.5)
            name = rnd.choice(self.churn)
            i = self.churn.index(name)
            loaded = self.churn_loaded[name]
            try:
                if loaded:
                    st, body = self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, headers)
                    op = "unload"
                else:
                    st, body = self.request("POST", "/v1/load_lora_adapter",
                                            {"lora_name": name, "lora_path": os.path.join(self.extra, f"c{i}")}, headers)
                    op = "load"
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                self.stats.bad("admin_connection", f"{type(e).__name__}: {e}")
                continue
            code = "ok" if st == 200 else error_code(body)[0]
            with self.stats.lock:
                self.stats.admin[f"{op} {st} {code}"] += 1
            if st == 200:
                self.churn_loaded[name] = not loaded
            elif op == "load" and st == 409 and code == "conflict":
                # Still being unloaded (its last requests are running): a documented refusal,
                # retried at the next turn.
                pass
            else:
                self.stats.bad(f"admin_{op}_{st}", f"{code}: {body[:300]!r}")

    # ---------- run ----------
    def run(self):
        a = self.args
        os.makedirs(a.out, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="loramux-soak-")
        try:
            lora_dir, self.extra = self.setup_adapters(tmp)
            self.start_server(lora_dir, self.extra)
            return self.drive()
        finally:
            if self.proc and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)

    def drive(self):
        a = self.args
        self.t0 = time.time()
        self.deadline = self.t0 + a.seconds
        start = self.snapshot("start")
        print(f"soak: {a.clients} clients for {a.seconds}s on {a.model} (port {self.port}), "
              f"{len(self.adapters)} adapters + {len(self.churn)} churned; RSS {start['rss_mib']:.0f} MiB", flush=True)
        sampler = threading.Thread(target=self.sampler, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(a.clients)]
        threads.append(threading.Thread(target=self.admin, daemon=True))
        for t in threads:
            t.start()
        mid_taken = warm_taken = False
        while any(t.is_alive() for t in threads) and time.time() < self.deadline + a.client_timeout + 30:
            time.sleep(0.5)
            if not warm_taken and time.time() - self.t0 >= a.seconds * 0.2:
                self.snapshot("warm")
                warm_taken = True
            if not mid_taken and time.time() - self.t0 >= a.seconds / 2:
                self.snapshot("middle")
                mid_taken = True
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            self.stats.bad("stuck_clients", f"{stuck} client threads still running after the deadline")
        self.stop_sampling.set()
        sampler.join(5)
        # Back to idle: no request running or waiting, KV usage 0.
        idle = None
        t_idle = time.time()
        while time.time() - t_idle < a.idle_timeout:
            try:
                m = self.metrics()
            except Exception as e:  # noqa: BLE001
                self.stats.bad("metrics", repr(e))
                break
            if m.get("vllm:kv_cache_usage_perc", 1) == 0 and m.get("vllm:num_requests_running", 1) == 0 \
                    and m.get("vllm:num_requests_waiting", 0) == 0:
                idle = round(time.time() - t_idle, 1)
                break
            time.sleep(0.5)
        end = self.snapshot("end")
        try:
            health, _ = self.request("GET", "/health", timeout=10)
        except (OSError, http.client.HTTPException) as e:
            health = f"no answer ({type(e).__name__}; server exit {self.proc.poll()})"
        # Graceful stop: SIGTERM with nothing in flight must exit 0 promptly.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            exit_code = self.proc.wait(a.shutdown_timeout + 15)
        except subprocess.TimeoutExpired:
            exit_code = "timeout"
        return self.report(start, end, idle, health, exit_code)

    def report(self, start, end, idle, health, exit_code):
        a = self.args
        s = self.stats
        windows = []
        w = a.window
        nwin = int(a.seconds // w) + 1
        for k in range(nwin + int(a.client_timeout // w) + 1):
            lats = [x[1] for x in s.samples if k * w <= x[0] < (k + 1) * w]
            ttfts = [x[2] for x in s.samples if k * w <= x[0] < (k + 1) * w and x[2] is not None]
            if not lats:
                continue
            windows.append({"t_start": k * w, "completed": len(lats), "p50_s": round(percentile(lats, 50), 3),
                            "p99_s": round(percentile(lats, 99), 3),
                            "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None})
        # RSS bound: after warm-up (the sample nearest 20 % of the run), growth stays within it.
        rss_series = [m for m in self.memory if m.get("rss_mib")]
        warm = next((m for m in rss_series if m.get("label") == "warm"), None)
        if warm is None and rss_series:
            warm = min(rss_series, key=lambda m: abs(m["t"] - a.seconds * 0.2))
        middle = next((m for m in self.memory if m.get("label") == "middle"), None)
        bound = warm["rss_mib"] * a.rss_factor + a.rss_slack_mib if warm else None
        checks = {
            "no_unexpected_errors": sum(s.unexpected.values()) == 0,
            "idle_after_run (kv_cache_usage_perc 0, num_requests_running 0)": idle is not None,
            "rss_within_bound": bound is None or (end["rss_mib"] or 0) <= bound,
            "health_200_after_run": health == 200,
            "sigterm_exit_0": exit_code == 0,
            "some_requests_completed": s.c["completed"] > 0,
        }
        all_lats = [x[1] for x in s.samples]
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv),
            "server_command": " ".join(self.cmd), "server_env": self.args.server_env,
            "clients": a.clients, "seconds": a.seconds, "model": a.model,
            "adapters": self.adapters, "churn_adapters": self.churn,
            "requests": {
                "sent": s.c["sent"], "completed": s.c["completed"],
                "disconnected_by_client": s.c["disconnected"],
                "by_kind": {k[5:]: v for k, v in s.c.items() if k.startswith("sent_")},
                "refused": dict(s.refused),
                "unexpected": dict(s.unexpected),
            },
            "unexpected_examples": s.unexpected_examples,
            "admin": dict(s.admin),
            "latency_s": {"p50": percentile(all_lats, 50), "p99": percentile(all_lats, 99)},
            "latency_windows": windows,
            "memory": {
                "rss_start_mib": start["rss_mib"], "rss_warm_mib": warm["rss_mib"] if warm else None,
                "rss_warm_t": warm["t"] if warm else None,
                "rss_middle_mib": middle["rss_mib"] if middle else None, "rss_end_mib": end["rss_mib"],
                "rss_bound_mib": bound,
                "bound": f"end <= {a.rss_factor} x RSS at 20% of the run + {a.rss_slack_mib} MiB",
                "samples": self.memory,
            },
            "idle_after_s": idle, "kv_usage_end": end.get("kv_usage"), "running_end": end.get("running"),
            "health_after": health, "sigterm_exit_code": exit_code,
            "checks": checks, "pass": all(checks.values()),
        }
        with open(os.path.join(a.out, "soak.json"), "w") as f:
            json.dump(result, f, indent=1)
        lines = [
            f"loramux soak {result['date']}: {a.clients} clients, {a.seconds}s, {a.model}, "
            f"{len(self.adapters)} adapters + {len(self.churn)} churned (admin every ~{a.churn_every}s)",
            f"requests: sent {s.c['sent']}, completed {s.c['completed']}, disconnected by us {s.c['disconnected']}, "
            f"by kind {result['requests']['by_kind']}",
            f"refused (expected): {dict(s.refused) or 'none'}",
            f"unexpected errors: {sum(s.unexpected.values())} {dict(s.unexpected) or ''}",
            f"admin: {dict(s.admin)}",
            f"latency: p50 {fmt(result['latency_s']['p50'])} s, p99 {fmt(result['latency_s']['p99'])} s (completed requests)",
            "RSS MiB: start {} / warm (t={}s) {} / middle {} / end {}; bound {}".format(
                fmt(start["rss_mib"]), warm["t"] if warm else "-", fmt(warm["rss_mib"] if warm else None),
                fmt(middle["rss_mib"] if middle else None), fmt(end["rss_mib"]), fmt(bound)),
            f"after the run: idle in {idle} s, kv_cache_usage_perc {end.get('kv_usage')}, "
            f"num_requests_running {end.get('running')}; /health {health}; SIGTERM exit {exit_code}",
            "window  completed  p50_s   p99_s   ttft_p50_s   rss_mib",
        ]
        for wdw in windows:
            rss = next((m["rss_mib"] for m in self.memory if wdw["t_start"] <= m["t"] < wdw["t_start"] + a.window and m.get("rss_mib")), None)
            lines.append(f"{wdw['t_start']:>5}s  {wdw['completed']:>9}  {wdw['p50_s']:>6.3f}  {wdw['p99_s']:>6.3f}  "
                         f"{fmt(wdw['ttft_p50_s']):>10}  {fmt(rss):>8}")
        for k, v in checks.items():
            lines.append(f"check {'PASS' if v else 'FAIL'}: {k}")
        for ex in s.unexpected_examples[:10]:
            lines.append(f"  unexpected {ex['kind']}: {ex['detail']}")
        lines.append("PASS" if result["pass"] else "FAIL")
        text = "\n".join(lines)
        with open(os.path.join(a.out, "soak.txt"), "w") as f:
            f.write(text + "\n")
        print(text)
        self.plot(windows)
        return 0 if result["pass"] else 1

    def plot(self, windows):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("soak: matplotlib not available: no latency plot")
            return
        fig, ax = plt.subplots(figsize=(8, 4))
        t = [w["t_start"] for w in windows]
        ax.plot(t, [w["p50_s"] for w in windows], label="p50")
        ax.plot(t, [w["p99_s"] for w in windows], label="p99")
        ax.set_xlabel(f"time (s, {self.args.window}-s windows)")
        ax.set_ylabel("end-to-end latency (s)")
        ax.set_title(f"loramux soak: {self.args.clients} clients, {self.args.model}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.args.out, "latency.png"), dpi=120)
        print(f"soak: plot {os.path.join(self.args.out, 'latency.png')}")


def fmt(x):
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.0f}"


def weights(text):
    """'a=1,b=2' -> {'a': 1.0, 'b': 2.0} (at least one positive weight)."""
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    if not any(v > 0 for v in out.values()):
        raise argparse.ArgumentTypeError("needs a positive weight")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clients", nargs="?", type=int, default=64)
    p.add_argument("seconds", nargs="?", type=float, default=600)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "loramux"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "soak"))
    p.add_argument("--adapters", type=int, default=10, help="adapters in the --lora-dir (>= 8)")
    p.add_argument("--churn-adapters", type=int, default=3, help="adapters the admin thread loads and unloads")
    p.add_argument("--churn-every", type=float, default=3.0, help="mean seconds between admin operations")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens a client asks for")
    p.add_argument("--client-timeout", type=float, default=120)
    p.add_argument("--startup-timeout", type=float, default=180)
    p.add_argument("--idle-timeout", type=float, default=30, help="seconds the server gets to return to idle")
    p.add_argument("--shutdown-timeout", type=int, default=20)
    p.add_argument("--sample-every", type=float, default=10)
    p.add_argument("--window", type=float, default=10)
    p.add_argument("--rss-factor", type=float, default=1.25)
    p.add_argument("--rss-slack-mib", type=float, default=64)
    p.add_argument("--kinds", type=weights, default="plain=45,stream=40,disconnect=10,overlong=5",
                   help="request mix: plain, stream, disconnect (hang up mid-stream), overlong (over the context)")
    p.add_argument("--targets", type=weights, default="base=25,adapters=60,churn=15",
                   help="which model requests name: the base, the --lora-dir adapters, the churned ones")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for loramux serve (repeatable)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    a = p.parse_args()
    if set(a.kinds) - {"plain", "stream", "disconnect", "overlong"} or set(a.targets) - {"base", "adapters", "churn"}:
        sys.exit("soak: --kinds takes plain/stream/disconnect/overlong, --targets base/adapters/churn")
    if a.clients < 1 or a.seconds <= 0 or a.clients > 1024 or a.seconds > 86400:
        sys.exit("soak: CLIENTS in 1..1024, SECONDS in (0, 86400]")
    if not os.access(a.binary, os.X_OK):
        sys.exit(f"soak: {a.binary} not found (cargo build --release)")
    sys.exit(Soak(a).run())


if __name__ == "__main__":
    main()
