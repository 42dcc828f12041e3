#!/usr/bin/env python3
"""Capacity simulation of a pool of loramux replicas behind GIE's endpoint picker (issue #13).

A discrete-event simulation of N replicas fed by Poisson arrivals over A adapters of Zipf(alpha)
popularity, routed round-robin or by a LoRA-affinity picker that filters as the Gateway API
Inference Extension's endpoint picker does. Python standard library only; deterministic for a
given --seed (the output holds no clock time).

The replica model (docs/deployment.md, "The capacity simulation", says the same at length):

  * Each replica runs loramux's scheduler loop step by step: admission (first come first served,
    --max-num-seqs sequences, a request starts only once its adapter is resident), then one
    forward pass of every decoding sequence plus prompt chunks up to --max-num-batched-tokens
    (chunked prefill, decode rows first), as crates/engine/src/scheduler does.
  * A pass costs scale * (t_decode(b) + prefill_tokens / prefill_tps), where t_decode(b) is
    interpolated from the engine bench's decode tok/s at batch 1/8/32 and prefill_tps is its
    prefill tok/s (results/engine_serving.json). `scale` is fitted so that one simulated replica
    saturates at the throughput measured by `loramux bench load` (--curve): service capacity is
    the measured saturation. Request sizes (prompt, output tokens) are resampled from the
    curve's own samples; the SLO is the curve's.
  * At most --max-loras adapters are resident per replica (LRU over idle ones, as the LoraManager
    evicts). A miss reads the adapter off the loop for --load-ms (measured cold load) while the
    request waits; when every slot is pinned by running requests the request is blocked, and a
    request blocked for 2 s stops later adapter requests from starting (loramux's adapter_wait).
    Churn slows the pass: step time / (1 - swap_slowdown * miss fraction of the last 32 starts),
    from `bench swap`'s 0.93-0.96 of single-adapter throughput when the resident set churns.
  * loramux's admission gate: a request is refused (HTTP 429) when as many requests wait as the
    replica starts in --max-queue-delay seconds (start rate measured while requests wait, EWMA).

Routing sees each replica's metrics as GIE scrapes them (every --scrape-ms): waiting, KV use,
running and waiting adapter lists and max_lora, an idle replica keeping its last non-empty lists.
  round-robin    : replicas in turn (a plain Service), state ignored.
  lora-affinity  : GIE's filter tree (its default-plugins config: low-queue, lora-affinity,
                   least-queue, least-kv-cache filters, then a random pick): replicas whose waiting
                   queue is <= 128 (QUEUING_THRESHOLD_LORA); of those, the ones with the adapter
                   running or waiting, else the ones with a free adapter slot (len(running) +
                   len(waiting) < max_lora; the affinity group wins with probability 0.999 when both
                   exist), else all; then the least-queue and least-KV range filters (values within
                   the lowest 1/len of their range); a random pick among what is left. When no
                   replica passes the low-queue filter: least-queue, then the LoRA-cheap ones, then
                   least-KV. lora-affinity:Q sets the low-queue threshold to Q.
  least-queue    : the same without the LoRA step (optional, for comparison).
  gie-scorers    : GIE's plugin profile approximated: queue-scorer + kv-cache-utilization-scorer +
                   lora-affinity-scorer (1 running, 0.8 free slot, 0.6 waiting), weight 1 each, the
                   highest total wins (optional; GIE's shipped weights differ).

usage: scripts/capacity_sim.py [--replicas 1-8] [--adapters 100] [--alpha 1.0] [--max-loras 8]
       [--rates 2,4,...] [--seed 0] [--curve results/load_curve/load.json] [--out ...] [--svg ...]
"""
import argparse
import bisect
import heapq
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict, deque

# ---------------------------------------------------------------------------------------------
# Inputs

# Engine figures of 2026-12-03 (`loramux bench engine --sections throughput,mix --batches 1,8,32
# --out results/engine_serving.json`), used when that file is absent.
DEFAULT_DECODE_TPS = {1: 317.2, 8: 660.0, 32: 772.7}
DEFAULT_PREFILL_TPS = 1311.1  # mean of 1213 / 1395 / 1325 tok/s at batch 1 / 8 / 32

# loramux defaults (crates/engine/src/scheduler/mod.rs, crates/engine/src/lora/manager.rs)
KV_BYTES_PER_TOKEN = 46080          # SmolLM2-135M: 30 layers x 3 KV heads x 64 x 2 x f32
KV_BUDGET_TOKENS = 46592            # 2 GiB budget (server log: tokens=46592)
RATE_WINDOW_S = 0.5                 # admission gate's start-rate window
ADAPTER_WAIT_S = 2.0                # a request blocked this long stops later adapter requests
CHURN_WINDOW = 32                   # starts over which the miss fraction is taken

# GIE endpoint picker defaults (pkg/epp/scheduling/config: QUEUING_THRESHOLD_LORA,
# LORA_AFFINITY_THRESHOLD)
GIE_QUEUE_THRESHOLD_LORA = 128
GIE_LORA_AFFINITY_THRESHOLD = 0.999

POLICIES = ("round-robin", "lora-affinity", "least-queue", "gie-scorers")


def load_curve(path):
    with open(path) as f:
        d = json.load(f)
    pts = sorted(d["points"], key=lambda p: p["rate_req_per_sec"])
    sizes = [(s["prompt_tokens"], s["completion_tokens"]) for p in pts for s in p["samples"]
             if s.get("ok") and s.get("prompt_tokens") and s.get("completion_tokens")]
    if not sizes:
        sys.exit(f"capacity_sim: {path} has no successful samples with token counts")
    overloaded = [p["throughput_req_per_sec"] for p in pts
                  if p["rate_req_per_sec"] >= 1.2 * p["throughput_req_per_sec"]]
    if not overloaded:
        sys.exit(f"capacity_sim: {path} has no point past saturation (rate >= 1.2 x throughput)")
    saturation = median(overloaded)
    st = d.get("settings", {})
    measured = []
    for p in pts:
        measured.append({
            "rate": p["rate_req_per_sec"], "requests": p["requests"], "errors": p["errors"],
            "throughput": p["throughput_req_per_sec"], "goodput": p["goodput_req_per_sec"],
            "slo_attainment": p["slo_attainment"],
            "ttft_p50_ms": p["ttft"]["p50"], "ttft_p99_ms": p["ttft"]["p99"],
            "tpot_p50_ms": p["tpot"]["p50"], "tpot_p99_ms": p["tpot"]["p99"],
        })
    meta = d.get("metadata", {})
    return {
        "path": path,
        "command": " ".join(meta.get("command", [])),
        "timestamp": meta.get("timestamp"),
        "model": meta.get("base_model"),
        "duration_s": st.get("duration"),
        "slo_ttft_ms": st.get("slo_ttft_ms", 1000.0),
        "slo_tpot_ms": st.get("slo_tpot_ms", 100.0),
        "saturation_req_s": saturation,
        "saturation_from": "median throughput of the points offered >= 1.2 x their throughput",
        "sizes": sizes,
        "measured": measured,
    }


def load_engine(path):
    if not path or not os.path.exists(path):
        return dict(DEFAULT_DECODE_TPS), DEFAULT_PREFILL_TPS, "built-in (results/engine_serving.json of 2026-12-03)"
    with open(path) as f:
        d = json.load(f)
    decode, prefill = {}, []
    for r in d["results"]:
        if r["label"] == "smollm2-135m as shipped" and r["section"] == "decode":
            decode[int(r["batch"])] = r["value"]
        elif r["section"] == "prefill" and r["label"].startswith("smollm2-135m as shipped"):
            prefill.append(r["value"])
    if len(decode) < 2 or not prefill:
        return dict(DEFAULT_DECODE_TPS), DEFAULT_PREFILL_TPS, f"built-in ({path} lacks the SmolLM2 rows)"
    return decode, sum(prefill) / len(prefill), path


# ---------------------------------------------------------------------------------------------
# Small statistics

def median(xs):
    return percentile(xs, 50)


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def rnd(x, n=3):
    return None if x is None else round(x, n)


# ---------------------------------------------------------------------------------------------
# The model

class Cfg:
    """Everything a simulated point needs, fixed for a run."""

    def __init__(self, a, curve, decode_tps, prefill_tps, scale):
        self.max_num_seqs = a.max_num_seqs
        self.max_batched = a.max_num_batched_tokens
        self.max_loras = a.max_loras
        self.load_s = a.load_ms / 1000.0
        self.swap_slowdown = a.swap_slowdown
        self.adapter_step_s = a.adapter_step_ms / 1000.0
        self.max_queue_delay = a.max_queue_delay
        self.max_waiting = a.max_waiting
        self.scrape_s = a.scrape_ms / 1000.0
        self.queue_threshold_lora = a.queue_threshold_lora
        self.slo_ttft = curve["slo_ttft_ms"] / 1000.0
        self.slo_tpot = curve["slo_tpot_ms"] / 1000.0
        self.sizes = curve["sizes"]
        self.prefill_s_per_token = 1.0 / prefill_tps
        self.scale = scale
        # decode step seconds at batch b: linear through (0, 0) and the measured points,
        # extended with the last slope
        pts = [(0, 0.0)] + sorted((b, b / tps) for b, tps in decode_tps.items())
        self.dec_pts = pts
        self.dec_table = [self._tdec(b) for b in range(0, max(self.max_num_seqs, self.max_batched) + 1)]

    def _tdec(self, b):
        pts = self.dec_pts
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if b <= b1:
                return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) / (b1 - b0) * (b - b1)


class Req:
    __slots__ = ("t_arr", "adapter", "p", "o", "counted", "prefill_left", "finish_tick",
                 "t_first", "t_done", "blocked_since", "miss", "rejected", "seq", "rep")

    def __init__(self, seq, t_arr, adapter, p, o, counted):
        self.seq = seq
        self.t_arr = t_arr
        self.adapter = adapter
        self.p = p
        self.o = o
        self.counted = counted
        self.prefill_left = p
        self.finish_tick = 0
        self.t_first = None
        self.t_done = None
        self.blocked_since = None
        self.miss = False
        self.rejected = False
        self.rep = -1


class View:
    """What GIE's picker knows of a replica: its last scrape."""
    __slots__ = ("waiting", "running", "kv", "adapters", "running_adapters", "n_lists", "max_lora")

    def __init__(self, max_lora):
        self.waiting = 0
        self.running = 0
        self.kv = 0.0
        self.adapters = frozenset()  # running and waiting adapters; the last non-empty lists
        self.running_adapters = frozenset()
        self.n_lists = 0             # len(running list) + len(waiting list), as GIE counts slots
        self.max_lora = max_lora


class Replica:
    def __init__(self, idx, cfg, sim):
        self.idx = idx
        self.cfg = cfg
        self.sim = sim
        self.running = []
        self.waiting = []
        self.resident = OrderedDict()  # adapter -> running sequences pinning it; LRU order
        self.loading = {}              # adapter -> time its read completes
        self.staged = set()            # read, waiting for a slot
        self.ticks = 0                 # decode tokens emitted per decoding row so far
        self.active = 0                # distinct adapters pinned by running sequences
        self.busy = False
        self.version = 0
        self.t0 = 0.0
        self.d = 0.0
        self.k = 0
        self.chunks = None             # [(req, tokens)] of a prefill step, else None
        self.step_end = 0.0
        self.churn = deque()
        self.churn_misses = 0
        self.start_rate = 0.0
        self.win_since = 0.0
        self.win_started = 0
        self.win_saturated = False
        self.loads = 0                 # reads started inside the measured window
        self.view = View(cfg.max_loras)

    # -- metrics, as /metrics reports them ----------------------------------------------------
    def scrape(self):
        v = self.view
        v.waiting = len(self.waiting)
        v.running = len(self.running)
        ticks = self.ticks
        v.kv = sum(r.p - r.prefill_left + (r.o - (r.finish_tick - ticks) if r.prefill_left == 0 else 0)
                   for r in self.running) / KV_BUDGET_TOKENS
        running = {r.adapter for r in self.running}
        waiting = {r.adapter for r in self.waiting}
        if running or waiting:  # the picker keeps the last non-empty lists of an idle replica
            v.adapters = frozenset(running | waiting)
            v.running_adapters = frozenset(running)
            v.n_lists = len(running) + len(waiting)

    # -- admission gate -------------------------------------------------------------------------
    def gate_limit(self):
        cfg = self.cfg
        if cfg.max_queue_delay > 0 and self.start_rate > 0:
            return min(cfg.max_waiting, max(1, math.ceil(self.start_rate * cfg.max_queue_delay)))
        return cfg.max_waiting

    def arrive(self, req, now):
        if len(self.waiting) >= self.gate_limit():
            req.rejected = True
            return
        self.waiting.append(req)
        self.wake(now)

    def wake(self, now):
        """Something the loop should see at its next step: start one now, or end the current
        multi-step pass at its next step boundary."""
        if not self.busy:
            self.start_step(now)
        elif self.k > 1:
            j = int((now - self.t0) / self.d) + 1
            if j < self.k:
                self.k = j
                self.step_end = self.t0 + j * self.d
                self.version += 1
                self.sim.push(self.step_end, 1, self)

    # -- adapters -------------------------------------------------------------------------------
    def readiness(self, name, now):
        if name in self.resident:
            return 0  # resident
        cfg = self.cfg
        if name in self.staged:
            if len(self.resident) < cfg.max_loras or self._evict_idle():
                self.staged.discard(name)
                self.resident[name] = 0
                return 0
            return 2  # blocked
        if name in self.loading:
            return 1  # loading
        if len(self.loading) + len(self.staged) < cfg.max_loras:
            t = now + cfg.load_s
            self.loading[name] = t
            if self.sim.measuring(now):
                self.loads += 1
            self.sim.push(t, 2, self)
            return 1
        return 2

    def _evict_idle(self):
        for name, pins in self.resident.items():
            if pins == 0:
                del self.resident[name]
                return True
        return False

    # -- the loop -------------------------------------------------------------------------------
    def start_step(self, now):
        cfg = self.cfg
        if self.loading:
            for name in [n for n, t in self.loading.items() if t <= now]:
                del self.loading[name]
                self.staged.add(name)
        if self.staged:
            wanted = {r.adapter for r in self.waiting}
            self.staged &= wanted
        started = self._admit(now)
        self._measure_rate(now, started)
        running = self.running
        if not running:
            self.busy = False
            return
        self.busy = True
        b = 0
        prefills = []
        for r in running:
            if r.prefill_left == 0:
                b += 1
            else:
                prefills.append(r)
        mult = cfg.scale / (1.0 - cfg.swap_slowdown * self.churn_misses / CHURN_WINDOW)
        extra = cfg.adapter_step_s * (self.active - 1) if self.active > 1 else 0.0
        if prefills:
            budget = cfg.max_batched - b
            chunks = []
            tokens = 0
            for r in prefills:
                if budget <= 0:
                    break
                n = min(r.prefill_left, budget)
                chunks.append((r, n))
                budget -= n
                tokens += n
            self.chunks = chunks
            self.d = (cfg.dec_table[b] + tokens * cfg.prefill_s_per_token + extra) * mult
            self.k = 1
        else:
            self.chunks = None
            self.d = (cfg.dec_table[b] + extra) * mult
            ticks = self.ticks
            k = min(r.finish_tick for r in running) - ticks
            if self.loading and self.waiting:
                first = min(self.loading.values())
                k = min(k, max(1, math.ceil((first - now) / self.d)))
            self.k = max(1, k)
        self.t0 = now
        self.step_end = now + self.k * self.d
        self.version += 1
        self.sim.push(self.step_end, 1, self)

    def end_step(self, now):
        k = self.k
        chunks = self.chunks
        self.ticks += k
        ticks = self.ticks
        if chunks:
            for r, n in chunks:
                r.prefill_left -= n
                if r.prefill_left == 0:
                    r.t_first = now
                    r.finish_tick = ticks + r.o - 1
        if any(r.prefill_left == 0 and r.finish_tick <= ticks for r in self.running):
            keep = []
            for r in self.running:
                if r.prefill_left == 0 and r.finish_tick <= ticks:
                    r.t_done = now
                    self.resident[r.adapter] -= 1  # unpinned: evictable once at 0
                    if self.resident[r.adapter] == 0:
                        self.active -= 1
                else:
                    keep.append(r)
            self.running = keep
        self.busy = False
        self.start_step(now)

    def _admit(self, now):
        cfg = self.cfg
        waiting = self.waiting
        if not waiting:
            return 0
        running = self.running
        resident = self.resident
        started = 0
        starving = False
        keep = []
        for i, w in enumerate(waiting):
            if len(running) >= cfg.max_num_seqs:
                keep.extend(waiting[i:])
                break
            state = self.readiness(w.adapter, now)
            if state == 1:
                w.miss = True
                keep.append(w)
                continue
            if state == 2:
                w.miss = True
                if w.blocked_since is None:
                    w.blocked_since = now
                if now - w.blocked_since >= ADAPTER_WAIT_S:
                    starving = True
                keep.append(w)
                continue
            if starving:
                keep.append(w)
                continue
            if resident[w.adapter] == 0:
                self.active += 1
            resident[w.adapter] += 1
            resident.move_to_end(w.adapter)
            running.append(w)
            started += 1
            self.churn.append(w.miss)
            self.churn_misses += w.miss
            if len(self.churn) > CHURN_WINDOW:
                self.churn_misses -= self.churn.popleft()
        self.waiting = keep
        return started

    def _measure_rate(self, now, started):
        self.win_started += started
        self.win_saturated = self.win_saturated and bool(self.waiting)
        elapsed = now - self.win_since
        if elapsed >= RATE_WINDOW_S:
            if self.win_saturated and self.win_started > 0:
                rate = self.win_started / elapsed
                self.start_rate = rate if self.start_rate <= 0 else 0.7 * self.start_rate + 0.3 * rate
            self.win_since = now
            self.win_started = 0
            self.win_saturated = bool(self.waiting)


class Sim:
    def __init__(self, cfg, n, policy, rate, adapters, alpha, seed, duration, warmup, point_key):
        self.cfg = cfg
        self.policy, _, q = policy.partition(":")
        self.queue_threshold = int(q) if q else cfg.queue_threshold_lora
        self.rate = rate
        self.duration = duration
        self.warmup = warmup
        self.heap = []
        self.seq = 0
        self.replicas = [Replica(i, cfg, self) for i in range(n)]
        self.done = []
        # The same arrivals for every policy (common random numbers): seeded by the point only.
        arr = random.Random(f"{seed}:arrivals:{point_key}")
        w = [1.0 / (i + 1) ** alpha for i in range(adapters)]
        cum = []
        acc = 0.0
        for x in w:
            acc += x
            cum.append(acc)
        total = cum[-1]
        names = [f"a{i}" for i in range(adapters)]
        sizes = cfg.sizes
        self.arrivals = []
        t = 0.0
        end = warmup + duration
        i = 0
        while True:
            t += arr.expovariate(rate)
            if t >= end:
                break
            a = names[min(bisect.bisect_left(cum, arr.random() * total), adapters - 1)]
            p, o = sizes[arr.randrange(len(sizes))]
            self.arrivals.append(Req(i, t, a, p, o, t >= warmup))
            i += 1
        self.route_rng = random.Random(f"{seed}:route:{policy}:{point_key}")
        self.rr = 0

    def measuring(self, now):
        return self.warmup <= now < self.warmup + self.duration

    def push(self, t, kind, rep):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, rep, rep.version if kind == 1 else 0))

    def run(self):
        heap = self.heap
        arrivals = self.arrivals
        reps = self.replicas
        scrape_s = self.cfg.scrape_s
        next_scrape = 0.0
        ai = 0
        na = len(arrivals)
        inf = float("inf")
        while ai < na or heap:
            ta = arrivals[ai].t_arr if ai < na else inf
            th = heap[0][0] if heap else inf
            now = ta if ta < th else th
            while next_scrape <= now:
                for rep in reps:
                    rep.scrape()
                next_scrape += scrape_s
            if ta < th:
                req = arrivals[ai]
                ai += 1
                rep = self.route(req)
                req.rep = rep.idx
                rep.arrive(req, now)
                continue
            _, _, kind, rep, version = heapq.heappop(heap)
            if kind == 1:
                if version == rep.version and rep.busy:
                    rep.end_step(now)
            else:  # an adapter read completed
                rep.wake(now)

    # -- routing --------------------------------------------------------------------------------
    def route(self, req):
        reps = self.replicas
        if len(reps) == 1:
            return reps[0]
        if self.policy == "round-robin":
            rep = reps[self.rr % len(reps)]
            self.rr += 1
            return rep
        rng = self.route_rng
        if self.policy == "gie-scorers":
            return self.route_scorers(req)
        low = [r for r in reps if r.view.waiting <= self.queue_threshold]
        if self.policy == "lora-affinity":
            if low:
                a = req.adapter
                aff = [r for r in low if a in r.view.adapters]
                free = [r for r in low if a not in r.view.adapters and r.view.n_lists < r.view.max_lora]
                if aff and free:
                    group = aff if rng.random() < GIE_LORA_AFFINITY_THRESHOLD else free
                else:
                    group = aff or free or low
            else:
                group = least_queue(reps)
                cheap = [r for r in group if req.adapter in r.view.adapters or r.view.n_lists < r.view.max_lora]
                group = cheap or group
                return rng.choice(least_kv(group))
        else:
            group = low or reps
        return rng.choice(least_kv(least_queue(group)))

    def route_scorers(self, req):
        """GIE's plugin profile: queue-scorer + kv-cache-utilization-scorer + lora-affinity-scorer,
        weight 1 each, max-score picker (ties broken at random)."""
        reps = self.replicas
        qs = [r.view.waiting for r in reps]
        lo, hi = min(qs), max(qs)
        a = req.adapter
        best, top = [], -1.0
        for r, q in zip(reps, qs):
            v = r.view
            score = 1.0 if hi == lo else (hi - q) / (hi - lo)
            score += 1.0 - v.kv
            if a in v.running_adapters:
                score += 1.0
            elif v.n_lists < v.max_lora:
                score += 0.8
            elif a in v.adapters:
                score += 0.6
            if score > top + 1e-12:
                best, top = [r], score
            elif score > top - 1e-12:
                best.append(r)
        return best[0] if len(best) == 1 else self.route_rng.choice(best)

    # -- results --------------------------------------------------------------------------------
    def summary(self):
        cfg = self.cfg
        counted = [r for r in self.arrivals if r.counted]
        ok = [r for r in counted if r.t_done is not None]
        rejected = sum(1 for r in counted if r.rejected)
        ttft = [(r.t_first - r.t_arr) * 1000 for r in ok]
        tpot = [((r.t_done - r.t_first) / (r.o - 1) * 1000) if r.o > 1 else 0.0 for r in ok]
        good = sum(1 for r, a, b in zip(ok, ttft, tpot) if a <= cfg.slo_ttft * 1000 and b <= cfg.slo_tpot * 1000)
        misses = sum(1 for r in ok if r.miss)
        n = len(self.replicas)
        return {
            "requests": len(counted),
            "completed": len(ok),
            "rejected_429": rejected,
            "throughput_req_s": rnd(len(ok) / self.duration),
            "goodput_req_s": rnd(good / self.duration),
            "slo_attainment": rnd(good / len(counted), 4) if counted else None,
            "ttft_p50_ms": rnd(percentile(ttft, 50), 1),
            "ttft_p99_ms": rnd(percentile(ttft, 99), 1),
            "tpot_p50_ms": rnd(percentile(tpot, 50), 2),
            "tpot_p99_ms": rnd(percentile(tpot, 99), 2),
            "adapter_loads_per_replica_s": rnd(sum(r.loads for r in self.replicas) / n / self.duration, 3),
            "adapter_miss_fraction": rnd(misses / len(ok), 4) if ok else None,
        }


def least_queue(pods):
    """GIE's least-queue filter: queue sizes within the lowest 1/len(pods) of their range."""
    qs = [p.view.waiting for p in pods]
    lo, hi = min(qs), max(qs)
    cut = lo + (hi - lo) // len(pods)
    return [p for p, q in zip(pods, qs) if q <= cut]


def least_kv(pods):
    """GIE's least-KV-cache filter: KV use within the lowest 1/len(pods) of its range."""
    ks = [p.view.kv for p in pods]
    lo, hi = min(ks), max(ks)
    cut = lo + (hi - lo) / len(pods)
    return [p for p, k in zip(pods, ks) if k <= cut]


def simulate(cfg, n, policy, rate, adapters, alpha, seed, duration, warmup, key):
    sim = Sim(cfg, n, policy, rate, adapters, alpha, seed, duration, warmup, key)
    sim.run()
    return sim.summary()


def fit_scale(a, curve, decode_tps, prefill_tps):
    """Scale of every step time so that one replica saturates at the measured throughput."""
    target = curve["saturation_req_s"]
    scale = 1.0
    history = []
    for it in range(4):
        cfg = Cfg(a, curve, decode_tps, prefill_tps, scale)
        s = simulate(cfg, 1, "round-robin", 3.0 * target, 2, 0.0, a.seed, a.fit_duration, a.warmup, f"fit{it}")
        x = s["throughput_req_s"]
        history.append({"scale": rnd(scale, 4), "throughput_req_s": x})
        if abs(x / target - 1) < 0.005:
            break
        scale *= x / target
    return scale, history


# ---------------------------------------------------------------------------------------------
# The plot

PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def policy_label(p):
    name, _, q = p.partition(":")
    if name == "round-robin":
        return "round-robin"
    if name == "gie-scorers":
        return "GIE scorers (queue + KV + LoRA, weight 1 each)"
    what = "LoRA affinity (GIE filter tree)" if name == "lora-affinity" else "least queue (GIE filters, no LoRA)"
    return f"{what}, queue threshold {q or GIE_QUEUE_THRESHOLD_LORA}"


def svg_plot(results, ns, policies, saturation, title, subtitle):
    cols = min(4, len(ns))
    rows = (len(ns) + cols - 1) // cols
    pw, ph = 220, 170
    ml, gap_x, gap_y = 56, 40, 52
    legend_rows = []
    row, width_used = [], 0
    entries = [(PALETTE[i % len(PALETTE)], "", policy_label(p)) for i, p in enumerate(policies)]
    entries += [("#999", "4 3", "goodput = offered"), ("#999", "2 2", "N x measured single-replica saturation")]
    width = ml + cols * pw + (cols - 1) * gap_x + 20
    for e in entries:
        w = 36 + int(6.3 * len(e[2]))
        if row and width_used + w > width - 2 * ml:
            legend_rows.append(row)
            row, width_used = [], 0
        row.append(e)
        width_used += w
    legend_rows.append(row)
    mt = 52 + 18 * len(legend_rows) + 12
    height = mt + rows * ph + (rows - 1) * gap_y + 46
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>',
           f'<text x="{width / 2:.0f}" y="38" text-anchor="middle" fill="#555">{esc(subtitle)}</text>']
    for ri, row in enumerate(legend_rows):
        y = 58 + 18 * ri
        lx = ml
        for color, dash, label in row:
            d = f' stroke-dasharray="{dash}"' if dash else ""
            sw = "1.2" if dash else "2.5"
            out.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 24}" y2="{y - 4}" stroke="{color}" stroke-width="{sw}"{d}/>'
                       f'<text x="{lx + 30}" y="{y}">{esc(label)}</text>')
            lx += 36 + int(6.3 * len(label))
    for idx, n in enumerate(ns):
        cx = ml + (idx % cols) * (pw + gap_x)
        cy = mt + (idx // cols) * (ph + gap_y)
        pts = [p for p in results if p["replicas"] == n and p["policy"] in policies]
        xmax = nice_ceiling(max(p["offered_req_s"] for p in pts))
        ymax = xmax
        fx = lambda x: cx + x / xmax * pw
        fy = lambda y: cy + ph - y / ymax * ph
        step = nice_step(xmax)
        v = 0.0
        while v <= xmax + 1e-9:
            X, Y = fx(v), fy(v)
            out.append(f'<line x1="{X:.1f}" y1="{cy}" x2="{X:.1f}" y2="{cy + ph}" stroke="#eee"/>'
                       f'<line x1="{cx}" y1="{Y:.1f}" x2="{cx + pw}" y2="{Y:.1f}" stroke="#eee"/>'
                       f'<text x="{X:.1f}" y="{cy + ph + 13}" text-anchor="middle">{v:g}</text>'
                       f'<text x="{cx - 4}" y="{Y + 4:.1f}" text-anchor="end">{v:g}</text>')
            v += step
        out.append(f'<rect x="{cx}" y="{cy}" width="{pw}" height="{ph}" fill="none" stroke="#333" stroke-width="0.8"/>')
        out.append(f'<line x1="{fx(0):.1f}" y1="{fy(0):.1f}" x2="{fx(xmax):.1f}" y2="{fy(ymax):.1f}" '
                   f'stroke="#999" stroke-width="1.2" stroke-dasharray="4 3"/>')
        sx = fx(n * saturation)
        out.append(f'<line x1="{sx:.1f}" y1="{cy}" x2="{sx:.1f}" y2="{cy + ph}" stroke="#999" stroke-width="1.2" '
                   f'stroke-dasharray="2 2"/>')
        for i, pol in enumerate(policies):
            line = sorted((p["offered_req_s"], p["goodput_req_s"]) for p in pts if p["policy"] == pol)
            if not line:
                continue
            color = PALETTE[i % len(PALETTE)]
            d = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in line)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8" stroke-opacity="0.9"/>')
            out.extend(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="2.2" fill="{color}"/>' for x, y in line)
        out.append(f'<text x="{cx + 6}" y="{cy + 15}" font-weight="bold">N = {n}</text>')
        out.append(f'<text x="{cx + pw / 2:.0f}" y="{cy + ph + 28}" text-anchor="middle" fill="#444">offered (req/s)</text>')
        if idx % cols == 0:
            out.append(f'<text transform="translate({cx - 38},{cy + ph / 2:.0f}) rotate(-90)" text-anchor="middle" '
                       f'fill="#444">goodput (req/s)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_step(span):
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def nice_ceiling(x):
    s = nice_step(x)
    return math.ceil(x / s) * s


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------

def parse_range(s):
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def knee(points, target=0.95):
    """Largest offered rate at which SLO attainment stays >= target, interpolated linearly
    between grid points (None when even the lowest rate misses it)."""
    pts = sorted(points, key=lambda p: p["offered_req_s"])
    best = None
    prev = None
    for p in pts:
        att = p["slo_attainment"] or 0.0
        if att >= target:
            best = p["offered_req_s"]
        else:
            if prev is not None and (prev["slo_attainment"] or 0) >= target:
                a0, a1 = prev["slo_attainment"], att
                x0, x1 = prev["offered_req_s"], p["offered_req_s"]
                best = x0 + (x1 - x0) * (a0 - target) / (a0 - a1)
            break
        prev = p
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1-8", help="replica counts, e.g. 1-8 or 1,2,4,8 [1-8]")
    ap.add_argument("--adapters", type=int, default=100, help="adapters requested [100]")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity (0: uniform) [1.0]")
    ap.add_argument("--max-loras", type=int, default=8, help="resident adapters per replica (serve --max-loras) [8]")
    ap.add_argument("--rates", default="2,4,6,7,8,9,10,11,12",
                    help="offered load PER REPLICA, req/s; each N runs N x these [2,4,6,7,8,9,10,11,12]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve", default="results/load_curve/load.json", help="`loramux bench load` result")
    ap.add_argument("--engine", default="results/engine_serving.json", help="`loramux bench engine` result")
    ap.add_argument("--policies", default="round-robin,lora-affinity,lora-affinity:5",
                    help=f"of {', '.join(POLICIES)}; NAME:Q sets GIE's low-queue threshold to Q "
                         "[round-robin,lora-affinity,lora-affinity:5]")
    ap.add_argument("--duration", type=float, default=120.0, help="simulated seconds measured per point [120]")
    ap.add_argument("--warmup", type=float, default=10.0, help="simulated seconds before measuring [10]")
    ap.add_argument("--fit-duration", type=float, default=120.0, help="simulated seconds of each saturation-fit run [120]")
    ap.add_argument("--load-ms", type=float, default=7.6, help="cold adapter load (bench swap p50, 2026-12-01) [7.6]")
    ap.add_argument("--swap-slowdown", type=float, default=0.06,
                    help="throughput lost when every start misses (bench swap: 0.926-0.957 of single) [0.06]")
    ap.add_argument("--adapter-step-ms", type=float, default=0.0,
                    help="pass time added per distinct adapter in the batch beyond the first (off by default; "
                         "0.27 for rank-16 all-linear adapters, BENCHMARKS.md) [0]")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="serve default [32]")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="serve default [512]")
    ap.add_argument("--max-queue-delay", type=float, default=1.0, help="serve --max-queue-delay-secs [1.0]")
    ap.add_argument("--max-waiting", type=int, default=4096, help="serve --max-waiting [4096]")
    ap.add_argument("--scrape-ms", type=float, default=50.0, help="GIE metrics refresh interval [50]")
    ap.add_argument("--queue-threshold-lora", type=int, default=GIE_QUEUE_THRESHOLD_LORA,
                    help="GIE's low-queue filter threshold, QUEUING_THRESHOLD_LORA [128]")
    ap.add_argument("--no-calibration", action="store_true", help="skip the N=1 comparison with the curve")
    ap.add_argument("--out", default="results/capacity_sim.json")
    ap.add_argument("--svg", default="docs/figures/capacity_sim.svg", help="'' for none")
    a = ap.parse_args()

    cpu0 = time.process_time()
    ns = parse_range(a.replicas)
    rates = [float(x) for x in a.rates.split(",")]
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    for p in policies:
        name, _, q = p.partition(":")
        if name not in POLICIES or (q and (name == "round-robin" or not q.isdigit())):
            sys.exit(f"capacity_sim: unknown policy {p!r} (known: {', '.join(POLICIES)}; "
                     "lora-affinity:Q and least-queue:Q set the low-queue threshold to Q)")
    curve = load_curve(a.curve)
    decode_tps, prefill_tps, engine_src = load_engine(a.engine)
    scale, fit = fit_scale(a, curve, decode_tps, prefill_tps)
    cfg = Cfg(a, curve, decode_tps, prefill_tps, scale)
    sat = curve["saturation_req_s"]
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    log(f"saturation {sat:.2f} req/s (curve), step-time scale {scale:.4f}, engine figures: {engine_src}")

    calibration = []
    if not a.no_calibration:
        # One replica, the measured mix (two adapters, uniform), at the measured rates.
        for m in curve["measured"]:
            s = simulate(cfg, 1, "round-robin", m["rate"], 2, 0.0, a.seed, a.duration * 2, a.warmup, f"cal{m['rate']}")
            calibration.append({"rate": m["rate"], "measured": m, "model": s})
            log(f"calibration rate {m['rate']:>5}: measured goodput {m['goodput']:.2f} ttft p99 {m['ttft_p99_ms']:.0f} | "
                f"model goodput {s['goodput_req_s']:.2f} ttft p99 {s['ttft_p99_ms']}")

    results = []
    for n in ns:
        for ri, r in enumerate(rates):
            key = f"n{n}:r{r}:a{a.adapters}:z{a.alpha}:m{a.max_loras}"
            for pol in policies:
                if n == 1 and pol != policies[0]:
                    s = dict(results[-1])  # one replica: routing has no choice
                    s["policy"] = pol
                    results.append(s)
                    continue
                s = simulate(cfg, n, pol, n * r, a.adapters, a.alpha, a.seed, a.duration, a.warmup, key)
                row = {"replicas": n, "policy": pol, "rate_per_replica": r, "offered_req_s": rnd(n * r, 3)}
                row.update(s)
                results.append(row)
            log(f"N={n} rate {n * r:6.1f}: " + "  ".join(
                f"{p['policy']}: goodput {p['goodput_req_s']:.2f} ttft99 {p['ttft_p99_ms']} loads/s {p['adapter_loads_per_replica_s']}"
                for p in results[-len(policies):]))

    summary = []
    for n in ns:
        for pol in policies:
            pts = [p for p in results if p["replicas"] == n and p["policy"] == pol]
            k = knee(pts)
            summary.append({"replicas": n, "policy": pol, "slo_capacity_req_s": rnd(k, 2),
                            "slo_capacity_per_replica": rnd(k / n, 2) if k else None,
                            "peak_goodput_req_s": max(p["goodput_req_s"] for p in pts)})

    cal_knee = None
    if calibration:
        cal_knee = {
            "measured_req_s": rnd(knee([{"offered_req_s": c["rate"], "slo_attainment": c["measured"]["slo_attainment"]}
                                        for c in calibration]), 2),
            "model_req_s": rnd(knee([{"offered_req_s": c["rate"], "slo_attainment": c["model"]["slo_attainment"]}
                                     for c in calibration]), 2),
            "what": "largest offered rate with SLO attainment >= 95%, one replica, the measured mix",
        }
        log(f"calibration knee: measured {cal_knee['measured_req_s']} req/s, model {cal_knee['model_req_s']} req/s")

    doc = {
        "metadata": {
            "script": "scripts/capacity_sim.py",
            "command": " ".join(["scripts/capacity_sim.py"] + sys.argv[1:]),
            "seed": a.seed,
            "curve": {k: curve[k] for k in ("path", "command", "timestamp", "model", "duration_s")},
            "engine": engine_src,
        },
        "model": {
            "saturation_req_s": rnd(sat, 3),
            "saturation_from": curve["saturation_from"],
            "step_time_scale": rnd(scale, 4),
            "scale_fit": fit,
            "decode_tok_s": {str(k): rnd(v, 1) for k, v in sorted(decode_tps.items())},
            "prefill_tok_s": rnd(prefill_tps, 1),
            "request_sizes": f"{len(curve['sizes'])} (prompt, output) token pairs of the curve's successful samples",
            "slo": {"ttft_ms": curve["slo_ttft_ms"], "tpot_ms": curve["slo_tpot_ms"]},
            "adapters": a.adapters, "zipf_alpha": a.alpha, "max_loras": a.max_loras,
            "load_ms": a.load_ms, "swap_slowdown": a.swap_slowdown, "churn_window": CHURN_WINDOW,
            "adapter_step_ms": a.adapter_step_ms,
            "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
            "max_queue_delay_s": a.max_queue_delay, "max_waiting": a.max_waiting,
            "adapter_wait_s": ADAPTER_WAIT_S,
            "gie": {"scrape_ms": a.scrape_ms, "queueing_threshold_lora": a.queue_threshold_lora,
                    "lora_affinity_threshold": GIE_LORA_AFFINITY_THRESHOLD},
            "duration_s": a.duration, "warmup_s": a.warmup,
        },
        "calibration": calibration,
        "calibration_knee": cal_knee,
        "summary": summary,
        "points": results,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    log(f"wrote {a.out}")
    if a.svg:
        shown = ns if len(ns) <= 8 else [n for n in ns if n in (1, 2, 4, 8)]
        title = f"Simulated goodput of N loramux replicas (SLO TTFT <= {curve['slo_ttft_ms']:.0f} ms, TPOT <= {curve['slo_tpot_ms']:.0f} ms)"
        sub = (f"{a.adapters} adapters, Zipf({a.alpha:g}), max-loras {a.max_loras}; replica = bench load curve "
               f"({sat:.2f} req/s saturation); {a.duration:g} s per point, seed {a.seed}")
        os.makedirs(os.path.dirname(a.svg) or ".", exist_ok=True)
        with open(a.svg, "w") as f:
            f.write(svg_plot(results, shown, policies, sat, title, sub))
        log(f"wrote {a.svg}")
    for s in summary:
        log(f"N={s['replicas']} {s['policy']:>13}: SLO capacity {s['slo_capacity_req_s']} req/s "
            f"({s['slo_capacity_per_replica']} per replica), peak goodput {s['peak_goodput_req_s']}")
    log(f"cpu {time.process_time() - cpu0:.1f} s")


if __name__ == "__main__":
    main()
