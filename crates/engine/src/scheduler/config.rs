//! The scheduler's limits ([`SchedulerConfig`], vLLM's scheduler settings by the same names)
//! and the defaults a server starts with.

use std::time::Duration;

use super::SchedulingPolicy;

/// Limits the scheduler keeps (vLLM's scheduler settings, same names).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at once.
    pub max_num_seqs: usize,
    /// Tokens per forward pass: decode tokens plus prefill chunks.
    pub max_num_batched_tokens: usize,
    /// Split long prompts into chunks that fill what the decodes leave of the budget;
    /// without it a prompt is prefilled whole in one pass.
    pub enable_chunked_prefill: bool,
    /// Memory all sequences' KV caches may hold.
    pub kv_cache_bytes: usize,
    /// Requests waiting at once; more are refused ([`crate::EngineError::Overloaded`]) by the
    /// [`super::AdmissionGate`].
    pub max_waiting: usize,
    /// Refuse requests that would wait longer than this, judged from the rate requests
    /// start while others wait; `None`: only `max_waiting` bounds the queue.
    pub max_queue_delay: Option<Duration>,
    /// How long a request blocked on adapter capacity lets later requests overtake it.
    pub adapter_wait: Duration,
    /// Fold an adapter into the (float) base weights once it has held every request this
    /// long, and unfold it when another request arrives ([`super::merge`]); `None`: never.
    pub auto_merge_after: Option<Duration>,
    /// Who is admitted next: arrival order, or fair share between clients ([`super::fair`]).
    pub policy: SchedulingPolicy,
    /// Time per output token to keep (`--target-tpot-ms`): the batch and each step's prefill
    /// budget follow from the fitted step time ([`super::latency`]); `None`: only the fixed limits.
    pub target_tpot: Option<Duration>,
    /// Time to first token to keep (`--target-ttft-ms`): the [`super::AdmissionGate`] refuses a
    /// request whose first token the fitted step time says would come later; `None`: the
    /// queue bounds only.
    pub target_ttft: Option<Duration>,
}

/// Default limits of a server on this engine (`loramux serve` shows them in its help).
/// On a CPU, decode throughput is already flat from about 32 sequences, while each more
/// sequence lengthens every step: 32 keeps time per output token near the engine's step.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_NUM_SEQS: usize = 32;
    pub const MAX_NUM_BATCHED_TOKENS: usize = 512;
    pub const ENABLE_CHUNKED_PREFILL: bool = true;
    pub const KV_CACHE_BYTES: usize = 2 << 30;
    pub const MAX_WAITING: usize = 4096;
    pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(1);
    pub const ADAPTER_WAIT: Duration = Duration::from_secs(2);
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: defaults::MAX_NUM_SEQS,
            max_num_batched_tokens: defaults::MAX_NUM_BATCHED_TOKENS,
            enable_chunked_prefill: defaults::ENABLE_CHUNKED_PREFILL,
            kv_cache_bytes: defaults::KV_CACHE_BYTES,
            max_waiting: defaults::MAX_WAITING,
            max_queue_delay: Some(defaults::MAX_QUEUE_DELAY),
            adapter_wait: defaults::ADAPTER_WAIT,
            auto_merge_after: None,
            policy: SchedulingPolicy::default(),
            target_tpot: None,
            target_ttft: None,
        }
    }
}

impl SchedulerConfig {
    /// Settings that run `n` requests at once with no memory limit (offline batches).
    pub fn for_batch(n: usize) -> Self {
        Self {
            max_num_seqs: n.max(1),
            max_num_batched_tokens: 8192,
            enable_chunked_prefill: true,
            kv_cache_bytes: usize::MAX / 4,
            max_waiting: n.max(1),
            max_queue_delay: None,
            adapter_wait: Duration::ZERO,
            auto_merge_after: None,
            policy: SchedulingPolicy::default(),
            target_tpot: None,
            target_ttft: None,
        }
    }
}
