//! The logits controls a request may add before a token is drawn (vLLM's logits processors
//! and penalties), applied in vLLM's order: `allowed_token_ids`, `bad_words`, `min_tokens`,
//! `logit_bias`, then the repetition, frequency and presence penalties. One [`Processors`] per
//! sequence keeps the token history the penalties need, updated one token at a time, so a step
//! costs the distinct tokens seen rather than the vocabulary, and allocates nothing once the
//! history has grown to the largest id seen.

use super::SamplingParams;
use crate::error::{EngineError, InputField, Result};

/// Most `logit_bias` entries one request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Largest `logit_bias` magnitude (OpenAI's range is -100 to 100).
pub const MAX_BIAS: f32 = 100.0;

/// Bit of a history entry set when the token is in the prompt; the low bits count outputs.
const IN_PROMPT: u32 = 1 << 31;

/// Whether any control is set to a value that changes the logits.
pub(crate) fn any_active(p: &SamplingParams) -> bool {
    penalized(p) || p.min_tokens > 0 || !p.logit_bias.is_empty() || !p.bad_words_ids.is_empty() || p.allowed_token_ids.is_some()
}

fn penalized(p: &SamplingParams) -> bool {
    p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0
}

/// Refuses the ranges vLLM refuses, naming the parameter (the vocabulary is checked by the
/// input processor, which knows it).
pub(crate) fn validate(p: &SamplingParams) -> Result<()> {
    let invalid = |param: &'static str, message: String| {
        Err(EngineError::InvalidInput { field: InputField::Sampling(param), message, context_length_exceeded: false })
    };
    for (name, v) in [("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty)] {
        if !(-2.0..=2.0).contains(&v) {
            return invalid(name, format!("{name} must be in [-2, 2], got {v}"));
        }
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty <= 2.0) {
        return invalid("repetition_penalty", format!("repetition_penalty must be in (0, 2], got {}", p.repetition_penalty));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return invalid("min_p", format!("min_p must be in [0, 1], got {}", p.min_p));
    }
    if p.max_tokens.is_some_and(|m| p.min_tokens > m) {
        return invalid("min_tokens", format!("min_tokens ({}) must be at most max_tokens ({})", p.min_tokens, p.max_tokens.unwrap_or(0)));
    }
    if p.logit_bias.len() > MAX_LOGIT_BIAS {
        return invalid("logit_bias", format!("at most {MAX_LOGIT_BIAS} logit_bias entries are accepted, got {}", p.logit_bias.len()));
    }
    if let Some((id, b)) = p.logit_bias.iter().find(|(_, b)| !(-MAX_BIAS..=MAX_BIAS).contains(b)) {
        return invalid("logit_bias", format!("logit_bias values must be in [-100, 100], got {b} for token {id}"));
    }
    if p.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
        return invalid("allowed_token_ids", "allowed_token_ids must not be empty".into());
    }
    Ok(())
}

/// One sequence's controls: its token history and reused scratch.
pub(crate) struct Processors {
    /// Per token id: [`IN_PROMPT`] | times generated. Empty unless a penalty is on.
    history: Vec<u32>,
    /// Ids whose history entry is non-zero, each once.
    touched: Vec<u32>,
    /// Output tokens already counted into `history`.
    counted: usize,
    /// What `min_tokens` holds back: end-of-sequence and stop token ids.
    ends: Vec<u32>,
    /// Scratch for the logits `allowed_token_ids` keeps.
    kept: Vec<f32>,
}

impl Processors {
    /// The controls of a sequence with this prompt; `eos` are the model's end tokens.
    pub(crate) fn new(p: &SamplingParams, prompt: &[u32], eos: &[u32]) -> Self {
        let mut s = Self { history: Vec::new(), touched: Vec::new(), counted: 0, ends: Vec::new(), kept: Vec::new() };
        if p.repetition_penalty != 1.0 {
            for &id in prompt {
                *s.entry(id) |= IN_PROMPT;
            }
        }
        if p.min_tokens > 0 && !p.ignore_eos {
            s.ends.extend(eos);
        }
        if p.min_tokens > 0 {
            s.ends.extend(&p.stop_token_ids);
        }
        s
    }

    /// The history entry of `id`, grown into and recorded as touched on first use.
    fn entry(&mut self, id: u32) -> &mut u32 {
        let i = id as usize;
        if i >= self.history.len() {
            self.history.resize(i + 1, 0);
        }
        if self.history[i] == 0 {
            self.touched.push(id);
        }
        &mut self.history[i]
    }

    /// Applies every control to one row of logits, given the tokens generated so far.
    /// With a grammar (`constrained`), `min_tokens` does not hold end-of-sequence back: the
    /// grammar decides when the value is complete.
    pub(crate) fn apply(&mut self, p: &SamplingParams, logits: &mut [f32], output: &[u32], constrained: bool) {
        if penalized(p) {
            while self.counted < output.len() {
                let e = self.entry(output[self.counted]);
                *e = (*e & IN_PROMPT) | ((*e & !IN_PROMPT) + 1).min(!IN_PROMPT);
                self.counted += 1;
            }
        }
        if let Some(allowed) = &p.allowed_token_ids {
            self.kept.clear();
            self.kept.extend(allowed.iter().map(|&id| logits.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY)));
            logits.fill(f32::NEG_INFINITY);
            for (&id, &l) in allowed.iter().zip(&self.kept) {
                set(logits, id, l);
            }
        }
        for word in &p.bad_words_ids {
            if let Some((&last, prefix)) = word.split_last() {
                if output.ends_with(prefix) {
                    set(logits, last, f32::NEG_INFINITY);
                }
            }
        }
        if output.len() < p.min_tokens && !constrained {
            for &id in &self.ends {
                set(logits, id, f32::NEG_INFINITY);
            }
        }
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if penalized(p) {
            self.penalize(p, logits);
        }
    }

    /// vLLM's `apply_penalties`: repetition over prompt and output (a positive logit divided,
    /// a negative one multiplied), then OpenAI's `count * frequency + presence` over the output.
    fn penalize(&self, p: &SamplingParams, logits: &mut [f32]) {
        for &id in &self.touched {
            let Some(l) = logits.get_mut(id as usize) else { continue };
            let e = self.history[id as usize];
            let count = (e & !IN_PROMPT) as f32;
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
            if count > 0.0 {
                *l -= count * p.frequency_penalty + p.presence_penalty;
            }
        }
    }
}

fn set(logits: &mut [f32], id: u32, v: f32) {
    if let Some(l) = logits.get_mut(id as usize) {
        *l = v;
    }
}

/// `min_p` on (token, logit already divided by the temperature) candidates: drops every token
/// whose probability is under `min_p` times the most likely one's, i.e. whose logit is under
/// the largest plus `ln(min_p)` (no softmax needed).
pub(crate) fn retain_min_p(candidates: &mut Vec<(u32, f32)>, min_p: f32) {
    let max = candidates.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let floor = max + min_p.ln();
    candidates.retain(|x| x.1 >= floor);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::greedy(8)
    }

    #[test]
    fn penalties_follow_prompt_and_outputs() {
        let p = SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..params() };
        let mut pr = Processors::new(&p, &[1, 1, 2], &[0]);
        let mut l = vec![1.0f32, 2.0, -2.0, 4.0, 3.0];
        pr.apply(&p, &mut l, &[3, 3, 2], false);
        // 1: prompt only; 2: prompt and once out; 3: twice out; 4: never.
        assert_eq!(l, vec![1.0, 1.0, -4.0 - 0.75, 2.0 - 1.25, 3.0]);
    }

    #[test]
    fn masks_bias_and_min_tokens() {
        let p = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![4],
            logit_bias: vec![(1, 100.0), (99, 5.0)],
            bad_words_ids: vec![vec![2], vec![5, 3]],
            allowed_token_ids: Some(vec![0, 1, 2, 3, 4, 99]),
            ..params()
        };
        let mut pr = Processors::new(&p, &[], &[0]);
        let mut l = vec![1.0f32; 6];
        pr.apply(&p, &mut l, &[5], false);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(l, vec![ninf, 101.0, ninf, ninf, ninf, ninf]);
        let mut l = vec![1.0f32; 6];
        pr.apply(&p, &mut l, &[5, 1], false);
        assert_eq!(l, vec![1.0, 101.0, ninf, 1.0, 1.0, ninf], "min_tokens reached; 3 only follows 5");
    }

    /// Every case of `fixtures/sampler/processors.json` (transformers' logits processors and
    /// OpenAI's penalty formula on the same logits and histories), to 1e-5.
    #[test]
    fn controls_match_transformers_processors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/sampler/processors.json");
        let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 10);
        let floats = |v: &serde_json::Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32)).collect() };
        let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        for case in &cases {
            let spec = &case["params"];
            let mut p: SamplingParams = serde_json::from_value(spec.clone()).unwrap();
            p.bad_words_ids = spec.get("bad_words_ids").map(|w| w.as_array().unwrap().iter().map(ids).collect()).unwrap_or_default();
            let logits = floats(&case["logits"]);
            let got: Vec<f32> = if p.min_p > 0.0 {
                let mut c: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
                retain_min_p(&mut c, p.min_p);
                let mut out = vec![f32::NEG_INFINITY; logits.len()];
                c.iter().for_each(|&(i, l)| out[i as usize] = l);
                out
            } else {
                let mut l = logits.clone();
                Processors::new(&p, &ids(&case["prompt"]), &ids(&case["eos"])).apply(&p, &mut l, &ids(&case["output"]), false);
                l
            };
            for (i, (g, w)) in got.iter().zip(floats(&case["expected"])).enumerate() {
                let ok = if w.is_infinite() { *g == w } else { (g - w).abs() <= 1e-5 * w.abs().max(1.0) };
                assert!(ok, "case {} {spec}: token {i}: loramux {g}, transformers {w}", case["case"]);
            }
        }
    }

    #[test]
    fn ranges_are_refused_by_name() {
        let bad = |p: SamplingParams, name: &str| assert!(validate(&p).unwrap_err().to_string().contains(name), "{name}");
        bad(SamplingParams { presence_penalty: 2.5, ..params() }, "presence_penalty");
        bad(SamplingParams { frequency_penalty: -3.0, ..params() }, "frequency_penalty");
        bad(SamplingParams { repetition_penalty: 0.0, ..params() }, "repetition_penalty");
        bad(SamplingParams { min_p: 1.5, ..params() }, "min_p");
        bad(SamplingParams { min_tokens: 9, ..params() }, "min_tokens");
        bad(SamplingParams { logit_bias: vec![(1, 101.0)], ..params() }, "logit_bias");
        bad(SamplingParams { logit_bias: vec![(1, 1.0); 301], ..params() }, "logit_bias");
        bad(SamplingParams { allowed_token_ids: Some(vec![]), ..params() }, "allowed_token_ids");
        assert!(validate(&SamplingParams { repetition_penalty: 2.0, min_p: 1.0, min_tokens: 8, ..params() }).is_ok());
    }
}
