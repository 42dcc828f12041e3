//! The `--router-model` sentence embedder against transformers: all-MiniLM-L6-v2's word
//! pieces and its mean-pooled embeddings (fixtures/real/all-minilm-l6-v2.json, written by
//! scripts/reference/make_minilm_fixture.py). Skipped when the model is not pulled
//! (`loramux models pull all-minilm-l6-v2`; scripts/test.sh pulls it).

use std::path::PathBuf;

use loramux_engine::registry::resolve_folder_model;
use loramux_engine::routing::{cosine, Embedder, SentenceEmbedder};
use loramux_engine::{ChatMessage, Prompt};

#[test]
fn minilm_matches_transformers() {
    let Ok(dir) = resolve_folder_model("all-minilm-l6-v2") else {
        eprintln!("skipped: all-minilm-l6-v2 is not pulled");
        return;
    };
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/real/all-minilm-l6-v2.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let embedder = SentenceEmbedder::load(&dir, &candle_core::Device::Cpu).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want_ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = embedder.tokenize(&Prompt::Text(text.into())).unwrap();
        assert_eq!(ids, want_ids, "word pieces of {text:?}");
        let want: Vec<f32> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = embedder.embed(&ids).unwrap();
        let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        let max_diff = got.iter().zip(&want).map(|(g, w)| (g / norm - w).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{text:?}: max difference {max_diff} from transformers");
        assert!(cosine(&got, &want, &[]) > 0.99999);
    }
    // A chat is read as its user turns, the way the examples (plain text) are.
    let chat = Prompt::Chat(vec![ChatMessage::new("system", "Be brief."), ChatMessage::user("hello there")]);
    assert_eq!(embedder.tokenize(&chat).unwrap(), embedder.tokenize(&Prompt::Text("hello there".into())).unwrap());
    assert!(embedder.tokenize(&Prompt::Tokens(vec![1, 2])).is_err());
    assert!(embedder.embed(&embedder.tokenize(&Prompt::Text(String::new())).unwrap()).is_err());
}
