//! Prometheus metrics: loramux's own (`loramux_*`, per adapter) and the vLLM names that
//! gateways read for load- and LoRA-affinity routing (`vllm:*`).

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0];
const E2E_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];
const MERGE_BUCKETS: &[f64] = &[0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const LOAD_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// This process's resident memory now and at its peak, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/self/status`; `None` where there is no procfs
/// (not Linux). The peak is the kernel's high-water mark, so it also covers what a
/// benchmark never saw between two scrapes (model loading, a burst of requests).
pub fn process_memory() -> Option<ProcessMemory> {
    parse_proc_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_proc_status(status: &str) -> Option<ProcessMemory> {
    let kib = |key: &str| -> Option<u64> {
        let rest = status.lines().find_map(|l| l.strip_prefix(key))?.trim();
        let n: u64 = rest.strip_suffix("kB").unwrap_or(rest).trim().parse().ok()?;
        Some(n * 1024)
    };
    let resident_bytes = kib("VmRSS:")?;
    Some(ProcessMemory { resident_bytes, peak_resident_bytes: kib("VmHWM:").unwrap_or(resident_bytes).max(resident_bytes) })
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    // vLLM's names (label `model_name` = the served base name, as vLLM does).
    pub vllm_running: Gauge,
    pub vllm_waiting: Gauge,
    pub vllm_kv_usage: Gauge,
    pub vllm_gpu_cache_usage: Gauge,
    pub vllm_lora_info: GaugeVec,
    pub vllm_prompt_tokens: IntCounter,
    pub vllm_generation_tokens: IntCounter,
    pub vllm_ttft: Histogram,
    pub vllm_itl: Histogram,
    pub vllm_e2e: Histogram,
    pub vllm_success: IntCounterVec,
    pub vllm_prefix_queries: IntCounter,
    pub vllm_prefix_hits: IntCounter,
    // loramux's own.
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub e2e: HistogramVec,
    pub queue_time: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub step_seconds: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_used_bytes: IntGauge,
    pub kv_capacity_bytes: IntGauge,
    pub preemptions: IntCounter,
    pub prefix_cache_bytes: IntGauge,
    pub prefix_cache_evictions: IntCounter,
    pub adapter_loads: IntCounter,
    pub adapter_evictions: IntCounter,
    pub adapter_load_seconds: Counter,
    pub adapter_load_latency: Histogram,
    pub adapter_load_failures: IntCounter,
    pub adapters_known: IntGauge,
    /// Remote adapter downloads (`store`: s3, hub, http; `outcome`: ok, not_found, denied, error).
    pub lora_fetches: IntCounterVec,
    pub lora_fetch_bytes: IntCounter,
    pub lora_fetch_seconds: Histogram,
    /// Remote adapters found in the disk cache (no download).
    pub lora_cache_hits: IntCounter,
    pub adapters_resident: IntGauge,
    pub adapters_resident_bytes: IntGauge,
    pub adapter_resident: GaugeVec,
    pub adapter_bytes: GaugeVec,
    pub adapter_pinned: GaugeVec,
    pub adapter_requests: IntCounterVec,
    pub adapter_last_used: GaugeVec,
    pub max_loras: IntGauge,
    pub lora_merges: IntCounterVec,
    pub lora_unmerges: IntCounterVec,
    pub lora_merge_seconds: Histogram,
    pub lora_unmerge_seconds: Histogram,
    pub lora_merged: GaugeVec,
    /// Routed requests (`model: "auto"`) by the model that served them.
    pub route_requests: IntCounterVec,
    pub route_fallbacks: IntCounter,
    pub route_seconds: Histogram,
    /// Per tenant (label `tenant`: a configured tenant's name, `(admin)` or `(none)`).
    pub tenant_requests: IntCounterVec,
    pub tenant_prompt_tokens: IntCounterVec,
    pub tenant_generation_tokens: IntCounterVec,
    /// Label `reason`: rate_limit, token_limit, concurrency, adapter_not_allowed.
    pub tenant_refusals: IntCounterVec,
    pub tenant_queue_seconds: HistogramVec,
    pub tenant_in_flight: IntGaugeVec,
    /// The engine's fitted step time (`term`: base, per_decode_row, per_prefill_token), seconds.
    pub step_model: GaugeVec,
    /// Finished requests by latency target (`target`: ttft, tpot) and whether they met it.
    pub slo_requests: IntCounterVec,
    /// The admission gate's decisions (`decision`: admitted, refused; `reason`: ok,
    /// queue_full, queue_delay, ttft_target).
    pub admissions: IntCounterVec,
    /// The scheduler's virtual token counter per tenant (fair share: weighted service so far).
    pub tenant_service: GaugeVec,
    /// Process memory (Prometheus' standard name, and the peak), set at each scrape so a
    /// benchmark can read the memory of a server it did not start. Absent without procfs.
    process_memory: Option<(IntGauge, IntGauge)>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone())).expect("metric names are unique");
    m
}

impl Metrics {
    /// Creates and registers every metric; `model_name` labels the vLLM ones.
    pub fn new(model_name: &str, max_loras: usize) -> Self {
        let r = Registry::new();
        let v = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let vh = |name: &str, help: &str, b: &[f64]| {
            HistogramOpts::new(name, help).const_label("model_name", model_name).buckets(b.to_vec())
        };
        let h = |name: &str, help: &str, b: &[f64]| HistogramOpts::new(name, help).buckets(b.to_vec());
        let adapter = &["adapter"];
        let tenant = &["tenant"];
        let m = Self {
            vllm_running: reg(&r, Gauge::with_opts(v("vllm:num_requests_running", "Number of requests in model execution batches.")).unwrap()),
            vllm_waiting: reg(&r, Gauge::with_opts(v("vllm:num_requests_waiting", "Number of requests waiting to be processed.")).unwrap()),
            vllm_kv_usage: reg(&r, Gauge::with_opts(v("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")).unwrap()),
            vllm_gpu_cache_usage: reg(&r, Gauge::with_opts(v("vllm:gpu_cache_usage_perc", "KV-cache usage (legacy name; loramux's KV cache is in host memory). 1 means 100 percent usage.")).unwrap()),
            vllm_lora_info: reg(
                &r,
                GaugeVec::new(
                    Opts::new("vllm:lora_requests_info", "Running stats on LoRA requests; the value is the Unix time of the last update."),
                    &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                )
                .unwrap(),
            ),
            vllm_prompt_tokens: reg(&r, IntCounter::with_opts(v("vllm:prompt_tokens_total", "Number of prefill tokens processed.")).unwrap()),
            vllm_generation_tokens: reg(&r, IntCounter::with_opts(v("vllm:generation_tokens_total", "Number of generation tokens processed.")).unwrap()),
            vllm_ttft: reg(&r, Histogram::with_opts(vh("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)).unwrap()),
            vllm_itl: reg(&r, Histogram::with_opts(vh("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)).unwrap()),
            vllm_e2e: reg(&r, Histogram::with_opts(vh("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", E2E_BUCKETS)).unwrap()),
            vllm_success: reg(&r, IntCounterVec::new(v("vllm:request_success_total", "Count of successfully processed requests."), &["finished_reason"]).unwrap()),
            vllm_prefix_queries: reg(&r, IntCounter::with_opts(v("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.")).unwrap()),
            vllm_prefix_hits: reg(&r, IntCounter::with_opts(v("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens (same adapter only).")).unwrap()),

            requests: reg(&r, IntCounterVec::new(Opts::new("loramux_requests_total", "Finished requests by adapter (the base model's name for the base) and finish reason (stop, length, abort, error)."), &["adapter", "finish_reason"]).unwrap()),
            errors: reg(&r, IntCounterVec::new(Opts::new("loramux_request_errors_total", "Requests refused or failed, by HTTP status."), &["status"]).unwrap()),
            ttft: reg(&r, HistogramVec::new(h("loramux_time_to_first_token_seconds", "Time from arrival to the first generated token, by adapter.", TTFT_BUCKETS), adapter).unwrap()),
            itl: reg(&r, HistogramVec::new(h("loramux_inter_token_latency_seconds", "Time between consecutive generated tokens, by adapter.", ITL_BUCKETS), adapter).unwrap()),
            e2e: reg(&r, HistogramVec::new(h("loramux_e2e_request_latency_seconds", "Time from arrival to the last token, by adapter.", E2E_BUCKETS), adapter).unwrap()),
            queue_time: reg(&r, HistogramVec::new(h("loramux_request_queue_time_seconds", "Time from arrival to joining the running batch, by adapter.", TTFT_BUCKETS), adapter).unwrap()),
            prompt_tokens: reg(&r, IntCounterVec::new(Opts::new("loramux_prompt_tokens_total", "Prompt tokens of admitted requests, by adapter."), adapter).unwrap()),
            generation_tokens: reg(&r, IntCounterVec::new(Opts::new("loramux_generation_tokens_total", "Generated tokens, by adapter."), adapter).unwrap()),
            batch_size: reg(&r, Histogram::with_opts(h("loramux_batch_size", "Sequences in each forward pass (all adapters together).", BATCH_BUCKETS)).unwrap()),
            batch_tokens: reg(&r, Histogram::with_opts(h("loramux_batch_tokens", "Token rows in each forward pass (decode tokens plus prefill chunks).", TOKEN_BUCKETS)).unwrap()),
            step_seconds: reg(&r, Histogram::with_opts(h("loramux_step_seconds", "Duration of each forward pass with sampling.", ITL_BUCKETS)).unwrap()),
            running: reg(&r, IntGauge::new("loramux_num_requests_running", "Requests in the running batch.").unwrap()),
            waiting: reg(&r, IntGauge::new("loramux_num_requests_waiting", "Requests queued for admission.").unwrap()),
            kv_used_bytes: reg(&r, IntGauge::new("loramux_kv_cache_used_bytes", "KV-cache bytes held by running sequences.").unwrap()),
            kv_capacity_bytes: reg(&r, IntGauge::new("loramux_kv_cache_capacity_bytes", "KV-cache memory budget in bytes.").unwrap()),
            preemptions: reg(&r, IntCounter::new("loramux_preemptions_total", "Sequences preempted (cache dropped, recomputed later) because the KV cache was full.").unwrap()),
            prefix_cache_bytes: reg(&r, IntGauge::new("loramux_prefix_cache_bytes", "Bytes of cached prompt-prefix blocks (apart from the running sequences' KV budget).").unwrap()),
            prefix_cache_evictions: reg(&r, IntCounter::new("loramux_prefix_cache_evicted_blocks_total", "Cached prefix blocks evicted (least recently used) to make room.").unwrap()),
            adapter_loads: reg(&r, IntCounter::new("loramux_adapter_loads_total", "Adapters made resident.").unwrap()),
            adapter_evictions: reg(&r, IntCounter::new("loramux_adapter_evictions_total", "Idle adapters evicted (least recently used) to make room.").unwrap()),
            adapter_load_seconds: reg(&r, Counter::new("loramux_adapter_load_seconds_total", "Seconds spent reading and validating adapters (off the batch loop).").unwrap()),
            adapter_load_latency: reg(&r, Histogram::with_opts(h("loramux_adapter_load_seconds", "Time to read and validate one adapter.", LOAD_BUCKETS)).unwrap()),
            adapter_load_failures: reg(&r, IntCounter::new("loramux_adapter_load_failures_total", "Adapter loads that failed (broken or mismatched adapters).").unwrap()),
            lora_fetches: reg(&r, IntCounterVec::new(Opts::new("loramux_lora_fetches_total", "Remote adapter downloads (S3, hub, URL) by store and outcome; a disk-cache hit is not one."), &["store", "outcome"]).unwrap()),
            lora_fetch_bytes: reg(&r, IntCounter::new("loramux_lora_fetch_bytes_total", "Bytes of remote adapters downloaded.").unwrap()),
            lora_fetch_seconds: reg(&r, Histogram::with_opts(h("loramux_lora_fetch_seconds", "Time to download, verify and cache one remote adapter.", TTFT_BUCKETS)).unwrap()),
            lora_cache_hits: reg(&r, IntCounter::new("loramux_lora_cache_hits_total", "Remote adapters served from the disk cache without a download.").unwrap()),
            adapters_known: reg(&r, IntGauge::new("loramux_adapters_known", "Adapters the server knows (resident or loadable).").unwrap()),
            adapters_resident: reg(&r, IntGauge::new("loramux_adapters_resident", "Adapters resident in memory.").unwrap()),
            adapters_resident_bytes: reg(&r, IntGauge::new("loramux_adapters_resident_bytes", "Bytes of all resident adapters.").unwrap()),
            adapter_resident: reg(&r, GaugeVec::new(Opts::new("loramux_adapter_resident", "Per known adapter: 1 if resident in memory, else 0."), adapter).unwrap()),
            adapter_bytes: reg(&r, GaugeVec::new(Opts::new("loramux_adapter_resident_bytes", "Per known adapter: bytes it occupies in memory (0 when not resident)."), adapter).unwrap()),
            adapter_pinned: reg(&r, GaugeVec::new(Opts::new("loramux_adapter_pinned", "Per known adapter: 1 if pinned (--pin-lora: never evicted), else 0."), adapter).unwrap()),
            adapter_requests: reg(&r, IntCounterVec::new(Opts::new("loramux_adapter_requests_total", "Per known adapter: requests started on it since it became known."), adapter).unwrap()),
            adapter_last_used: reg(&r, GaugeVec::new(Opts::new("loramux_adapter_last_used_timestamp_seconds", "Per known adapter: Unix time a request last started or ended on it (absent if never used)."), adapter).unwrap()),
            max_loras: reg(&r, IntGauge::new("loramux_max_loras", "Adapters that may be resident at once (--max-loras).").unwrap()),
            lora_merges: reg(&r, IntCounterVec::new(Opts::new("loramux_lora_merges_total", "Times --auto-merge folded an adapter into the base weights."), adapter).unwrap()),
            lora_unmerges: reg(&r, IntCounterVec::new(Opts::new("loramux_lora_unmerges_total", "Times --auto-merge unfolded an adapter because other traffic arrived."), adapter).unwrap()),
            lora_merge_seconds: reg(&r, Histogram::with_opts(h("loramux_lora_merge_seconds", "Time to fold an adapter into the base weights (the batch loop waits for it).", MERGE_BUCKETS)).unwrap()),
            lora_unmerge_seconds: reg(&r, Histogram::with_opts(h("loramux_lora_unmerge_seconds", "Time to restore the base weights.", MERGE_BUCKETS)).unwrap()),
            lora_merged: reg(&r, GaugeVec::new(Opts::new("loramux_lora_merged", "1 for the adapter folded into the base weights by --auto-merge, if any."), adapter).unwrap()),
            route_requests: reg(&r, IntCounterVec::new(Opts::new("loramux_route_requests_total", "Requests routed by the semantic router (model \"auto\" or /v1/route), by the model chosen (the fallback when unsure)."), adapter).unwrap()),
            route_fallbacks: reg(&r, IntCounter::with_opts(Opts::new("loramux_route_fallbacks_total", "Routed requests sent to --router-fallback because the router was unsure.")).unwrap()),
            route_seconds: reg(&r, Histogram::with_opts(h("loramux_route_seconds", "Time to route one request (the base-only embedding pass and the scoring).", LOAD_BUCKETS)).unwrap()),
            tenant_requests: reg(&r, IntCounterVec::new(Opts::new("loramux_tenant_requests_total", "Generation requests admitted, by tenant."), tenant).unwrap()),
            tenant_prompt_tokens: reg(&r, IntCounterVec::new(Opts::new("loramux_tenant_prompt_tokens_total", "Prompt tokens of requests that joined the batch, by tenant."), tenant).unwrap()),
            tenant_generation_tokens: reg(&r, IntCounterVec::new(Opts::new("loramux_tenant_generation_tokens_total", "Generated tokens, by tenant."), tenant).unwrap()),
            tenant_refusals: reg(&r, IntCounterVec::new(Opts::new("loramux_tenant_refusals_total", "Requests refused by a tenant limit or for an adapter the tenant may not use, by tenant and reason."), &["tenant", "reason"]).unwrap()),
            tenant_queue_seconds: reg(&r, HistogramVec::new(h("loramux_tenant_queue_seconds", "Time from arrival to joining the running batch, by tenant.", TTFT_BUCKETS), tenant).unwrap()),
            tenant_in_flight: reg(&r, IntGaugeVec::new(Opts::new("loramux_tenant_in_flight", "Generation requests in flight (streams until their last byte), by tenant."), tenant).unwrap()),
            step_model: reg(&r, GaugeVec::new(Opts::new("loramux_step_model_seconds", "The engine's step time fitted from the steps it ran: seconds per step (term=base), per decode row, per prefill token."), &["term"]).unwrap()),
            slo_requests: reg(&r, IntCounterVec::new(Opts::new("loramux_slo_requests_total", "Finished requests by latency target (--target-ttft-ms, --target-tpot-ms) and whether they met it."), &["target", "met"]).unwrap()),
            admissions: reg(&r, IntCounterVec::new(Opts::new("loramux_admissions_total", "Generation requests the admission gate admitted or refused (429), by decision and reason: queue_full (--max-waiting), queue_delay (--max-queue-delay-secs at the measured start rate), ttft_target (the step-time model's estimate of the first token past --target-ttft-ms)."), &["decision", "reason"]).unwrap()),
            tenant_service: reg(&r, GaugeVec::new(Opts::new("loramux_tenant_virtual_tokens", "The fair-share scheduler's virtual token counter, by tenant: (prompt tokens + 2 x generated tokens) / weight served so far (VTC, OSDI '24); admission goes to the waiting tenant with the least."), tenant).unwrap()),
            process_memory: process_memory().map(|_| {
                (
                    reg(&r, IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes.").unwrap()),
                    reg(&r, IntGauge::new("loramux_process_peak_resident_memory_bytes", "Peak resident memory size in bytes since the process started (VmHWM).").unwrap()),
                )
            }),
            registry: r,
        };
        m.max_loras.set(max_loras as i64);
        m.set_lora_info(max_loras, "", "");
        m
    }

    /// Replaces the `vllm:lora_requests_info` series; lists are comma-separated, no spaces.
    pub fn set_lora_info(&self, max_lora: usize, running: &str, waiting: &str) {
        self.vllm_lora_info.reset();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.vllm_lora_info.with_label_values(&[&max_lora.to_string(), running, waiting]).set(now);
    }

    /// Running and waiting request counts.
    pub fn set_queue(&self, running: usize, waiting: usize) {
        self.vllm_running.set(running as f64);
        self.vllm_waiting.set(waiting as f64);
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
    }

    /// KV-cache use.
    pub fn set_kv(&self, used_bytes: usize, capacity_bytes: usize) {
        let frac = if capacity_bytes == 0 { 0.0 } else { used_bytes as f64 / capacity_bytes as f64 };
        self.vllm_kv_usage.set(frac);
        self.vllm_gpu_cache_usage.set(frac);
        self.kv_used_bytes.set(used_bytes as i64);
        self.kv_capacity_bytes.set(capacity_bytes as i64);
    }

    /// Counts an error response.
    pub fn error(&self, status: u16) {
        self.errors.with_label_values(&[&status.to_string()]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let (Some((rss, peak)), Some(now)) = (&self.process_memory, process_memory()) {
            rss.set(now.resident_bytes as i64);
            peak.set(now.peak_resident_bytes as i64);
        }
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names() {
        let m = Metrics::new("base", 4);
        m.set_lora_info(4, "a,b", "c");
        m.set_queue(2, 1);
        m.set_kv(50, 100);
        let text = m.render();
        assert!(text.contains("vllm:num_requests_running{model_name=\"base\"} 2"), "{text}");
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"base\"} 0.5"));
        assert!(text.contains("vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\"}"));
        assert_eq!(text.matches("vllm:lora_requests_info{").count(), 1);
        if cfg!(target_os = "linux") {
            let value = |name: &str| -> f64 {
                text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
            };
            let (rss, peak) = (value("process_resident_memory_bytes"), value("loramux_process_peak_resident_memory_bytes"));
            assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
        }
    }

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tloramux\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t4\n";
        assert_eq!(
            parse_proc_status(status),
            Some(ProcessMemory { resident_bytes: 100 << 20, peak_resident_bytes: 200 << 20 })
        );
        assert_eq!(parse_proc_status("Name:\tx\n"), None);
    }
}
