//! The OpenAI request parsers (`/v1/chat/completions`, `/v1/completions`): JSON body to
//! engine request, every field typed, ranged or refused (stream_options, stop, logit_bias,
//! tools, response_format, n, logprobs...), then the engine's check of the sampling
//! parameters and one draw of the sampler they configure (penalties over a short history). Any `Err` (a 400) is fine;
//! panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_engine::sampling::Sampler;
use loramux_server::openai::{parse_chat, parse_completion, GenRequest};

/// Logits with the awkward values a model can produce.
const LOGITS: [f32; 12] = [0.0, 1.0, -1.0, 30.0, -30.0, 1e30, -1e30, 5.5, 5.5, f32::MIN, 0.25, 2.0];

fn exercise(r: &GenRequest) {
    assert!(r.n >= 1);
    let mut params = r.params.clone();
    if params.validate().is_err() {
        return;
    }
    // Token ids outside the vocabulary are the input processor's 400, before any sampler.
    let in_vocab = |id: &u32| (*id as usize) < LOGITS.len();
    if !params.logit_bias.iter().all(|(id, _)| in_vocab(id))
        || !params.allowed_token_ids.iter().flatten().all(in_vocab)
        || !params.bad_words_ids.iter().flatten().all(in_vocab)
    {
        return;
    }
    params.seed = Some(params.seed.unwrap_or(0));
    // A short history, so the penalties have tokens to act on.
    let t = Sampler::new(params).sample(&LOGITS, &[3, 3, 7]);
    assert!((t.id as usize) < LOGITS.len());
    assert!(t.top.len() <= LOGITS.len());
}

fuzz_target!(|data: &[u8]| {
    for max_model_len in [2048, 1] {
        if let Ok(r) = parse_chat(data, max_model_len) {
            assert_eq!(r.prompts.len(), 1, "a chat request is one prompt");
            exercise(&r);
        }
        if let Ok(r) = parse_completion(data, max_model_len) {
            assert!(!r.prompts.is_empty());
            exercise(&r);
        }
    }
});
