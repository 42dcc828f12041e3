#!/usr/bin/env python3
"""Injected faults against a live `loramux serve` (issue #11), each scripted and checked.

    scripts/faults.sh [SCENARIO...]      # default: all; results/faults/{faults.json,faults.txt}

Scenarios (each starts its own server on loopback, smollm2-135m, adapters copied from adapters/):
  truncated_resident   an adapter's weights file is truncated in place (then deleted) while the
                       adapter is resident: it keeps serving from memory; once evicted, the lazy
                       re-read fails with a clear 4xx naming the file; restored, it serves again
  truncated_during_read  the file is truncated and restored in place, over and over, while
                       /v1/load_lora_adapter reads it: every answer is 200 or a clear 400, and
                       the process never dies (no SIGBUS from a shrinking memory map)
  corrupt_at_load      garbage, truncated, NaN, mis-shaped, oversized-header and bad-config
                       adapters are each refused with 400 invalid_adapter; the server serves on
  kv_exhausted         a KV budget far below the offered load: requests queue or get 429,
                       never a 5xx, an OOM or a stuck request; KV usage returns to 0
  sigterm_under_load   SIGTERM while streams are running: each stream finishes or ends with a
                       clear error event within the grace period, new requests are refused,
                       the process exits 0
  sigkill_restart      SIGKILL under load, restart with the same command: serves again, model
                       and adapter files unchanged (sha256)
  disk_full_bench      `loramux bench switch` writing into a full filesystem (a 4k / 48k tmpfs;
                       needs mount rights, else skipped): an error exit naming the cause, no
                       panic, no truncated result JSON; the server is unaffected

Stdlib only. Exit status: 0 when every scenario passes.
"""
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("LORAMUX_BIN", os.path.join(ROOT, "target", "release", "loramux"))
MODEL = os.environ.get("FAULTS_MODEL", "smollm2-135m")
OUT = os.environ.get("FAULTS_OUT", os.path.join(ROOT, "results", "faults"))
ADMIN = "faults-admin-key"
CHAT = "/v1/chat/completions"


class Server:
    def __init__(self, name, args, tmp):
        self.name = name
        self.args = args
        self.tmp = tmp
        self.proc = None
        self.port = None
        self.log_path = os.path.join(OUT, f"{name}.server.log")

    def start(self, append=False, timeout=180):
        if self.port is None:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
            s.close()
        self.cmd = [BINARY, "serve", "--model", MODEL, "--served-model-name", "base", "--host", "127.0.0.1",
                    "--port", str(self.port)] + self.args
        log = open(self.log_path, "ab" if append else "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup ({self.log_path})")
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return time.time() - t
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def post(self, path, body, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = {"content-type": "application/json"}
            h.update(headers or {})
            conn.request("POST", path, body=json.dumps(body), headers=h)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def get(self, path, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def chat(self, model, max_tokens=8, **kw):
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
                "temperature": 0}
        body.update(kw)
        return self.post(CHAT, body)

    def admin(self, path, body):
        return self.post(path, body, {"authorization": f"Bearer {ADMIN}"})

    def metric(self, name):
        st, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def err(body):
    try:
        e = json.loads(body)["error"]
        return e.get("code") or e.get("type"), e.get("message", "")
    except Exception:
        return None, body[:200].decode("utf-8", "replace")


def copy_adapter(src_name, dst):
    shutil.copytree(os.path.join(ROOT, "adapters", src_name), dst)
    return dst


class Check:
    def __init__(self, name):
        self.name = name
        self.items = []
        self.notes = []

    def expect(self, ok, what):
        self.items.append((bool(ok), what))
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        return ok

    def note(self, what):
        self.notes.append(what)
        print(f"  note: {what}", flush=True)

    @property
    def passed(self):
        return bool(self.items) and all(ok for ok, _ in self.items)


# ---------------------------------------------------------------- scenarios

def truncated_resident(c, tmp):
    d = os.path.join(tmp, "loras")
    os.makedirs(d)
    for n in ("a0", "a1"):
        copy_adapter("pirate", os.path.join(d, n))
    srv = Server("truncated_resident", ["--lora-dir", d, "--max-loras", "1"], tmp)
    srv.start()
    try:
        st, _ = srv.chat("a0")
        c.expect(st == 200, f"a0 serves before the fault ({st})")
        w = os.path.join(d, "a0", "adapter_model.safetensors")
        full = open(w, "rb").read()
        os.truncate(w, len(full) // 3)
        st, body = srv.chat("a0")
        c.expect(st == 200, f"a0 truncated on disk while resident still serves from memory ({st} {err(body)[0] if st != 200 else ''})")
        st, _ = srv.chat("a1")
        c.expect(st == 200, f"a1 serves and evicts a0 (--max-loras 1) ({st})")
        st, body = srv.chat("a0")
        code, msg = err(body)
        c.expect(400 <= st < 500, f"a0 lazily re-read from the truncated file: clear 4xx ({st} {code}: {msg[:160]})")
        c.expect(srv.alive() and srv.get("/health")[0] == 200, "the server is alive and healthy (no SIGBUS)")
        st, _ = srv.chat("base")
        c.expect(st == 200, f"the base model still serves ({st})")
        st, _ = srv.chat("a1")
        c.expect(st == 200, f"other adapters still serve ({st})")
        open(w, "wb").write(full)
        st, body = srv.chat("a0")
        c.expect(st == 200, f"a0 serves again once its file is restored ({st} {err(body) if st != 200 else ''})")
        # Deleted: a1 is resident again after this, its weights file then removed.
        st, _ = srv.chat("a1")
        os.remove(os.path.join(d, "a1", "adapter_model.safetensors"))
        st, body = srv.chat("a1")
        c.expect(st == 200, f"a1 with its weights file deleted while resident still serves ({st})")
        srv.chat("a0")
        st, body = srv.chat("a1")
        code, msg = err(body)
        c.expect(400 <= st < 500, f"a1 re-read after eviction, file deleted: clear 4xx ({st} {code}: {msg[:160]})")
        c.expect(srv.alive() and srv.get("/health")[0] == 200, "the server is alive and healthy")
    finally:
        srv.stop()


def truncated_during_read(c, tmp):
    root = os.path.join(tmp, "root")
    a = copy_adapter("pirate", os.path.join(root, "x"))
    srv = Server("truncated_during_read", ["--allowed-lora-root", root, "--enable-lora-updates", "--admin-api-key", ADMIN,
                                           "--lora-modules", f"keep={os.path.join(ROOT, 'adapters', 'cowboy')}"], tmp)
    srv.start()
    w = os.path.join(a, "adapter_model.safetensors")
    full = open(w, "rb").read()
    stop = threading.Event()

    def flapper():
        rnd = random.Random(3)
        # In place (same inode): shrink, then write the bytes back; what a map would see.
        fd = os.open(w, os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, rnd.choice([0, 1024, len(full) // 2, len(full) - 7]))
                time.sleep(rnd.uniform(0, 0.002))
                os.pwrite(fd, full, 0)
                time.sleep(rnd.uniform(0, 0.002))
        finally:
            os.pwrite(fd, full, 0)
            os.ftruncate(fd, len(full))
            os.close(fd)

    t = threading.Thread(target=flapper, daemon=True)
    t.start()
    outcomes = {}
    bad = []
    end = time.time() + float(os.environ.get("FAULTS_FLAP_SECONDS", "10"))
    n = 0
    try:
        while time.time() < end and srv.alive():
            try:
                st, body = srv.admin("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": a, "load_inplace": True})
            except (OSError, http.client.HTTPException) as e:
                bad.append(f"connection: {e}")
                break
            code = err(body)[0] if st != 200 else "ok"
            outcomes[f"{st} {code}"] = outcomes.get(f"{st} {code}", 0) + 1
            if not (st == 200 or (st == 400 and code == "invalid_adapter")):
                bad.append(f"{st} {err(body)}")
            n += 1
    finally:
        stop.set()
        t.join()
    c.note(f"{n} loads while the file flapped: {outcomes}")
    rc = srv.proc.poll()
    c.expect(rc is None, f"the process survived every read (exit {rc}{' = SIGBUS' if rc == -signal.SIGBUS else ''})")
    c.expect(not bad, f"every load answered 200 or 400 invalid_adapter ({bad[:3]})")
    if srv.alive():
        st, body = srv.admin("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": a, "load_inplace": True})
        c.expect(st == 200, f"loads again once the file is whole ({st})")
        st, _ = srv.chat("x")
        c.expect(st == 200, f"serves the adapter ({st})")
    srv.stop()


def write_safetensors(path, tensors, header_extra=None, raw_header=None):
    """tensors: name -> (dtype, shape, bytes)."""
    hdr, off, blobs = {}, 0, []
    for name, (dt, shape, data) in tensors.items():
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    if header_extra:
        hdr.update(header_extra)
    h = raw_header if raw_header is not None else json.dumps(hdr).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def corrupt_at_load(c, tmp):
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    src = os.path.join(ROOT, "adapters", "pirate")
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    full = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
    cases = {}

    def case(name, config=None, weights=None):
        d = os.path.join(root, name)
        os.makedirs(d)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config if config is not None else cfg))
        p = os.path.join(d, "adapter_model.safetensors")
        if callable(weights):
            weights(p)
        else:
            open(p, "wb").write(full if weights is None else weights)
        cases[name] = d

    case("garbage", weights=os.urandom(4096))
    case("truncated", weights=full[: len(full) // 2])
    case("empty", weights=b"")
    case("header_too_long", weights=struct.pack("<Q", 1 << 62) + b"{}")
    case("header_not_json", weights=struct.pack("<Q", 8) + b"not json")
    r = cfg["r"]
    case("nan", weights=lambda p: write_safetensors(p, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [r, 576], struct.pack("<f", float("nan")) * (r * 576)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [576, r], b"\0" * (4 * 576 * r)),
    }))
    case("wrong_shape", weights=lambda p: write_safetensors(p, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [r, 7], b"\0" * (4 * r * 7)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [576, r], b"\0" * (4 * 576 * r)),
    }))
    case("config_not_json", config="{ this is not json")
    case("config_dora", config={**cfg, "use_dora": True})
    case("config_rank_huge", config={**cfg, "r": 1 << 40})
    # Finite as a double, infinite as the f32 scale the kernels use: alpha / r = 1.25e299.
    case("config_alpha_f32_overflow", config={**cfg, "lora_alpha": 1e300})
    case("config_alpha_inf", config=json.dumps({**cfg, "lora_alpha": 1e308}).replace("1e+308", "1e999"))
    srv = Server("corrupt_at_load", ["--allowed-lora-root", root, "--enable-lora-updates", "--admin-api-key", ADMIN], tmp)
    srv.start()
    try:
        for name, d in cases.items():
            st, body = srv.admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": d})
            code, msg = err(body)
            c.expect(st == 400 and code == "invalid_adapter", f"{name}: {st} {code}: {msg[:150]}")
            if not srv.alive():
                c.expect(False, f"server died on {name} (exit {srv.proc.returncode})")
                return
        st, _ = srv.chat("base")
        c.expect(st == 200, f"the base model serves after every refusal ({st})")
        st, body = srv.get("/v1/models")
        ids = [m["id"] for m in json.loads(body)["data"]]
        c.expect(ids == ["base"], f"no refused adapter is listed ({ids})")
    finally:
        srv.stop()


def stream(srv, model, max_tokens, results, i, t_sig=None):
    """Reads one streaming chat; stores (outcome, detail, end_time)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True}
        conn.request("POST", CHAT, body=json.dumps(body), headers={"content-type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            results[i] = (f"status {r.status}", err(r.read()), time.time())
            return
        finished = done = False
        error = None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            p = line[6:]
            if p == b"[DONE]":
                done = True
                continue
            ev = json.loads(p)
            if "error" in ev:
                error = err(p)
            for ch in ev.get("choices", []):
                if ch.get("finish_reason"):
                    finished = True
        if done and finished:
            results[i] = ("finished", None, time.time())
        elif done and error:
            results[i] = ("error_event", error, time.time())
        else:
            results[i] = ("truncated", f"done={done} finished={finished}", time.time())
    except (OSError, http.client.HTTPException, ValueError) as e:
        results[i] = ("connection", repr(e), time.time())
    finally:
        conn.close()


def sigterm_under_load(c, tmp):
    grace = 4
    srv = Server("sigterm_under_load", ["--shutdown-timeout-secs", str(grace), "--lora-modules",
                                        f"pirate={os.path.join(ROOT, 'adapters', 'pirate')}"], tmp)
    srv.start()
    n = 12
    results = {}
    # Short ones that can finish within the grace period and long ones that cannot.
    threads = [threading.Thread(target=stream, args=(srv, "pirate" if i % 2 else "base", 16 if i % 3 == 0 else 2000, results, i))
               for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    running = srv.metric("vllm:num_requests_running")
    t_sig = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        st, body = srv.chat("base")
        late = f"{st} {err(body)[0]}"
        late_ok = st == 503
    except OSError as e:
        late, late_ok = f"refused connection ({type(e).__name__})", True
    for t in threads:
        t.join(grace + 30)
    try:
        rc = srv.proc.wait(grace + 15)
    except subprocess.TimeoutExpired:
        rc = "still running"
    t_exit = time.time() - t_sig
    c.note(f"{running:.0f} running at SIGTERM; exit after {t_exit:.1f}s")
    kinds = {}
    for i, (kind, detail, t_end) in sorted(results.items()):
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "error_event":
            c.note(f"stream {i}: error event {detail} after {t_end - t_sig:.1f}s")
    c.note(f"outcomes: {kinds}")
    c.expect(len(results) == n, f"every stream ended ({len(results)}/{n})")
    c.expect(all(k in ("finished", "error_event") for k, _, _ in results.values()),
             "each stream finished or got a clear error event (no truncated stream, no reset)")
    c.expect(all(t_end - t_sig <= grace + 3 for _, _, t_end in results.values()),
             f"all ended within the grace period ({grace}s) + 3s")
    c.expect(kinds.get("finished", 0) >= 1, "short requests finished during the drain")
    c.expect(late_ok, f"a request after SIGTERM is refused ({late})")
    c.expect(rc == 0, f"exit code 0 ({rc})")


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def sigkill_restart(c, tmp):
    d = os.path.join(tmp, "loras")
    os.makedirs(d)
    copy_adapter("pirate", os.path.join(d, "p"))
    copy_adapter("cowboy", os.path.join(d, "q"))
    srv = Server("sigkill_restart", ["--lora-dir", d], tmp)
    srv.start()
    files = [os.path.join(d, n, f) for n in ("p", "q") for f in ("adapter_config.json", "adapter_model.safetensors")]
    before = {f: sha(f) for f in files}
    results = {}
    threads = [threading.Thread(target=stream, args=(srv, ["p", "q", "base"][i % 3], 500, results, i)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    srv.proc.send_signal(signal.SIGKILL)
    rc = srv.proc.wait(10)
    for t in threads:
        t.join(30)
    c.expect(rc == -signal.SIGKILL, f"killed ({rc})")
    c.note(f"clients of the killed server: {sorted(k for k, _, _ in results.values())}")
    t = srv.start(append=True)
    c.expect(True, f"restarted with the same command, healthy in {t:.1f}s")
    for m in ("base", "p", "q"):
        st, _ = srv.chat(m)
        c.expect(st == 200, f"{m} serves after the restart ({st})")
    after = {f: sha(f) for f in files}
    c.expect(before == after, "adapter files unchanged on disk (sha256)")
    srv.stop()
    c.expect(srv.proc.returncode == 0, f"then SIGTERM exits 0 ({srv.proc.returncode})")


def kv_exhausted(c, tmp):
    # ~45 KiB of KV per token on SmolLM2-135M: 0.02 GiB holds ~460 tokens (one 256-token
    # sequence must fit), far below 24 concurrent requests of ~150 tokens.
    srv = Server("kv_exhausted", ["--kv-cache-gib", "0.02", "--max-model-len", "256", "--max-queue-delay-secs", "0"], tmp)
    srv.start()
    results = {}
    n = 24
    rss0 = rss(srv)
    threads = [threading.Thread(target=stream, args=(srv, "base", 120, results, i)) for i in range(n)]
    for t in threads:
        t.start()
    peak = rss0
    peak_kv = peak_waiting = 0.0
    limit = time.time() + 300
    while any(t.is_alive() for t in threads) and time.time() < limit:
        peak = max(peak, rss(srv) or 0)
        peak_kv = max(peak_kv, srv.metric("vllm:kv_cache_usage_perc"))
        peak_waiting = max(peak_waiting, srv.metric("vllm:num_requests_waiting"))
        time.sleep(0.25)
    kinds = {}
    for k, detail, _ in results.values():
        key = f"{k} {detail[0]}" if isinstance(detail, tuple) else k
        kinds[key] = kinds.get(key, 0) + 1
    c.note(f"outcomes: {kinds}; RSS {rss0:.0f} -> peak {peak:.0f} MiB; peak KV usage {peak_kv:.2f}, "
           f"peak waiting {peak_waiting:.0f}")
    c.expect(peak_kv >= 0.8 and peak_waiting >= 1, "the KV budget was exhausted (usage >= 0.8 and requests waited)")
    ok = all(k == "finished" or (k == "status 429") for k, _, _ in results.values())
    c.expect(len(results) == n and ok, "every request finished or got 429 (no 5xx, no stuck request)")
    c.expect(srv.alive(), "the server is alive (no OOM)")
    time.sleep(1)
    c.expect(srv.metric("vllm:kv_cache_usage_perc") == 0 and srv.metric("vllm:num_requests_running") == 0,
             "KV usage and running requests back to 0")
    srv.stop()


def rss(srv):
    try:
        for line in open(f"/proc/{srv.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def disk_full_bench(c, tmp):
    """`loramux bench switch --url` writing its results into a tiny tmpfs (needs mount rights)."""
    srv = Server("disk_full_bench", ["--lora-modules", f"pirate={os.path.join(ROOT, 'adapters', 'pirate')}",
                                     f"cowboy={os.path.join(ROOT, 'adapters', 'cowboy')}"], tmp)
    srv.start()
    try:
        for size in ("4k", "48k"):
            mnt = os.path.join(tmp, f"full-{size}")
            os.makedirs(mnt)
            m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True, text=True)
            if m.returncode != 0:
                c.note(f"skipped: cannot mount a tmpfs ({m.stderr.strip()[:120]}); needs root")
                c.expect(True, "skipped (no mount rights)")
                return
            try:
                out = os.path.join(mnt, "switch")
                r = subprocess.run([BINARY, "bench", "switch", "--url", f"http://127.0.0.1:{srv.port}", "--requests", "4",
                                    "--runs", "1", "--out", out], capture_output=True, text=True, timeout=300)
                text = r.stdout + r.stderr
                c.note(f"{size}: exit {r.returncode}; files {sorted(os.listdir(out)) if os.path.isdir(out) else []}; "
                       f"last line: {text.strip().splitlines()[-1][:200] if text.strip() else ''}")
                c.expect(r.returncode not in (0, 101) and r.returncode > 0,
                         f"{size}: fails with an error exit (not 0, not a panic's 101): {r.returncode}")
                c.expect("panicked" not in text, f"{size}: no panic")
                c.expect("No space left" in text or "space" in text.lower(), f"{size}: the error says the disk is full")
                j = os.path.join(out, "switch.json")
                try:
                    json.load(open(j))
                    state = "whole"
                except FileNotFoundError:
                    state = "absent"
                except ValueError:
                    state = "truncated"
                c.expect(state != "truncated", f"{size}: no truncated result JSON left behind (switch.json {state})")
            finally:
                subprocess.run(["umount", mnt], capture_output=True)
        st, _ = srv.chat("base")
        c.expect(st == 200, f"the server is unaffected ({st})")
    finally:
        srv.stop()


SCENARIOS = {
    "truncated_resident": truncated_resident,
    "truncated_during_read": truncated_during_read,
    "corrupt_at_load": corrupt_at_load,
    "kv_exhausted": kv_exhausted,
    "sigterm_under_load": sigterm_under_load,
    "sigkill_restart": sigkill_restart,
    "disk_full_bench": disk_full_bench,
}


def main():
    names = sys.argv[1:] or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            sys.exit(f"unknown scenario {n} (known: {', '.join(SCENARIOS)})")
    if not os.access(BINARY, os.X_OK):
        sys.exit(f"{BINARY} not found (cargo build --release)")
    os.makedirs(OUT, exist_ok=True)
    report = []
    for n in names:
        print(f"== {n}", flush=True)
        c = Check(n)
        tmp = tempfile.mkdtemp(prefix=f"loramux-fault-{n}-")
        t = time.time()
        try:
            SCENARIOS[n](c, tmp)
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is a failure, not a crash of the script
            c.expect(False, f"scenario raised {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report.append({"scenario": n, "pass": c.passed, "seconds": round(time.time() - t, 1),
                       "checks": [{"ok": ok, "what": w} for ok, w in c.items], "notes": c.notes})
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": MODEL, "scenarios": report,
               "pass": all(r["pass"] for r in report)}
    with open(os.path.join(OUT, "faults.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"{'PASS' if r['pass'] else 'FAIL'}  {r['scenario']} ({r['seconds']}s)" for r in report]
    with open(os.path.join(OUT, "faults.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    main()
