// loramux's web page: compare models side by side (streamed, all at once, so they share
// the server's mixed batches) and watch the server. Every call goes to this server only,
// with the API key the user gives (kept in sessionStorage for this tab).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "loramux.apiKey";
const REFRESH_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  triedKey: false,   // a key was submitted in this page: show the server's answer to it
  base: null,        // the base model's id
  adapters: {},      // id -> entry of /v1/lora_adapters
  listing: null,     // the last /v1/lora_adapters answer
  samples: [],       // rolling window of /metrics counters
  running: [],       // AbortControllers of the comparison in flight
  timer: null,
};

// ---- API calls -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(json) {
  const h = {};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// The message of an OpenAI-style error body ({"error": {"message": ...}}), or the text.
async function errorOf(res) {
  const text = await res.text();
  try { return new ApiError(res.status, JSON.parse(text).error.message); }
  catch { return new ApiError(res.status, text.trim() || res.status + " " + res.statusText); }
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401) askForKey(err.message);
    throw err;
  }
  return res;
}

// ---- key and models ----------------------------------------------------------------------

// The key form: after a 401 (with the server's message once a key was tried), or to change key.
function askForKey(message, label = "This server needs an API key.") {
  $("key-form").hidden = false;
  $("key-form").querySelector("label").textContent = label;
  $("key-error").textContent = state.key || state.triedKey ? message : "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("key-input").value.trim();
  state.triedKey = true;
  sessionStorage.setItem(KEY_STORE, state.key);
  loadModels();
});
$("change-key").addEventListener("click", () => askForKey("", "API key (the admin key adds load and unload):"));

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The models this key may use (/v1/models), with their state (/v1/lora_adapters).
async function loadModels() {
  let models;
  try {
    models = (await (await api("v1/models")).json()).data;
  } catch (e) {
    if (e.status !== 401) showError("Cannot list the models: " + e.message);
    return;
  }
  $("key-form").hidden = true;
  $("key-error").textContent = "";
  $("change-key").hidden = false;
  showError("");
  await loadAdapters();
  state.base = models.find((m) => !m.parent)?.id || models[0]?.id;
  $("base-name").textContent = "base: " + state.base;
  const names = models.map((m) => m.id).concat(state.listing?.router_aliases || []);
  const box = $("models");
  box.querySelectorAll("label").forEach((l) => l.remove());
  names.forEach((name, i) => {
    const label = document.createElement("label");
    const input = Object.assign(document.createElement("input"), { type: "checkbox", value: name, checked: i < 3 });
    const alias = (state.listing?.router_aliases || []).includes(name);
    label.append(input, " " + name + (name === state.base ? " (base)" : alias ? " (routed)" : ""));
    box.append(label);
  });
  if (!state.timer) {
    refreshServer();
    state.timer = setInterval(refreshServer, REFRESH_MS);
  }
}

async function loadAdapters() {
  try {
    state.listing = await (await api("v1/lora_adapters")).json();
    state.adapters = Object.fromEntries(state.listing.data.map((a) => [a.id, a]));
  } catch {
    state.listing = null;
  }
}

// ---- compare -----------------------------------------------------------------------------

function fmtBytes(n) {
  if (!n) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return n.toFixed(n < 10 && i ? 1 : 0) + " " + units[i];
}

function describe(model) {
  if (model === state.base) return "base model";
  const a = state.adapters[model];
  if (!a) return state.listing?.router_aliases.includes(model) ? "routed by prompt" : "adapter";
  return "rank " + (a.rank ?? "?") + " · " + fmtBytes(a.bytes);
}

function column(model) {
  const col = document.createElement("article");
  col.className = "column";
  col.dataset.model = model;
  col.innerHTML = `<h3></h3><p class="muted meta"></p><pre class="output"></pre>
    <p class="stats"><span class="ttft">TTFT –</span> · <span class="tps">– tok/s</span> · <span class="tokens">0 tokens</span> <span class="finish"></span></p>`;
  col.querySelector("h3").textContent = model;
  col.querySelector(".meta").textContent = describe(model);
  return col;
}

// Reads an SSE body, calling onData with each `data:` payload parsed as JSON.
async function readSse(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function runOne(col, body, chat, controller) {
  const out = col.querySelector(".output");
  const show = (cls, text) => { col.querySelector("." + cls).textContent = text; };
  const t0 = performance.now();
  let first = null, last = null, chunks = 0, usage = null;
  try {
    const res = await api(chat ? "v1/chat/completions" : "v1/completions",
      { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    await readSse(res, (msg) => {
      if (msg.error) throw new ApiError(0, msg.error.message);
      if (msg.usage) usage = msg.usage;
      if (msg.model && msg.model !== body.model) show("meta", "→ " + msg.model + " · " + describe(msg.model));
      const choice = msg.choices?.[0];
      if (!choice) return;
      const text = chat ? choice.delta?.content : choice.text;
      if (text) {
        const now = performance.now();
        if (first === null) { first = now; show("ttft", "TTFT " + Math.round(first - t0) + " ms"); }
        last = now;
        chunks++;
        out.textContent += text;
      }
      if (choice.finish_reason) show("finish", "(" + choice.finish_reason + ")");
    });
    col.classList.add("done");
  } catch (e) {
    controller.abort();
    col.classList.add("failed");
    out.textContent += (out.textContent ? "\n" : "") + (e.name === "AbortError" ? "[stopped]" : "Error: " + e.message);
  }
  col.dataset.chunks = chunks;
  const tokens = usage ? usage.completion_tokens : chunks;
  show("tokens", tokens + " tokens");
  if (first !== null && last > first && tokens > 1) show("tps", ((tokens - 1) / ((last - first) / 1000)).toFixed(1) + " tok/s");
}

$("compare-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const models = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  if (!models.length) return showError("Pick at least one model.");
  showError("");
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const prompt = $("prompt").value;
  const sameSeed = $("same-seed").checked;
  if (sameSeed && $("seed").value === "") $("seed").value = Math.floor(Math.random() * 1e9);
  const common = {
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
  };
  if (sameSeed) common.seed = Number($("seed").value);
  const cols = $("columns");
  cols.replaceChildren();
  cols.style.setProperty("--n", models.length);
  $("run").disabled = true;
  $("stop").disabled = false;
  // Every request is sent before any answer is read: the server batches them together.
  state.running = models.map(() => new AbortController());
  await Promise.all(models.map((model, i) => {
    const col = column(model);
    cols.append(col);
    const body = { ...common, model, ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }) };
    return runOne(col, body, chat, state.running[i]);
  }));
  state.running = [];
  $("run").disabled = false;
  $("stop").disabled = true;
});
$("stop").addEventListener("click", () => state.running.forEach((c) => c.abort()));

// ---- server ------------------------------------------------------------------------------

// Prometheus text -> { name: [{ labels, value }] }.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^\s{]+)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    (out[m[1]] ||= []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const total = (metrics, name) => (metrics[name] || []).reduce((s, x) => s + x.value, 0);

function card(label, value, id) {
  return `<div class="card" id="card-${id}"><div class="value">${value}</div><div class="label">${label}</div></div>`;
}

async function refreshServer() {
  let metrics;
  try {
    metrics = parseMetrics(await (await api("metrics")).text());
  } catch (e) {
    return showError("Cannot read /metrics: " + e.message);
  }
  await loadAdapters();
  const now = Date.now();
  state.samples.push({
    t: now,
    requests: total(metrics, "loramux_requests_total"),
    generated: total(metrics, "vllm:generation_tokens_total"),
    prompt: total(metrics, "vllm:prompt_tokens_total"),
  });
  while (state.samples.length > 2 && now - state.samples[0].t > WINDOW_MS) state.samples.shift();
  const rates = state.samples.slice(1).map((s, i) => {
    const p = state.samples[i], dt = (s.t - p.t) / 1000;
    return { t: s.t, requests: (s.requests - p.requests) / dt, generated: (s.generated - p.generated) / dt, prompt: (s.prompt - p.prompt) / dt };
  });
  const lastRate = rates[rates.length - 1] || { requests: 0, generated: 0 };
  const kv = total(metrics, "vllm:kv_cache_usage_perc");
  $("cards").innerHTML = [
    card("running", total(metrics, "vllm:num_requests_running"), "running"),
    card("waiting", total(metrics, "vllm:num_requests_waiting"), "waiting"),
    card("KV cache used", (kv * 100).toFixed(1) + " %", "kv"),
    card("requests served", total(metrics, "loramux_requests_total"), "requests"),
    card("requests / s", lastRate.requests.toFixed(2), "request-rate"),
    card("tokens / s generated", lastRate.generated.toFixed(1), "token-rate"),
    card("adapters known / resident", total(metrics, "loramux_adapters_known") + " / " + total(metrics, "loramux_adapters_resident") +
      " <small>of " + total(metrics, "loramux_max_loras") + " slots</small>", "adapters"),
  ].join("");
  chart($("chart-requests"), rates, [["requests", "#2563eb"]]);
  chart($("chart-tokens"), rates, [["generated", "#16a34a"], ["prompt", "#d97706"]]);
  renderAdapters();
}

// A line chart of `series` ([[field, colour]]) over the window (or since the page opened, at
// least 30 s), on a canvas.
function chart(canvas, rates, series) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 4;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1e-9, ...rates.flatMap((r) => series.map(([f]) => r[f])));
  g.fillStyle = "#6b7280";
  g.font = "11px sans-serif";
  g.fillText(max.toPrecision(3), pad, 12);
  const now = Date.now();
  const span = Math.min(WINDOW_MS, Math.max(30000, now - (state.samples[0]?.t ?? now)));
  for (const [field, colour] of series) {
    g.strokeStyle = colour;
    g.lineWidth = 2;
    g.beginPath();
    rates.forEach((r, i) => {
      const x = w - ((now - r.t) / span) * w, y = h - pad - (r[field] / max) * (h - 2 * pad - 12);
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
  }
}

function renderAdapters() {
  const list = state.listing;
  const manage = !!(list && list.admin && list.lora_updates);
  $("load-form").hidden = !manage;
  const body = $("adapters").querySelector("tbody");
  body.replaceChildren();
  for (const a of list ? list.data : []) {
    const tr = document.createElement("tr");
    tr.dataset.adapter = a.id;
    const badges = ["resident", "pinned", "merged", "routable"].filter((k) => a[k]);
    const cells = [a.id, badges.join(" ") || "on disk", a.rank ?? "–", fmtBytes(a.bytes), a.running, a.requests];
    for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: c }));
    const actions = document.createElement("td");
    if (manage) {
      const b = Object.assign(document.createElement("button"), { type: "button", textContent: "Unload", className: "unload" });
      b.addEventListener("click", () => adminCall("v1/unload_lora_adapter", { lora_name: a.id }));
      actions.append(b);
    }
    tr.append(actions);
    body.append(tr);
  }
}

async function adminCall(path, body) {
  try {
    const res = await api(path, { method: "POST", body: JSON.stringify(body) });
    $("load-result").textContent = await res.text();
  } catch (e) {
    $("load-result").textContent = "Error: " + e.message;
  }
  await loadModels();
  refreshServer();
}

$("load-form").addEventListener("submit", (e) => {
  e.preventDefault();
  adminCall("v1/load_lora_adapter", { lora_name: $("load-name").value, lora_path: $("load-path").value });
});

// ---- tabs --------------------------------------------------------------------------------

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  $("compare").hidden = tab.dataset.tab !== "compare";
  $("server").hidden = tab.dataset.tab !== "server";
}));

loadModels();
