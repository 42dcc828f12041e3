//! Structured output (`response_format`): every output of a constrained request parses as
//! JSON and validates against its schema (checked with the `jsonschema` crate), greedy and
//! sampled at temperature 1 under several seeds, on byte-level BPE and SentencePiece
//! vocabularies; a constrained request changes nothing for the unconstrained requests of
//! its batch, whatever adapters they run with; a schema that cannot be compiled is refused
//! before anything runs, naming `response_format`. The tiny fixtures run always; the real
//! SmolLM2-135M with its example adapters runs when cached (`loramux models pull smollm2-135m`).

use std::path::{Path, PathBuf};

use loramux_engine::registry::{cached_model_path, known_model};
use loramux_engine::{
    ChatMessage, Completion, Engine, EngineError, EngineOptions, FinishReason, InputField, LoraLimits, LoraRequest, ModelLocation, Prompt,
    Request, ResponseFormat, SamplingParams,
};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(location: ModelLocation) -> Engine {
    let options = EngineOptions { lora: LoraLimits { max_loras: 4, ..LoraLimits::default() }, ..EngineOptions::default() };
    Engine::load(&location, &options).expect("model loads")
}

fn tiny() -> Engine {
    let dir = repo().join("fixtures/tiny/llama");
    let mut e = load(ModelLocation::HfDir(dir.clone()));
    for name in ["a", "b"] {
        e.loras_mut().load(name, &dir.join("adapters").join(name)).expect("adapter loads");
    }
    e
}

/// A schema whose every string, number and list is bounded, so even a random model's output
/// is complete within `MAX_TOKENS`: what is checked is then validity, never truncation.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pet": {"enum": ["cat", "dog", "none"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "admin": {"type": "boolean"},
            "home": {"$ref": "#/$defs/place"}
        },
        "required": ["name", "age", "pet", "tags", "admin", "home"],
        "additionalProperties": false,
        "$defs": {
            "place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        }
    })
}

const MAX_TOKENS: usize = 400;

fn request(lora: Option<&str>, prompt: Prompt, params: SamplingParams) -> Request {
    Request { lora: lora.map(LoraRequest::new), prompt, params }
}

fn constrained(format: ResponseFormat, temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed: Some(seed), max_tokens: Some(MAX_TOKENS), response_format: format, ..SamplingParams::default() }
}

/// Asserts that a completion ended because its JSON was complete, and that the JSON is valid
/// against `schema`.
fn assert_valid(c: &Completion, schema: &Value, what: &str) -> Value {
    assert_eq!(c.finish_reason, FinishReason::Stop, "{what}: the grammar should end the output: {:?}", c.text);
    let v: Value = serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", c.text));
    let validator = jsonschema::validator_for(schema).expect("test schema compiles");
    if let Err(e) = validator.validate(&v) {
        panic!("{what}: {v} is not valid against the schema: {e}");
    }
    v
}

#[test]
fn schema_outputs_validate_greedy_and_sampled() {
    let mut e = tiny();
    let schema = person_schema();
    let prompts = ["Describe a person.", "A user record, please:", "{"];
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let prompt = Prompt::Text(p.to_string());
        reqs.push(request(None, prompt.clone(), constrained(ResponseFormat::JsonSchema(schema.clone()), 0.0, 0)));
        for seed in 1..=6 {
            let mut params = constrained(ResponseFormat::JsonSchema(schema.clone()), 1.0, seed + 10 * i as u64);
            if seed == 6 {
                (params.top_p, params.top_k) = (0.9, 20);
            }
            reqs.push(request(None, prompt.clone(), params));
        }
    }
    let out = e.generate(&reqs).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for (i, c) in out.iter().enumerate() {
        distinct.insert(assert_valid(c, &schema, &format!("request {i}")).to_string());
    }
    assert!(distinct.len() > prompts.len(), "sampling should vary the outputs: {distinct:?}");
}

#[test]
fn schema_outputs_validate_on_a_sentencepiece_vocabulary() {
    let mut e = load(ModelLocation::Gguf(repo().join("fixtures/tiny/spm/tiny-spm.gguf")));
    // The fixture's context is 256 tokens, and a character can take several byte tokens.
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "pet": {"enum": ["cat", "dog"]}},
        "required": ["name", "age", "pet"],
        "additionalProperties": false
    });
    let params = |seed: u64| SamplingParams { max_tokens: Some(200), ..constrained(ResponseFormat::JsonSchema(schema.clone()), seed as f32 * 0.5, seed) };
    let reqs: Vec<Request> = (0..4).map(|seed| request(None, Prompt::Text("Who is it?".into()), params(seed))).collect();
    for (i, c) in e.generate(&reqs).unwrap().iter().enumerate() {
        assert_valid(c, &schema, &format!("spm request {i}"));
    }
}

#[test]
fn a_constrained_neighbour_changes_nothing_for_unconstrained_rows() {
    let mut e = tiny();
    let schema = person_schema();
    let free = |seed: u64| SamplingParams { seed: Some(seed), ..SamplingParams::greedy(24) };
    let batch = |constrain: bool| -> Vec<Request> {
        let format = |f: ResponseFormat| if constrain { f } else { ResponseFormat::Text };
        vec![
            request(Some("a"), Prompt::Text("one".into()), free(1)),
            request(Some("b"), Prompt::Text("two".into()), constrained(format(ResponseFormat::JsonSchema(schema.clone())), 0.0, 2)),
            request(None, Prompt::Text("three".into()), free(3)),
            request(Some("a"), Prompt::Text("four".into()), constrained(format(ResponseFormat::JsonSchema(schema.clone())), 1.0, 4)),
            request(Some("b"), Prompt::Text("five".into()), SamplingParams { temperature: 1.0, ..free(5) }),
        ]
    };
    let mixed = e.generate(&batch(true)).unwrap();
    let plain = e.generate(&batch(false)).unwrap();
    for i in [0, 2, 4] {
        assert_eq!(mixed[i].token_ids, plain[i].token_ids, "unconstrained request {i} changed beside constrained ones");
    }
    for i in [1, 3] {
        assert_valid(&mixed[i], &schema, &format!("constrained request {i} with an adapter"));
    }
}

#[test]
fn schemas_that_cannot_compile_are_refused_on_response_format() {
    let e = tiny();
    let bad = [
        json!({"type": "nosuchtype"}),
        json!(5),
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}),
        json!({"type": "string", "minLength": 5, "maxLength": 2}),
    ];
    for schema in bad {
        let r = request(None, Prompt::Text("x".into()), constrained(ResponseFormat::JsonSchema(schema.clone()), 0.0, 0));
        match e.input().process(r) {
            Err(EngineError::InvalidInput { field: InputField::Sampling("response_format"), message, .. }) => assert!(!message.is_empty()),
            other => panic!("{schema}: expected a response_format error, got {other:?}"),
        }
    }
    let ok = request(None, Prompt::Text("x".into()), constrained(ResponseFormat::JsonObject, 0.0, 0));
    assert!(e.input().process(ok).unwrap().params().grammar.is_some());
    let text = request(None, Prompt::Text("x".into()), SamplingParams::greedy(4));
    assert!(e.input().process(text).unwrap().params().grammar.is_none());
}

#[test]
fn with_ignore_eos_the_text_stays_the_json() {
    let mut e = tiny();
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    let params = SamplingParams { ignore_eos: true, ..constrained(ResponseFormat::JsonSchema(schema.clone()), 0.0, 0) };
    let c = &e.generate(&[request(None, Prompt::Text("x".into()), SamplingParams { max_tokens: Some(30), ..params })]).unwrap()[0];
    assert_eq!(c.token_ids.len(), 30, "ignore_eos runs to max_tokens");
    let v: Value = serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", c.text));
    assert!(v["ok"].is_boolean(), "{v}");
}

fn smollm2() -> Option<Engine> {
    let path = cached_model_path(known_model("smollm2-135m").unwrap());
    if !path.exists() {
        eprintln!("skipped: {} is not cached (loramux models pull smollm2-135m)", path.display());
        return None;
    }
    let mut e = load(ModelLocation::Gguf(path));
    for name in ["pirate", "cowboy"] {
        e.loras_mut().load(name, &repo().join("adapters").join(name)).expect("example adapter loads");
    }
    Some(e)
}

#[test]
fn smollm2_json_with_adapters_in_a_mixed_batch() {
    let Some(mut e) = smollm2() else { return };
    let schema = person_schema();
    let chat = |text: &str| Prompt::Chat(vec![ChatMessage::user(text)]);
    let ask = "Describe a made-up person as JSON with name, age, pet, tags, admin and home.";
    let free = SamplingParams::greedy(32);
    let batch = |constrain: bool| -> Vec<Request> {
        let format = |f: ResponseFormat| if constrain { f } else { ResponseFormat::Text };
        let mut reqs = vec![
            request(Some("pirate"), chat("What is the capital of France?"), free.clone()),
            request(None, chat("Name three colours."), free.clone()),
            request(Some("cowboy"), chat("How are you?"), free.clone()),
        ];
        for (i, lora) in [None, Some("pirate"), Some("cowboy")].into_iter().enumerate() {
            reqs.push(request(lora, chat(ask), constrained(format(ResponseFormat::JsonSchema(schema.clone())), 0.0, 0)));
            reqs.push(request(lora, chat(ask), constrained(format(ResponseFormat::JsonSchema(schema.clone())), 1.0, 7 + i as u64)));
            reqs.push(request(lora, chat("Reply with a JSON object giving a cat's name and colour."), constrained(format(ResponseFormat::JsonObject), 0.0, 0)));
        }
        reqs
    };
    let mixed = e.generate(&batch(true)).unwrap();
    let plain = e.generate(&batch(false)).unwrap();
    for i in 0..3 {
        assert_eq!(mixed[i].token_ids, plain[i].token_ids, "unconstrained request {i} changed beside constrained ones");
    }
    for (k, c) in mixed.iter().enumerate().skip(3) {
        if (k - 3) % 3 == 2 {
            let v = assert_valid(c, &json!({"type": "object"}), &format!("json_object request {k}"));
            assert!(v.is_object(), "{v}");
        } else {
            assert_valid(c, &schema, &format!("json_schema request {k}"));
        }
    }
}
