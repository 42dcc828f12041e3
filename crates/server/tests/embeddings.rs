//! `/v1/embeddings` over HTTP on the tiny fixture model: OpenAI's shape for a string, a list
//! of strings, token ids and lists of them; unit-length vectors of the hidden size; base64
//! the same floats; the same text as string or as its ids the same vector; usage counted;
//! an adapter's vectors (batched through the engine with its LoRA) equal the reference's and
//! differ from the base's; an unknown adapter a 404; bad inputs refused with 400s naming the
//! field.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_answer_in_openai_shape() {
    let mut s = tiny_settings();
    s.lora_modules = vec![("a".into(), fixture_adapter("llama", "a"))];
    let srv = TestServer::tiny("llama", s).await;
    let (status, v) = srv.post("/v1/embeddings", &json!({"model": "tiny", "input": ["The quick brown fox", "a lazy dog"]})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("list"), Some("tiny")));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let (a, b) = (floats(&data[0]["embedding"]), floats(&data[1]["embedding"]));
    assert_eq!((a.len(), data[1]["index"].as_u64(), data[0]["object"].as_str()), (64, Some(1), Some("embedding")));
    for e in [&a, &b] {
        assert!((e.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4, "unit length");
    }
    assert_ne!(a, b);

    // The same text as its token ids, alone, gives the same vector; usage counts the ids.
    let (_, t) = srv.post("/tokenize", &json!({"prompt": "The quick brown fox"})).await;
    let ids = t["tokens"].clone();
    let (status, one) = srv.post("/v1/embeddings", &json!({"input": ids})).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["usage"]["prompt_tokens"], t["count"]);
    let same = floats(&one["data"][0]["embedding"]);
    assert!(same.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-5));
    let (status, many) = srv.post("/v1/embeddings", &json!({"input": [ids.clone(), ids]})).await;
    assert_eq!((status, many["data"].as_array().unwrap().len()), (200, 2));

    // base64: little-endian f32s of the same vector.
    let (_, b64) = srv.post("/v1/embeddings", &json!({"input": "The quick brown fox", "encoding_format": "base64"})).await;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded, a);

    // An adapter: its vectors, unit length, against transformers + peft's (the fixture of the
    // engine's reference test), with several inputs in one request, and not the base's.
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("embeddings.json")).unwrap()).unwrap();
    let cases: Vec<&Value> = fixture["cases"].as_array().unwrap().iter().filter(|c| c["adapter"] == "a").collect();
    let inputs: Vec<Value> = cases.iter().map(|c| c["prompt_ids"].clone()).collect();
    let (status, v) = srv.post("/v1/embeddings", &json!({"model": "a", "input": inputs})).await;
    assert_eq!((status, v["model"].as_str()), (200, Some("a")), "{v}");
    for (c, d) in cases.iter().zip(v["data"].as_array().unwrap()) {
        let want = normalized(&floats(&c["embedding"]));
        let got = floats(&d["embedding"]);
        assert!(got.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-4), "adapter a: {got:?} vs {want:?}");
    }
    let (_, base) = srv.post("/v1/embeddings", &json!({"model": "tiny", "input": inputs})).await;
    assert_ne!(base["data"][2]["embedding"], v["data"][2]["embedding"], "the adapter changes the vector");
    // An adapter nobody has: the 404 of any unknown model.
    let (status, v) = srv.post("/v1/embeddings", &json!({"model": "nope", "input": "x"})).await;
    assert_error(status, &v, 404, "unknown adapter");

    for (body, param) in [
        (json!({"input": ""}), "input[0]"),
        (json!({"input": []}), "input"),
        (json!({"input": 5}), "input"),
        (json!({"input": [[1, 100000]]}), "input[0]"),
        (json!({"input": "x", "encoding_format": "int8"}), "encoding_format"),
        (json!({"input": "x", "dimensions": 8}), "dimensions"),
        (json!({}), "input"),
    ] {
        let (status, v) = srv.post("/v1/embeddings", &body).await;
        assert_error(status, &v, 400, &body.to_string());
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    srv.shutdown().await;
}
