//! Text ↔ token ids, from a `tokenizer.json` or rebuilt from GGUF metadata (so a lone
//! GGUF file needs nothing else), plus the special tokens generation needs.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{EngineError, Result};

/// A tokenizer with the model's special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding raw (non-template) prompts, where no post-processor does it.
    add_bos: bool,
    bos_id: Option<u32>,
    /// Token strings, as chat templates want them.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

// GPT-2's split, applied by tokenizers' ByteLevel when use_regex = true.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the special tokens of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::model(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| EngineError::model(&cfg_path, format!("invalid JSON: {e}")))?,
            Err(_) => json!({}),
        };
        let bos_token = cfg.get("bos_token").and_then(token_text);
        let eos_token = cfg.get("eos_token").and_then(token_text);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            // tokenizer.json's post-processor already adds BOS where the model wants it.
            add_bos: false,
            bos_id,
            inner,
            bos_token,
            eos_token,
        })
    }

    /// Rebuilds the tokenizer from GGUF `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`)
    /// or SentencePiece BPE (`llama`).
    pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let err = |m: String| EngineError::model(path, m);
        let model =
            gguf_str(md, "tokenizer.ggml.model").ok_or_else(|| err("GGUF has no tokenizer.ggml.model".into()))?;
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens")
            .map_err(err)?
            .ok_or_else(|| err("GGUF has no tokenizer.ggml.tokens".into()))?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let bos_id = gguf_u32(md, "tokenizer.ggml.bos_token_id");
        let eos_id = gguf_u32(md, "tokenizer.ggml.eos_token_id");
        let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        let (spec, add_bos) = match model.as_str() {
            "gpt2" => (
                byte_level_spec(md, &tokens, &types).map_err(err)?,
                flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            ),
            // Its post-processor adds BOS/EOS, as transformers' does.
            "llama" => (sentencepiece_spec(md, &tokens, &types).map_err(err)?, false),
            other => {
                return Err(err(format!(
                    "unsupported GGUF tokenizer.ggml.model '{other}' (supported: gpt2, llama)"
                )));
            }
        };
        let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| err(format!("cannot build tokenizer from GGUF metadata: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            inner,
            add_bos,
            bos_id,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
        })
    }

    /// Encodes text. `raw_prompt` adds BOS where the model wants it; chat-template output
    /// already holds its special tokens and is encoded as is (as transformers does).
    pub fn encode(&self, text: &str, raw_prompt: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, raw_prompt)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if raw_prompt && self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids, dropping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer, for building the vocabulary structured output
    /// constrains.
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Tokens that end a generation whatever the model's own settings say: the declared
    /// end-of-sequence token and the end-of-turn tokens of the common chat formats.
    pub fn end_token_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for id in self.eos_token.as_deref().into_iter().chain(END_OF_TURN_TOKENS).filter_map(|t| self.token_to_id(t)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// End-of-turn tokens of chat formats (ChatML, Llama 3, GPT-2 style): they end a
/// generation even where a model does not declare them.
pub(crate) const END_OF_TURN_TOKENS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"];

type Metadata = HashMap<String, Value>;
type Spec = std::result::Result<serde_json::Value, String>;

fn gguf_str(md: &Metadata, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}

fn gguf_u32(md: &Metadata, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// A string array, `None` when the key is absent.
fn gguf_strings(md: &Metadata, key: &str) -> std::result::Result<Option<Vec<String>>, String> {
    let Some(v) = md.get(key) else { return Ok(None) };
    let items = v.to_vec().map_err(|e| format!("{key}: {e}"))?;
    items
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<std::result::Result<_, _>>()
        .map(Some)
        .map_err(|e| format!("{key}: {e}"))
}

/// Byte-level BPE: the same pre-tokenization as the models' original tokenizer.json (and
/// llama.cpp's per-`tokenizer.ggml.pre` regexes).
fn byte_level_spec(md: &Metadata, tokens: &[String], types: &[i32]) -> Spec {
    let pre = gguf_str(md, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let merges = gguf_strings(md, "tokenizer.ggml.merges")?.ok_or("GGUF has no tokenizer.ggml.merges")?;
    // Control (3) and user-defined (4) tokens are matched whole in the input.
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, _)| added_token(i, &tokens[i], true))
        .collect();
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
    };
    let (pre_tokenizer, ignore_merges) = match pre.as_str() {
        "qwen2" => (json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}), false),
        "llama3" | "llama-bpe" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "gpt-2" | "gpt2" | "default" => (byte_level(true), false),
        other => return Err(format!("GGUF tokenizer pre-tokenizer '{other}' is not supported")),
    };
    Ok(tokenizer_json(
        added,
        pre_tokenizer,
        json!(null),
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
               "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
               "ignore_merges": ignore_merges, "vocab": vocab_map(tokens), "merges": merges}),
    ))
}

/// A `tokenizer.json` document (no normalizer, truncation or padding) from its parts.
fn tokenizer_json(
    added: Vec<serde_json::Value>,
    pre_tokenizer: serde_json::Value,
    post_processor: serde_json::Value,
    decoder: serde_json::Value,
    model: serde_json::Value,
) -> serde_json::Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    })
}

/// SentencePiece BPE as transformers 5 rebuilds it from a GGUF (`LlamaTokenizer`, non-legacy):
/// "▁" for spaces and one before the text (not after special tokens), byte fallback, merges from
/// the file or recovered from the scores, BOS (and EOS) from the flags, llama.cpp defaulting
/// `add_bos_token` to true.
fn sentencepiece_spec(md: &Metadata, tokens: &[String], types: &[i32]) -> Spec {
    let merges = match gguf_strings(md, "tokenizer.ggml.merges")? {
        Some(merges) => json!(merges),
        None => {
            let scores: Vec<f32> = md
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.to_vec().ok())
                .ok_or("GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.to_f32())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| format!("tokenizer.ggml.scores: {e}"))?;
            json!(merges_from_scores(tokens, &scores))
        }
    };
    let token = |key: &str| gguf_u32(md, key).and_then(|i| Some((i as usize, tokens.get(i as usize)?.as_str())));
    let (bos, eos, unk) = (
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
        token("tokenizer.ggml.unknown_token_id"),
    );
    let named: Vec<usize> = [bos, eos, unk, token("tokenizer.ggml.padding_token_id")]
        .into_iter()
        .flatten()
        .map(|(i, _)| i)
        .collect();
    // Control tokens (3) and the named special tokens are special; user-defined ones (4) are
    // matched whole but kept when decoding with skip_special.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match types.get(i) {
            Some(3) => Some(added_token(i, t, true)),
            Some(4) => Some(added_token(i, t, false)),
            _ if named.contains(&i) => Some(added_token(i, t, true)),
            _ => None,
        })
        .collect();
    let flag = |k: &str, default: bool| md.get(k).and_then(|v| v.to_bool().ok()).unwrap_or(default);
    let bos = bos.filter(|_| flag("tokenizer.ggml.add_bos_token", true));
    let eos = eos.filter(|_| flag("tokenizer.ggml.add_eos_token", false));
    let special = |t: Option<(usize, &str)>, type_id: u32| {
        t.map(|(_, s)| json!({"SpecialToken": {"id": s, "type_id": type_id}}))
    };
    let seq = |id: &str, type_id: u32| Some(json!({"Sequence": {"id": id, "type_id": type_id}}));
    let single: Vec<_> = [special(bos, 0), seq("A", 0), special(eos, 0)].into_iter().flatten().collect();
    let pair: Vec<_> = [special(bos, 0), seq("A", 0), special(eos, 0), special(bos, 1), seq("B", 1), special(eos, 1)]
        .into_iter()
        .flatten()
        .collect();
    let special_tokens: serde_json::Map<String, serde_json::Value> = [bos, eos]
        .into_iter()
        .flatten()
        .map(|(i, s)| (s.to_string(), json!({"id": s, "ids": [i], "tokens": [s]})))
        .collect();
    Ok(tokenizer_json(
        added,
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}),
        json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        // transformers leaves unk_token unset; with the 256 byte tokens present it is never used,
        // and without them llama.cpp maps unknown text to it.
        json!({"type": "BPE", "dropout": null, "unk_token": unk.map(|(_, s)| s),
               "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
               "byte_fallback": true, "ignore_merges": false, "vocab": vocab_map(tokens), "merges": merges}),
    ))
}

/// transformers' `generate_merges` with scores (llama.cpp stores no merges for SentencePiece):
/// every split of a token into two vocabulary tokens, ranked by the token's score, ties by
/// longer left then longer right part, then vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // As Python dicts: the last id of a repeated token, its first position, its last score.
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let score: HashMap<&str, f32> = tokens.iter().zip(scores).map(|(t, &s)| (t.as_str(), s)).collect();
    let mut seen = HashSet::new();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for token in tokens.iter().take(scores.len()).map(String::as_str) {
        if !seen.insert(token) {
            continue;
        }
        let start = merges.len();
        merges.extend(
            token
                .char_indices()
                .skip(1)
                .map(|(at, _)| token.split_at(at))
                .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
                .map(|(l, r)| (l, r, score[token])),
        );
        merges[start..].sort_by_key(|&(l, r, _)| (ids[l], ids[r]));
    }
    let chars = |s: &str| s.chars().count();
    // Stable, like Python's sorted(reverse=True).
    // A NaN score (a hostile file) ranks last, so the order stays total.
    let rank = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    merges.sort_by(|a, b| {
        rank(b.2)
            .partial_cmp(&rank(a.2))
            .unwrap_or(Ordering::Equal)
            .then_with(|| chars(b.0).cmp(&chars(a.0)))
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

fn vocab_map(tokens: &[String]) -> serde_json::Map<String, serde_json::Value> {
    tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect()
}

fn added_token(id: usize, content: &str, special: bool) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `gguf` fuzz target (fixtures/fuzz/gguf/nan-token-score): a NaN token
    /// score broke the sort's total order, and the sort's panic aborted the process.
    #[test]
    fn nan_token_scores_rank_last_instead_of_aborting() {
        let tokens: Vec<String> = ["a", "b", "ab", "ba", "aa", "bb", "aab"].iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, f32::NAN, -1.0, f32::NAN, -2.0, -0.5];
        let merges = merges_from_scores(&tokens, &scores);
        let pos = |l: &str, r: &str| merges.iter().position(|m| m.0 == l && m.1 == r).unwrap();
        assert!(pos("a", "ab") < pos("b", "a") && pos("b", "a") < pos("b", "b"), "finite scores keep their order: {merges:?}");
        assert!(pos("b", "b") < pos("a", "b") && pos("b", "b") < pos("a", "a"), "NaN-scored merges rank last: {merges:?}");
    }

    /// The merge ranks transformers rebuilt from the fixture's scores (ties included), which
    /// the tokenization tests alone may not tell apart.
    #[test]
    fn merges_from_scores_match_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/spm");
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let path = dir.join(fx["gguf"].as_str().unwrap());
        let md = candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(path).unwrap())
            .unwrap()
            .metadata;
        let tokens = gguf_strings(&md, "tokenizer.ggml.tokens").unwrap().unwrap();
        let scores: Vec<f32> =
            md["tokenizer.ggml.scores"].to_vec().unwrap().iter().map(|v| v.to_f32().unwrap()).collect();
        let ours: Vec<String> = merges_from_scores(&tokens, &scores).iter().map(|(l, r)| format!("{l} {r}")).collect();
        let theirs: Vec<&str> = fx["merges"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        assert_eq!(ours, theirs);
    }
}
