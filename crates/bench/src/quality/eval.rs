//! The measurements of one configuration (an engine, with or without an adapter): greedy
//! answers against the references, the references' log-likelihood, and decode speed.

use loramux_engine::{ChatMessage, Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};

use super::inputs::Item;
use super::{ItemSample, Quality, Speed};
use crate::{engine_error, BenchError};

/// Prompt tokens of the decode-speed batches (as in `bench engine`).
const SPEED_PROMPT_LEN: usize = 64;
/// Tokens generated past the longest reference answer before a greedy answer is cut.
const SPARE_TOKENS: usize = 3;

/// An item in tokens: the chat-rendered prompt followed by the reference answer and the
/// end-of-turn token, as the adapters were trained on it.
pub(super) struct Scored {
    pub ids: Vec<u32>,
    /// Tokens of the prompt; the rest of `ids` is the answer and the end of turn.
    pub prompt_len: usize,
}

/// Loads the model as shipped, or dequantized to float32 (what merging an adapter needs),
/// with room for one adapter of rank up to 256 at a time.
pub(super) fn load(model: &ModelLocation, dequantize: bool) -> Result<Engine, BenchError> {
    let options =
        EngineOptions { dequantize, lora: LoraLimits { max_loras: 1, max_rank: 256, ..LoraLimits::default() }, ..EngineOptions::default() };
    Engine::load(model, &options).map_err(|e| BenchError::Invalid(format!("loading {}: {e}", model.path().display())))
}

/// The one-message chat of an item's prompt.
pub(super) fn chat(item: &Item) -> Prompt {
    Prompt::Chat(vec![ChatMessage::user(item.prompt.clone())])
}

/// Tokenizes each item as the training did: the conversation with the answer as the
/// assistant's turn, cut after its end-of-turn token, which must extend the prompt's tokens.
pub(super) fn tokenize(engine: &Engine, items: &[Item]) -> Result<Vec<Scored>, BenchError> {
    let input = engine.input();
    let template = input.chat_template().ok_or_else(|| BenchError::Invalid("the model has no chat template".into()))?;
    let ends = input.tokenizer().end_token_ids();
    items
        .iter()
        .map(|item| {
            let prompt = input.tokenize(&chat(item)).map_err(engine_error("tokenizing a prompt"))?;
            let turn = [ChatMessage::user(item.prompt.clone()), ChatMessage::new("assistant", item.answer.clone())];
            let text = template.render(&turn, false).map_err(engine_error("rendering an answer"))?;
            let full = input.tokenizer().encode(&text, false).map_err(engine_error("tokenizing an answer"))?;
            let end = full.iter().skip(prompt.len()).position(|t| ends.contains(t)).map(|p| prompt.len() + p + 1);
            match end {
                Some(end) if full.starts_with(&prompt) => Ok(Scored { ids: full[..end].to_vec(), prompt_len: prompt.len() }),
                _ => Err(BenchError::Invalid(format!(
                    "the chat template does not render the answer as a continuation of the prompt ending in an end-of-turn token: {:?}",
                    item.prompt
                ))),
            }
        })
        .collect()
}

/// Most tokens a greedy answer may take: the longest reference with its end of turn, plus a
/// few (an answer longer than that cannot match anyway).
pub(super) fn answer_budget(scored: &[Scored]) -> usize {
    scored.iter().map(|s| s.ids.len() - s.prompt_len).max().unwrap_or(1) + SPARE_TOKENS
}

/// Exact match and reference log-likelihood of `items` on `engine` with `adapter`.
pub(super) fn quality(engine: &mut Engine, adapter: Option<&str>, items: &[Item], scored: &[Scored], max_tokens: usize) -> Result<Quality, BenchError> {
    let lora = || adapter.map(LoraRequest::new);
    let answers: Vec<Request> =
        items.iter().map(|item| Request { lora: lora(), prompt: chat(item), params: SamplingParams::greedy(max_tokens) }).collect();
    let answers = engine.generate(&answers).map_err(engine_error("generating answers"))?;
    let scoring = SamplingParams { prompt_logprobs: Some(0), ..SamplingParams::greedy(0) };
    let scores: Vec<Request> =
        scored.iter().map(|s| Request { lora: lora(), prompt: Prompt::Tokens(s.ids.clone()), params: scoring.clone() }).collect();
    let scores = engine.generate(&scores).map_err(engine_error("scoring the references"))?;
    let logprobs = |c: &loramux_engine::Completion| c.prompt_logprobs.as_deref().unwrap_or_default().len();
    if let Some((s, c)) = scored.iter().zip(&scores).find(|(s, c)| logprobs(c) + 1 != s.ids.len()) {
        let n = logprobs(c);
        return Err(BenchError::Invalid(format!("scoring: {n} prompt log-probabilities for {} tokens", s.ids.len())));
    }
    let samples: Vec<ItemSample> = items
        .iter()
        .zip(scored)
        .zip(answers.iter().zip(&scores))
        .enumerate()
        .map(|(index, ((item, s), (answer, score)))| {
            // Entry i of the prompt log-probabilities is token i + 1's.
            let answer_logprobs = &score.prompt_logprobs.as_deref().unwrap_or_default()[s.prompt_len - 1..];
            ItemSample {
                index,
                output: answer.text.clone(),
                exact_match: answer.text.trim() == item.answer,
                answer_logprob: answer_logprobs.iter().map(|t| t.logprob as f64).sum(),
                answer_tokens: answer_logprobs.len(),
            }
        })
        .collect();
    Ok(Quality::from_samples(samples))
}

/// Decode tokens/s of batches of 1 and 16 sequences on `adapter` (every row on it), each
/// right after the base's on the same engine (unless `base` gives those): the batch over
/// the median of `steps` decode steps after prefill, so that a step slowed by something
/// else on the machine does not move it.
pub(super) fn speed(engine: &mut Engine, adapter: Option<&str>, steps: usize, base: Option<[f64; 2]>) -> Speed {
    let mut rate = |batch: usize, adapter: Option<&str>| {
        let rows = vec![adapter.map(str::to_string); batch];
        batch as f64 / crate::engine_bench::decode_step_seconds(engine, &rows, SPEED_PROMPT_LEN, steps).median
    };
    let mut pair = |batch: usize, i: usize| {
        let base = base.map_or_else(|| rate(batch, None), |b| b[i]);
        (if adapter.is_some() { rate(batch, adapter) } else { base }, base)
    };
    let ((batch1_tok_s, base_batch1_tok_s), (batch16_tok_s, base_batch16_tok_s)) = (pair(1, 0), pair(16, 1));
    Speed { batch1_tok_s, batch16_tok_s, base_batch1_tok_s, base_batch16_tok_s }
}
