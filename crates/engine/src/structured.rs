//! Structured output (OpenAI's `response_format`): a JSON schema, or any JSON object, is
//! compiled by llguidance (the library behind vLLM's "guidance" backend) into a grammar over
//! the tokenizer's vocabulary; at each step the grammar says which tokens may come next, the
//! sampler draws only among those, and once the value is complete only end-of-sequence is
//! left, so generation stops with finish reason `stop`.
//!
//! Three pieces, by lifetime: [`GrammarCompiler`] (one per engine: the token trie and the
//! mask slicer, built once because they cost tens of milliseconds), [`Grammar`] (one per
//! request: a compiled, unstarted parser, made on the HTTP thread so a bad schema is a 400
//! before anything is queued), [`Constraint`] (one per sequence: the parser as it advances).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory, TokenParser};
use serde::{Deserialize, Serialize};
use tokenizers::{normalizers, pre_tokenizers, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::error::{EngineError, InputField, Result};
use crate::tokenizer::Tokenizer;

/// What a request's output must be (OpenAI's `response_format`, in engine terms).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "schema", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text: no constraint.
    #[default]
    Text,
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON Schema (`{"type": "json_schema", ...}`).
    JsonSchema(serde_json::Value),
}

/// A compiled grammar, not yet started: what [`crate::InputProcessor`] puts into
/// [`crate::SamplingParams::grammar`] for the sampler. It can only be made from a
/// [`ResponseFormat`] by the engine's own compiler, so it always fits the model's vocabulary.
#[derive(Clone)]
pub struct Grammar(Arc<TokenParser>);

impl PartialEq for Grammar {
    /// The same compiled grammar (grammars are compared by identity, not by content).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar(..)")
    }
}

/// How JSON is laid out when the schema does not say (llguidance's `x-guidance` options):
/// one space after `,` and `:` as Python's `json.dumps` writes it, and no other whitespace,
/// so a model cannot pad the output with newlines until `max_tokens` runs out.
fn layout() -> JsonCompileOptions {
    JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
}

/// Turns response formats into grammars for one model's vocabulary.
pub(crate) struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// Builds the token trie of `tokenizer` padded to the model's `vocab_size` logits and the
    /// mask slicer over it. End-of-sequence is any of the tokenizer's end tokens, all of which
    /// the engine stops on.
    pub(crate) fn new(tokenizer: &Tokenizer, vocab_size: usize) -> std::result::Result<Self, String> {
        let env = VocabEnv::new(tokenizer, vocab_size)?;
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles a response format; `None` for free text. A schema llguidance cannot compile
    /// (malformed, unsatisfiable, or using keywords it does not support) is an input error on
    /// `response_format`.
    pub(crate) fn compile(&self, format: &ResponseFormat) -> Result<Option<Grammar>> {
        let schema = match format {
            ResponseFormat::Text => return Ok(None),
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(schema) => schema.clone(),
        };
        let serde_json::Value::Object(mut schema) = schema else {
            return Err(invalid_format(format!("the JSON schema must be an object, got {schema}")));
        };
        if !schema.contains_key("x-guidance") {
            let options = serde_json::to_value(layout()).expect("options serialize");
            schema.insert("x-guidance".into(), options);
        }
        let grammar = TopLevelGrammar::from_json_schema(serde_json::Value::Object(schema));
        let parser = self.factory.create_parser(grammar).map_err(|e| invalid_format(format!("invalid JSON schema: {e}")))?;
        Ok(Some(Grammar(Arc::new(parser))))
    }
}

/// An input error about `response_format`.
fn invalid_format(message: String) -> EngineError {
    EngineError::InvalidInput { field: InputField::Sampling("response_format"), message, context_length_exceeded: false }
}

/// One sequence's grammar as it advances: masks each step's logits and follows the tokens
/// sampled.
pub(crate) struct Constraint {
    matcher: Matcher,
    eos: TokenId,
}

impl Constraint {
    /// Starts a grammar (its compiled tables are shared with the request's other sequences).
    pub(crate) fn new(grammar: &Grammar) -> Self {
        let parser = TokenParser::clone(&grammar.0);
        let eos = parser.token_env.tok_trie().eos_token();
        Self { matcher: Matcher::new(Ok(parser)), eos }
    }

    /// Writes `logits` into `out` with every token the grammar forbids at `-inf`. Once the
    /// grammar is complete only end-of-sequence is allowed. A grammar in error (a parser
    /// limit hit) allows only end-of-sequence too: the sequence ends instead of running on
    /// unconstrained.
    pub(crate) fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        match self.matcher.compute_mask_or_eos() {
            Ok(allowed) if !allowed.is_zero() => allowed.iter_set_entries(|i| {
                if let Some(&l) = logits.get(i) {
                    out[i] = l;
                }
            }),
            Ok(_) => self.force_end(logits, out, "the grammar allows no token"),
            Err(e) => self.force_end(logits, out, &e.to_string()),
        }
    }

    fn force_end(&self, logits: &[f32], out: &mut [f32], why: &str) {
        tracing::warn!(error = why, "structured output cannot continue: ending the sequence");
        let eos = self.eos as usize;
        out[eos] = logits[eos].max(0.0);
    }

    /// Advances the grammar past the sampled token (tokens after it stopped are ignored:
    /// they can only be the end-of-sequence tokens it forces with `ignore_eos`).
    pub(crate) fn consume(&mut self, token: u32) {
        if self.matcher.is_stopped() {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!(error = %e, token, "structured output: the grammar rejected a token");
        }
    }
}

/// The vocabulary as llguidance sees it: each token's bytes (special tokens marked so no
/// grammar produces them as text), and canonical tokenization of text it forces, with our
/// tokenizer. After `toktrie_hf_tokenizers`' `ByteTokenizer` (MIT), which is built on another
/// `tokenizers` release than ours.
struct VocabEnv {
    trie: TokTrie,
    /// Our tokenizer with the leading space SentencePiece adds to a text removed, since
    /// forced text continues the output rather than starting it.
    fragments: tokenizers::Tokenizer,
}

impl VocabEnv {
    fn new(tokenizer: &Tokenizer, vocab_size: usize) -> std::result::Result<Self, String> {
        let hf = tokenizer.hf();
        let decoding = Decoding::of(hf.get_decoder())?;
        let mut words: Vec<Vec<u8>> = vec![Vec::new(); vocab_size];
        let added = hf.get_added_tokens_decoder();
        for (id, word) in words.iter_mut().enumerate() {
            let id = id as u32;
            let Some(name) = hf.id_to_token(id) else {
                // A logits row past the tokenizer's vocabulary (padding): never text.
                *word = special(&format!("<[{id}]>"));
                continue;
            };
            *word = match added.get(&id) {
                Some(t) if t.special || (t.content.starts_with('<') && t.content.ends_with('>')) => special(&t.content),
                Some(t) => t.content.as_bytes().to_vec(),
                None => decoding.bytes(&name),
            };
        }
        let eos: Vec<TokenId> = tokenizer.end_token_ids().into_iter().filter(|&t| (t as usize) < vocab_size).collect();
        let Some(&first) = eos.first() else {
            return Err("the tokenizer has no end-of-sequence token to end a structured output with".into());
        };
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, first), &words).with_eos_tokens(&eos);
        let mut fragments = hf.clone();
        if let Some(n) = fragments.get_normalizer().cloned() {
            fragments.with_normalizer(without_prepend(n));
        }
        if let Some(p) = fragments.get_pre_tokenizer().cloned() {
            fragments.with_pre_tokenizer(Some(never_prepend(p)));
        }
        Ok(Self { trie, fragments })
    }
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| match self.fragments.encode(text, false) {
            Ok(e) => e.get_ids().to_vec(),
            Err(_) => self.trie.greedy_tokenize(text.as_bytes()),
        })
    }
}

/// A special token's bytes as the trie wants them: behind the marker no text can contain.
fn special(content: &str) -> Vec<u8> {
    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    bytes.extend_from_slice(content.as_bytes());
    bytes
}

/// How token strings map to bytes.
enum Decoding {
    /// GPT-2's byte-to-character table.
    ByteLevel(std::collections::HashMap<char, u8>),
    /// SentencePiece: `<0xNN>` byte tokens, and this character for a space.
    ByteFallback(char),
}

impl Decoding {
    fn of(decoder: Option<&DecoderWrapper>) -> std::result::Result<Self, String> {
        fn walk(d: &DecoderWrapper, level: &mut bool, fallback: &mut bool, space: &mut char) {
            match d {
                DecoderWrapper::ByteLevel(_) => *level = true,
                DecoderWrapper::ByteFallback(_) => *fallback = true,
                DecoderWrapper::Replace(r) if r.content == " " => {
                    // The pattern is private: read it back from the serialized form.
                    if let Ok(v) = serde_json::to_value(r) {
                        let mut chars = v["pattern"]["String"].as_str().unwrap_or("").chars();
                        if let (Some(c), None) = (chars.next(), chars.next()) {
                            *space = c;
                        }
                    }
                }
                DecoderWrapper::Sequence(s) => s.get_decoders().iter().for_each(|d| walk(d, level, fallback, space)),
                _ => {}
            }
        }
        let (mut level, mut fallback, mut space) = (false, false, ' ');
        if let Some(d) = decoder {
            walk(d, &mut level, &mut fallback, &mut space);
        }
        if level {
            Ok(Self::ByteLevel(byte_level_table()))
        } else if fallback {
            Ok(Self::ByteFallback(space))
        } else {
            Err("structured output needs a byte-level or byte-fallback tokenizer".into())
        }
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        match self {
            Self::ByteLevel(table) => name.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_default(),
            Self::ByteFallback(space) => {
                let hex = name.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => name.replace(*space, " ").into_bytes(),
                }
            }
        }
    }
}

/// GPT-2's map from the printable characters byte-level token strings use to bytes.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let printable = |c: char| matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}');
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b as char) {
                (b as char, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).expect("below the surrogates"), b)
            }
        })
        .collect()
}

fn without_prepend(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
    match n {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(s) => {
            let kept: Vec<_> = s.as_ref().iter().filter_map(|n| without_prepend(n.clone())).collect();
            (!kept.is_empty()).then(|| NormalizerWrapper::Sequence(normalizers::Sequence::new(kept)))
        }
        other => Some(other),
    }
}

fn never_prepend(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
    match p {
        PreTokenizerWrapper::Metaspace(mut m) => {
            m.prepend_scheme = pre_tokenizers::metaspace::PrependScheme::Never;
            PreTokenizerWrapper::Metaspace(m)
        }
        PreTokenizerWrapper::Sequence(s) => PreTokenizerWrapper::Sequence(pre_tokenizers::sequence::Sequence::new(
            s.as_ref().iter().map(|p| never_prepend(p.clone())).collect(),
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::sampling::{Sampler, SamplingParams};

    fn tiny_tokenizer() -> Tokenizer {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")).unwrap()
    }

    #[test]
    fn vocabulary_bytes_are_what_the_tokenizer_decodes() {
        let tok = tiny_tokenizer();
        let n = tok.vocab_size();
        let env = VocabEnv::new(&tok, n + 2).unwrap();
        let trie = env.tok_trie();
        let mut checked = 0;
        for id in 0..n as u32 {
            let text = tok.decode(&[id], false).unwrap();
            if text.contains('\u{FFFD}') {
                continue; // part of a character: no text of its own to compare
            }
            if tok.hf().get_added_tokens_decoder().contains_key(&id) {
                assert_eq!(trie.token(id), special(&text), "special token {id}");
            } else {
                assert_eq!(trie.token(id), text.as_bytes(), "token {id}");
                checked += 1;
            }
        }
        assert!(checked > n / 2, "{checked} of {n} tokens checked");
        assert!(trie.is_special_token(n as u32 + 1), "logits rows past the vocabulary are never text");
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert!(trie.eos_tokens().contains(&im_end), "{:?}", trie.eos_tokens());
        assert_eq!(env.tokenize_bytes(b"hello world"), tok.encode("hello world", false).unwrap());
    }

    #[test]
    fn the_sampler_draws_only_what_the_grammar_allows_then_ends() {
        let tok = tiny_tokenizer();
        let compiler = GrammarCompiler::new(&tok, tok.vocab_size()).unwrap();
        let format = ResponseFormat::JsonSchema(serde_json::json!({"enum": ["yes", "no"]}));
        let grammar = compiler.compile(&format).unwrap().expect("a grammar");
        let eos = tok.end_token_ids();
        for seed in 0..8 {
            let params = SamplingParams { temperature: 1.0, seed: Some(seed), grammar: Some(grammar.clone()), ..SamplingParams::default() };
            let mut sampler = Sampler::new(params);
            // Logits that favour neither answer: pseudo-random per step.
            let mut ids = Vec::new();
            for step in 0..12u64 {
                let logits: Vec<f32> = (0..tok.vocab_size() as u64).map(|i| ((i * 7919 + step * 104_729 + seed) % 97) as f32 / 10.0).collect();
                let id = sampler.sample(&logits, &[]).id;
                if eos.contains(&id) {
                    break;
                }
                ids.push(id);
            }
            let text = tok.decode(&ids, false).unwrap();
            assert!(text == "\"yes\"" || text == "\"no\"", "seed {seed}: {text:?}");
        }
        assert!(compiler.compile(&ResponseFormat::Text).unwrap().is_none());
    }
}
