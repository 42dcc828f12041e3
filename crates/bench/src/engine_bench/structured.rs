//! Structured-output section: what `json_object` and `json_schema` cost per token.

use std::time::Instant;

use loramux_engine::{Prompt, Request, RequestEvent, RequestId, SamplingParams};

use super::{batch_scheduler, load, median, row, EngineBenchConfig, Row, ROUNDS};

/// Requests in the structured-output batch, and tokens each generates.
const STRUCTURED_BATCH: usize = 8;
const STRUCTURED_TOKENS: usize = 64;

/// Output tokens/s of one batch generated freely, as any JSON object (`json_object`), and
/// against a JSON schema (`json_schema`): what structured output's grammar costs per token
/// (a mask over the vocabulary every step). Same chat prompts, greedy, every request runs
/// its full `STRUCTURED_TOKENS` (`ignore_eos`; the prompt and schema ask for a list longer
/// than that, so the grammar is live to the end); rounds interleaved, medians kept. Also the
/// one-off build of the vocabulary tables and the per-request compile of the schema, both
/// paid on the HTTP thread, outside these tokens/s.
pub fn structured(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    use loramux_engine::ResponseFormat;
    let mut engine = load(cfg, false, 1);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"people": {"type": "array", "minItems": 20, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}},
            "required": ["name", "age", "city"],
            "additionalProperties": false
        }}},
        "required": ["people"],
        "additionalProperties": false
    });
    let formats = [("no constraint", ResponseFormat::Text), ("json_object", ResponseFormat::JsonObject), ("json_schema", ResponseFormat::JsonSchema(schema))];
    let request = |i: usize, format: &ResponseFormat| {
        let ask = format!("List 20 made-up people as JSON, starting with person number {i}: a name, age and city for each.");
        let params = SamplingParams { ignore_eos: true, response_format: format.clone(), ..SamplingParams::greedy(STRUCTURED_TOKENS) };
        Request { lora: None, prompt: Prompt::Chat(vec![loramux_engine::ChatMessage::user(ask)]), params }
    };
    progress("structured output: vocabulary tables and schema compile");
    let t = Instant::now();
    engine.input().process(request(0, &formats[1].1)).expect("json_object request");
    rows.push(row("structured", "vocabulary tables (built once per model, on first use)", 1, t.elapsed().as_secs_f64() * 1e3, "ms"));
    let compiles = 20;
    let t = Instant::now();
    for i in 0..compiles {
        engine.input().process(request(i, &formats[2].1)).expect("json_schema request");
    }
    rows.push(row("structured", "compile the JSON schema (per request, with its checks)", 1, t.elapsed().as_secs_f64() * 1e3 / compiles as f64, "ms"));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); formats.len()];
    for round in 0..ROUNDS {
        for ((label, format), rate) in formats.iter().zip(&mut rates) {
            progress(&format!("structured output: {label}, round {}", round + 1));
            let processed: Vec<_> = (0..STRUCTURED_BATCH).map(|i| engine.input().process(request(i, format)).expect("benchmark request")).collect();
            let mut sched = batch_scheduler(&engine, STRUCTURED_BATCH, cfg.prompt_len);
            for (i, p) in processed.into_iter().enumerate() {
                let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&p)).expect("room for the batch");
                sched.add_request(&mut engine, ticket, i as RequestId, p, None).expect("benchmark request");
            }
            let t = Instant::now();
            let mut tokens = 0;
            while sched.has_unfinished() {
                for out in sched.step(&mut engine).outputs {
                    if let RequestEvent::Finished { completion } = out.event {
                        tokens += completion.token_ids.len();
                    }
                }
            }
            rate.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    let b = STRUCTURED_BATCH;
    for ((label, _), rate) in formats.iter().zip(&rates) {
        rows.push(row("structured", format!("{label}: output tokens/s ({STRUCTURED_TOKENS} each, greedy, prefill included)"), b, *rate, "tok/s"));
    }
    rows.push(row("structured", "json_object / no constraint, tokens/s", b, rates[1] / rates[0], "x"));
    rows.push(row("structured", "json_schema / no constraint, tokens/s", b, rates[2] / rates[0], "x"));
}

