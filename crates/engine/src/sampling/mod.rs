//! Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, with a per-
//! request seed for reproducibility, the log-probabilities OpenAI clients ask for, a grammar
//! that masks the tokens a structured output cannot take next, and the logits controls
//! (penalties, `logit_bias`, `min_tokens`, ...) of `processors.rs`.

pub mod processors;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::detokenizer::MAX_STOP_STRING_BYTES;
use crate::error::{EngineError, InputField, Result};
use crate::backend::cpu::kernels::argmax;
use crate::structured::{Constraint, Grammar, ResponseFormat};

use self::processors::{retain_min_p, Processors};

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`): dividing logits by a
/// tinier one overflows to infinities whose softmax is NaN.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// How one request samples and when it stops.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept; 1 keeps all.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seed for the request's own random generator.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` fills the model's context.
    pub max_tokens: Option<usize>,
    /// Strings that end generation (not included in the text).
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// How many top alternatives to report per token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's own tokens, with this many top alternatives each
    /// (vLLM's `prompt_logprobs`; what `echo` with `logprobs` returns). `None`: not computed.
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    /// What the output must be: free text, or JSON (an object, or valid against a schema).
    pub response_format: ResponseFormat,
    /// `response_format` compiled for the model: set by [`crate::InputProcessor`], which
    /// replaces whatever a caller put here.
    #[serde(skip)]
    pub grammar: Option<Grammar>,
    /// OpenAI's presence penalty (-2 to 2): subtracted once from every token generated before.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty (-2 to 2): subtracted per time a token was generated before.
    pub frequency_penalty: f32,
    /// vLLM/HF repetition penalty (0 to 2, 1 off) over prompt and generated tokens: a positive
    /// logit is divided by it, a negative one multiplied.
    pub repetition_penalty: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 off).
    pub min_p: f32,
    /// End-of-sequence, stop tokens and stop strings are held back until this many tokens.
    pub min_tokens: usize,
    /// Added to a token's logit (token id, -100 to 100), at most 300 entries.
    pub logit_bias: Vec<(u32, f32)>,
    /// Only these tokens may be generated (vLLM's `allowed_token_ids`).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Words never generated (vLLM's `bad_words`), as given.
    pub bad_words: Vec<String>,
    /// `bad_words` tokenized (with and without a leading space): set by
    /// [`crate::InputProcessor`], which replaces whatever a caller put here.
    #[serde(skip)]
    pub bad_words_ids: Vec<Vec<u32>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            response_format: ResponseFormat::Text,
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            min_p: 0.0,
            min_tokens: 0,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            bad_words_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens`.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }

    /// Rejects values no sampler can honour, naming the parameter at fault.
    pub fn validate(&self) -> Result<()> {
        let invalid = |param: &'static str, message: String| {
            Err(EngineError::InvalidInput { field: InputField::Sampling(param), message, context_length_exceeded: false })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return invalid("temperature", format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == Some(0) && self.prompt_logprobs.is_none() {
            return invalid("max_tokens", "max_tokens must be at least 1 (0 only scores the prompt, with prompt logprobs)".into());
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings are accepted, got {}", self.stop.len()));
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return invalid("stop", format!("stop strings may have at most {MAX_STOP_STRING_BYTES} bytes, got one of {}", long.len()));
        }
        if self.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return invalid("top_logprobs", format!("top_logprobs must be at most {MAX_LOGPROBS}"));
        }
        if self.prompt_logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return invalid("prompt_logprobs", format!("prompt_logprobs must be at most {MAX_LOGPROBS}"));
        }
        processors::validate(self)
    }
}

/// A sampled token with its log-probability and the top alternatives when asked.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    /// Rank of the token in its distribution (1: the most likely), for prompt tokens,
    /// which are given rather than sampled (vLLM reports it); `None` for sampled tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
}

/// Most alternatives reported per token (vLLM's default `max_logprobs`, OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// The log-probability of token `id` under `logits` and the `top` most likely tokens
/// (for the prompt's tokens, which are given rather than sampled).
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> SampledToken {
    let (logprob, top) = log_probs(logits, id, top);
    let own = logits[id as usize];
    let rank = 1 + logits.iter().filter(|&&l| l > own).count() as u32;
    SampledToken { id, logprob, top, rank: Some(rank) }
}

/// Per-request sampler state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch for candidate (index, probability) pairs; reused across steps.
    candidates: Vec<(u32, f32)>,
    /// The output grammar as it advances, for a structured output.
    constraint: Option<Constraint>,
    /// Scratch: a step's logits after the grammar's mask and the logits controls; reused.
    masked: Vec<f32>,
    /// The logits controls and their token history, when the request sets any.
    processors: Option<Processors>,
}

impl Sampler {
    /// A sampler seeded from the request seed, or from the OS if none, for an empty prompt
    /// and no end-of-sequence tokens (see [`Sampler::for_sequence`]).
    pub fn new(params: SamplingParams) -> Self {
        Self::for_sequence(params, &[], &[])
    }

    /// A sampler for a sequence with this prompt (the repetition penalty counts it) on a
    /// model with these end-of-sequence tokens (`min_tokens` holds them back).
    pub fn for_sequence(params: SamplingParams, prompt: &[u32], eos: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            constraint: params.grammar.as_ref().map(Constraint::new),
            processors: processors::any_active(&params).then(|| Processors::new(&params, prompt, eos)),
            params,
            rng,
            candidates: Vec::new(),
            masked: Vec::new(),
        }
    }

    /// The request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits after `output` (the tokens generated so
    /// far), among those the output grammar allows when there is one, after the logits
    /// controls. Log-probabilities are the model's own, before the grammar's mask and the
    /// controls (vLLM's default `raw_logprobs`).
    pub fn sample(&mut self, logits: &[f32], output: &[u32]) -> SampledToken {
        let id = if self.constraint.is_none() && self.processors.is_none() {
            self.pick(logits)
        } else {
            let mut masked = std::mem::take(&mut self.masked);
            match self.constraint.as_mut() {
                Some(c) => c.mask(logits, &mut masked),
                None => {
                    masked.clear();
                    masked.extend_from_slice(logits);
                }
            }
            if let Some(p) = self.processors.as_mut() {
                p.apply(&self.params, &mut masked, output, self.constraint.is_some());
            }
            let id = self.pick(&masked);
            self.masked = masked;
            if let Some(c) = self.constraint.as_mut() {
                c.consume(id);
            }
            id
        };
        let (logprob, top) = match self.params.logprobs {
            None => (0.0, Vec::new()),
            Some(n) => log_probs(logits, id, n),
        };
        SampledToken { id, logprob, top, rank: None }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < GREEDY_BELOW_TEMPERATURE || p.top_k == 1 {
            argmax(logits) as u32
        } else {
            self.sample_random(logits)
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        if p.min_p > 0.0 {
            retain_min_p(c, p.min_p);
        }
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(p.top_k);
        }
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        for x in c.iter_mut() {
            x.1 /= sum;
        }
        if p.top_p < 1.0 {
            c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0f32;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|x| x.1).sum();
        if !(total.is_finite() && total > 0.0) {
            // Logits with infinities or NaN: no distribution to draw from.
            return argmax(logits) as u32;
        }
        let mut u = self.rng.random::<f32>() * total;
        for x in c.iter() {
            u -= x.1;
            if u <= 0.0 {
                return x.0;
            }
        }
        c.last().map(|x| x.0).unwrap_or(0)
    }
}

/// Log-softmax of the model's distribution at `id`, and the `n` most likely tokens.
fn log_probs(logits: &[f32], id: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let k = n.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        idx.truncate(k);
        idx.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        top = idx.into_iter().map(|(i, l)| (i, l - log_sum)).collect();
    }
    (logits[id as usize] - log_sum, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_logprobs_normalise() {
        let mut s = Sampler::new(SamplingParams { logprobs: Some(2), ..SamplingParams::greedy(4) });
        let t = s.sample(&[0.0, 2.0, 1.0], &[]);
        assert_eq!(t.id, 1);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((t.logprob - (-total.ln())).abs() < 1e-6);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_k: 3, seed: Some(7), ..Default::default() };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let xs: Vec<u32> = (0..20).map(|_| a.sample(&logits, &[]).id).collect();
        let ys: Vec<u32> = (0..20).map(|_| b.sample(&logits, &[]).id).collect();
        assert_eq!(xs, ys);
        // The three largest logits are at i % 7 == 6: 6, 13, 20, ... ties broken by select;
        // every sample must be one of the maximal-value tokens.
        assert!(xs.iter().all(|&i| i % 7 == 6));
    }

    #[test]
    fn tiny_temperatures_sample_greedily_without_nan() {
        let logits = [0.5f32, 3.0, -1.0, 2.9];
        for t in [1e-30f32, 1e-12, 1e-6] {
            let mut s = Sampler::new(SamplingParams { temperature: t, seed: Some(3), logprobs: Some(1), ..Default::default() });
            let tok = s.sample(&logits, &[]);
            assert_eq!(tok.id, 1, "temperature {t}");
            assert!(tok.logprob.is_finite());
        }
        let mut s = Sampler::new(SamplingParams { temperature: 1e-4, seed: Some(3), ..Default::default() });
        assert_eq!(s.sample(&[f32::INFINITY, 0.0, f32::NAN], &[]).id, 0, "non-finite logits fall back to argmax");
    }

    #[test]
    fn stop_strings_are_bounded() {
        let ok = SamplingParams { stop: vec!["x".repeat(MAX_STOP_STRING_BYTES)], ..Default::default() };
        assert!(ok.validate().is_ok());
        let long = SamplingParams { stop: vec!["x".repeat(MAX_STOP_STRING_BYTES + 1)], ..Default::default() };
        assert!(long.validate().unwrap_err().to_string().contains("at most"));
        let many = SamplingParams { stop: vec!["a".into(); MAX_STOP_STRINGS + 1], ..Default::default() };
        assert!(many.validate().is_err());
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut logits = vec![-10.0f32; 10];
        logits[3] = 10.0;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(1), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits, &[]).id == 3));
    }
}
