//! GGUF LoRA adapters (llama.cpp's format, files written by its own convert_lora_to_gguf.py
//! from PEFT adapters: scripts/reference/make_gguf_lora_fixture.py) give the PEFT original's
//! weights, logits and greedy tokens, which match transformers + peft; broken, hostile or
//! foreign GGUF files are refused with an error naming the problem, never a crash; a
//! `--lora-dir` serves `name.gguf` files by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loramux_engine::lora::{scan_lora_dir, LoraBatch, LoraModel, LoraModule};
use loramux_engine::models::LogitsFor;
use loramux_engine::{
    attention::SeqSpan, Engine, EngineError, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams,
};
use serde::Deserialize;

/// Largest allowed |ours - transformers| for a logit, as in reference_tiny.rs.
const LOGIT_TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Case {
    name: String,
    greedy: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    cases: Vec<Case>,
}

impl Expected {
    fn greedy(&self, case: &str) -> &[Vec<u32>] {
        &self.cases.iter().find(|c| c.name == case).unwrap_or_else(|| panic!("no case {case}")).greedy
    }
}

fn tiny(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny").join(arch)
}

fn gguf_dir(arch: &str) -> PathBuf {
    tiny(arch).join("adapters_gguf")
}

fn engine(arch: &str, max_rank: usize) -> Engine {
    let options = EngineOptions { lora: LoraLimits { max_loras: 8, max_rank, ..LoraLimits::default() }, ..EngineOptions::default() };
    Engine::load(&ModelLocation::HfDir(tiny(arch)), &options).unwrap()
}

/// transformers + peft outputs: greedy tokens and full-prompt logits.
fn reference(dir: &Path) -> (Expected, HashMap<String, Tensor>) {
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (expected, logits)
}

/// Full-prompt logits of one prompt with one resident adapter.
fn prompt_logits(engine: &Engine, prompt: &[u32], adapter: &str) -> Vec<Vec<f32>> {
    let model = engine.loras().get_by_name(adapter).expect("resident");
    let spans = [SeqSpan { start: 0, len: prompt.len(), pos: 0 }];
    let lora = LoraBatch::from_runs([(0..prompt.len(), Some(&*model))]);
    let mut cache = engine.model().new_cache();
    engine.model().forward(prompt, &spans, &mut [&mut cache], &lora, LogitsFor::AllRows).unwrap().to_vec2::<f32>().unwrap()
}

fn max_diff(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    ours.iter().flatten().zip(reference.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Greedy tokens of every (prompt, adapter) pair, all in one mixed batch.
fn greedy(engine: &mut Engine, runs: &[(&[u32], &str)], n: usize) -> Vec<Vec<u32>> {
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) };
    let requests: Vec<Request> = runs
        .iter()
        .map(|(p, a)| Request { lora: Some(LoraRequest::new(*a)), prompt: Prompt::Tokens(p.to_vec()), params: params.clone() })
        .collect();
    engine.generate(&requests).unwrap().into_iter().map(|c| c.token_ids).collect()
}

/// Largest |difference| between the two adapters' matrices (after scaling), asserting they
/// target the same projections with the same ranks.
fn weights_diff(gguf: &LoraModel, peft: &LoraModel) -> f32 {
    assert_eq!(gguf.layers.len(), peft.layers.len());
    let mut worst = 0f32;
    for (layer, (g, p)) in gguf.layers.iter().zip(&peft.layers).enumerate() {
        for module in LoraModule::ALL {
            match (&g[module.index()], &p[module.index()]) {
                (None, None) => {}
                (Some(g), Some(p)) => {
                    assert_eq!((g.rank, g.scale), (p.rank, p.scale), "{}: rank and scale", module.module_name(layer));
                    for (x, y) in [(&g.a, &p.a), (&g.b_t, &p.b_t)] {
                        let (x, y) = (x.to_f32_vec(), y.to_f32_vec());
                        worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
                    }
                }
                _ => panic!("{}: targeted by one adapter only", module.module_name(layer)),
            }
        }
    }
    worst
}

/// Loads the GGUF adapter and its PEFT original and checks the weights against the
/// original's (within `max_weight_diff`), then logits and greedy tokens (in one mixed batch
/// with the original) against transformers + peft's `case`. A lossless file (difference 0)
/// must also give the original's logits bit for bit and its tokens.
fn check_gguf(arch: &str, gguf: &str, peft: &Path, reference_dir: &Path, case: &str, max_weight_diff: f32) {
    let mut engine = engine(arch, 16);
    engine.loras_mut().load("gguf", &gguf_dir(arch).join(gguf)).unwrap();
    engine.loras_mut().load("peft", peft).unwrap();
    let (g, p) = (engine.loras().get_by_name("gguf").unwrap(), engine.loras().get_by_name("peft").unwrap());
    let diff = weights_diff(&g, &p);
    assert!(diff <= max_weight_diff, "{arch} {gguf}: weights differ from the PEFT original by {diff}");
    assert!(g.config.is_none() && g.bytes > 0 && g.max_rank == p.max_rank);

    let (expected, logits) = reference(reference_dir);
    for (i, prompt) in expected.prompts.iter().enumerate() {
        let theirs = logits[&format!("{case}.{i}")].to_vec2::<f32>().unwrap();
        let ours = prompt_logits(&engine, prompt, "gguf");
        let d = max_diff(&ours, &theirs);
        assert!(d <= LOGIT_TOLERANCE, "{arch} {gguf} prompt {i}: max |logit - transformers| {d} > {LOGIT_TOLERANCE}");
        if max_weight_diff == 0.0 {
            assert_eq!(ours, prompt_logits(&engine, prompt, "peft"), "{arch} {gguf} prompt {i}: logits equal to the PEFT adapter's");
        }
    }
    let runs: Vec<(&[u32], &str)> =
        expected.prompts.iter().flat_map(|p| [(p.as_slice(), "gguf"), (p.as_slice(), "peft")]).collect();
    let out = greedy(&mut engine, &runs, expected.max_new_tokens);
    for (i, want) in expected.greedy(case).iter().enumerate() {
        assert_eq!(&out[2 * i], want, "{arch} {gguf} prompt {i}: greedy tokens against transformers + peft");
        if max_weight_diff == 0.0 {
            assert_eq!(out[2 * i + 1], out[2 * i], "{arch} {gguf} prompt {i}: greedy tokens against the PEFT adapter");
        }
    }
}

#[test]
fn f32_gguf_is_the_peft_adapter_bit_for_bit() {
    for arch in ["llama", "qwen2"] {
        check_gguf(arch, "a.gguf", &tiny(arch).join("adapters/a"), &tiny(arch), "a_unmerged", 0.0);
    }
}

#[test]
fn bf16_gguf_on_every_projection_with_rank_pattern_matches_peft() {
    // q and k lora_b rows come permuted per head (query and key/value heads): put back.
    let dir = gguf_dir("llama");
    check_gguf("llama", "e.gguf", &dir.join("peft/e"), &dir, "e_unmerged", 0.0);
}

#[test]
fn q8_0_gguf_gives_the_adapter_it_holds() {
    // lora_a in Q8_0 (8-bit, one f16 scale per 32 values), lora_b rounded to F16 (rows of
    // r = 4 values are not whole blocks): the weights move by at most half a quantization
    // step from adapter a's, which is enough to change this tiny model's greedy tokens, so
    // the reference is peft running the values gguf-py reads back from the file.
    check_gguf("llama", "a-q8_0.gguf", &tiny("llama").join("adapters/a"), &gguf_dir("llama"), "a-q8_0_unmerged", 2e-3);
}

fn adapter_error(result: Result<impl std::fmt::Debug, EngineError>) -> (String, String) {
    match result {
        Err(EngineError::Adapter { field, message, .. }) => (field, message),
        other => panic!("expected an adapter error, got {other:?}"),
    }
}

/// A GGUF v3 file, written by hand so tests can say anything a hostile file could.
#[derive(Default)]
struct GgufBuilder {
    /// Key, GGUF value type, value bytes.
    metadata: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<RawTensor>,
}

struct RawTensor {
    name: String,
    /// PyTorch order (the file lists them reversed).
    dims: Vec<u64>,
    ggml_type: u32,
    /// Where the data is said to be; `None`: where it is.
    offset: Option<u64>,
    data: Vec<u8>,
}

const GGML_F32: u32 = 0;

impl GgufBuilder {
    /// The metadata of a Llama LoRA adapter with this alpha.
    fn llama_adapter(alpha: f32) -> Self {
        Self::default()
            .string("general.architecture", "llama")
            .string("general.type", "adapter")
            .string("adapter.type", "lora")
            .f32("adapter.lora.alpha", alpha)
    }

    fn string(mut self, key: &str, value: &str) -> Self {
        let mut v = (value.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(value.as_bytes());
        self.metadata.push((key.into(), 8, v));
        self
    }

    fn f32(mut self, key: &str, value: f32) -> Self {
        self.metadata.push((key.into(), 6, value.to_le_bytes().to_vec()));
        self
    }

    fn f64(mut self, key: &str, value: f64) -> Self {
        self.metadata.push((key.into(), 12, value.to_le_bytes().to_vec()));
        self
    }

    fn u32(mut self, key: &str, value: u32) -> Self {
        self.metadata.push((key.into(), 4, value.to_le_bytes().to_vec()));
        self
    }

    /// An F32 tensor of `dims` (PyTorch order) filled with `value`.
    fn tensor(self, name: &str, dims: &[u64], value: f32) -> Self {
        let n = dims.iter().product::<u64>() as usize;
        let data = (0..n).flat_map(|i| (value * (1.0 + i as f32 / n as f32)).to_le_bytes()).collect();
        self.raw_tensor(name, dims, GGML_F32, None, data)
    }

    fn raw_tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, offset: Option<u64>, data: Vec<u8>) -> Self {
        self.tensors.push(RawTensor { name: name.into(), dims: dims.to_vec(), ggml_type, offset, data });
        self
    }

    /// A rank-4 pair on layer 0's q projection of the tiny Llama (64 x 64).
    fn q_pair(self) -> Self {
        self.tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 0.01).tensor("blk.0.attn_q.weight.lora_b", &[64, 4], 0.02)
    }

    fn bytes(&self) -> Vec<u8> {
        let string = |s: &str| [(s.len() as u64).to_le_bytes().as_slice(), s.as_bytes()].concat();
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, kind, value) in &self.metadata {
            out.extend(string(key));
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        let mut next = 0u64;
        for t in &self.tensors {
            out.extend(string(&t.name));
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(t.offset.unwrap_or(next).to_le_bytes());
            next += (t.data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for t in &self.tensors {
            out.extend(&t.data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

#[test]
fn hand_written_adapter_loads_with_llama_cpp_scale() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine("llama", 16);
    // llama.cpp scales by alpha / rank, and by 1 when the file has no alpha.
    e.loras_mut().load("alpha", &GgufBuilder::llama_adapter(6.0).q_pair().write(dir.path(), "alpha.gguf")).unwrap();
    let no_alpha = GgufBuilder::default().string("general.architecture", "llama").string("general.type", "adapter").string("adapter.type", "lora");
    e.loras_mut().load("no-alpha", &no_alpha.q_pair().write(dir.path(), "no-alpha.gguf")).unwrap();
    for (name, scale) in [("alpha", 1.5), ("no-alpha", 1.0)] {
        let m = e.loras().get_by_name(name).unwrap();
        let w = m.weights(0, LoraModule::QProj).unwrap();
        assert_eq!((w.rank, w.scale, m.max_rank), (4, scale, 4), "{name}");
        assert!(m.weights(1, LoraModule::QProj).is_none() && m.weights(0, LoraModule::KProj).is_none());
    }
}

#[test]
fn broken_foreign_and_hostile_gguf_files_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut e = engine("llama", 4);
    e.loras_mut().load("good", &gguf_dir("llama").join("a.gguf")).unwrap();
    let a = std::fs::read(gguf_dir("llama").join("a.gguf")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut bad_magic = a.clone();
    bad_magic[..4].copy_from_slice(b"GGUX");
    let nan = f32::NAN;
    let cases: Vec<(PathBuf, &str, &str)> = vec![
        (write("empty.gguf", b""), "gguf", "not a readable GGUF"),
        (write("magic.gguf", &bad_magic), "gguf", "not a readable GGUF"),
        (write("header-cut.gguf", &a[..100]), "gguf", "not a readable GGUF"),
        // The header is whole, the tensor data is not.
        (write("data-cut.gguf", &a[..a.len() - 100]), "blk.2.attn_v.weight.lora_b", "beyond the end"),
        (d.join("missing.gguf"), "path", "cannot read"),
        (d.join("missing-dir"), "path", "neither a PEFT adapter directory nor a GGUF adapter file"),
        // A model, not an adapter.
        (tiny("spm").join("tiny-spm.gguf"), "general.type", "not an adapter"),
        (gguf_dir("qwen2").join("a.gguf"), "general.architecture", "converted for 'qwen2'"),
        // Rank 8 over --max-lora-rank 4.
        (gguf_dir("llama").join("e.gguf"), "r", "above the configured maximum 4"),
        (GgufBuilder::llama_adapter(8.0).string("adapter.type", "ia3").q_pair().write(d, "ia3.gguf"), "adapter.type", "'ia3'"),
        (GgufBuilder::llama_adapter(8.0).u32("adapter.alora_invocation_tokens", 5).q_pair().write(d, "alora.gguf"), "adapter.alora_invocation_tokens", "aLoRA"),
        (GgufBuilder::llama_adapter(nan).q_pair().write(d, "alpha-nan.gguf"), "adapter.lora.alpha", "finite"),
        (
            GgufBuilder::llama_adapter(8.0).f64("adapter.lora.alpha", 1e300).q_pair().write(d, "alpha-huge.gguf"),
            "adapter.lora.alpha",
            "not a finite 32-bit float",
        ),
        // An adapter for a wider model: q is 64 x 64 here.
        (
            GgufBuilder::llama_adapter(8.0)
                .tensor("blk.0.attn_q.weight.lora_a", &[4, 96], 0.01)
                .tensor("blk.0.attn_q.weight.lora_b", &[96, 4], 0.01)
                .write(d, "wide.gguf"),
            "shape",
            "an adapter made for another model",
        ),
        (
            GgufBuilder::llama_adapter(8.0)
                .tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 0.01)
                .tensor("blk.0.attn_q.weight.lora_b", &[64, 2], 0.01)
                .write(d, "ranks.gguf"),
            "shape",
            "one rank",
        ),
        (GgufBuilder::llama_adapter(8.0).tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 0.01).write(d, "half.gguf"), "blk.0.attn_q.weight.lora_b", "only one of"),
        (GgufBuilder::llama_adapter(8.0).q_pair().tensor("blk.3.attn_q.weight.lora_a", &[4, 64], 0.01).write(d, "deep.gguf"), "blk.3.attn_q.weight.lora_a", "another model"),
        (GgufBuilder::llama_adapter(8.0).q_pair().tensor("token_embd.weight.lora_a", &[4, 384], 0.01).write(d, "embd.gguf"), "embed_tokens", "embeddings"),
        (GgufBuilder::llama_adapter(8.0).q_pair().tensor("blk.0.attn_norm.weight", &[64], 1.0).write(d, "norm.gguf"), "blk.0.attn_norm.weight", "norms"),
        (GgufBuilder::llama_adapter(8.0).write(d, "no-tensors.gguf"), "gguf", "no lora_a/lora_b"),
        (
            GgufBuilder::llama_adapter(8.0).tensor("blk.0.attn_q.weight.lora_a", &[4, 64], nan).tensor("blk.0.attn_q.weight.lora_b", &[64, 4], 0.1).write(d, "nan.gguf"),
            "blk.0.attn_q.weight.lora_a",
            "NaN",
        ),
        (
            GgufBuilder::llama_adapter(8.0)
                .raw_tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 2, None, vec![0; 4 * 2 * 18])
                .tensor("blk.0.attn_q.weight.lora_b", &[64, 4], 0.1)
                .write(d, "q4_0.gguf"),
            "blk.0.attn_q.weight.lora_a",
            "Q4_0 is not supported",
        ),
        (
            GgufBuilder::llama_adapter(8.0)
                .tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 0.1)
                .raw_tensor("blk.0.attn_q.weight.lora_b", &[64, 4], GGML_F32, Some(u64::MAX - 8), vec![0; 1024])
                .write(d, "offset.gguf"),
            "blk.0.attn_q.weight.lora_b",
            "beyond the end",
        ),
        // Q8_0 rows must be whole 32-value blocks: lora_b rows hold r = 4 values.
        (
            GgufBuilder::llama_adapter(8.0)
                .tensor("blk.0.attn_q.weight.lora_a", &[4, 64], 0.1)
                .raw_tensor("blk.0.attn_q.weight.lora_b", &[64, 4], 8, None, vec![0; 64 * 34])
                .write(d, "q8-rows.gguf"),
            "blk.0.attn_q.weight.lora_b",
            "whole Q8_0 blocks",
        ),
        // candle's header parser divides by the alignment.
        (GgufBuilder::llama_adapter(8.0).u32("general.alignment", 0).q_pair().write(d, "align0.gguf"), "gguf", "not a readable GGUF"),
    ];
    for (path, field, needle) in cases {
        let (got_field, message) = adapter_error(e.loras_mut().load("bad", &path).map(|_| ()));
        assert_eq!(got_field, field, "{}: {message}", path.display());
        assert!(message.contains(needle), "{}: '{message}' lacks '{needle}'", path.display());
        assert!(e.loras().get_by_name("bad").is_none());
    }
    assert_eq!(e.loras().resident_count(), 1, "failed loads leave the resident set as it was");
}

#[test]
fn corrupted_and_truncated_converter_files_never_crash() {
    // A 0xff written over each of the first 4 KiB (header, tensor table, first data) of a
    // real file, and truncations at many lengths: each load returns an adapter or an error
    // (a truncated file always an error), none panics past the loader.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let e = engine("llama", 16);
    let shapes = e.loras().shapes().clone();
    let original = std::fs::read(gguf_dir("llama").join("e.gguf")).unwrap();
    for i in 0..4096.min(original.len()) {
        let mut v = original.clone();
        v[i] = 0xff;
        std::fs::write(&path, v).unwrap();
        let _ = LoraModel::load("fuzz", &path, &shapes, 16);
    }
    for n in (0..original.len()).step_by(61) {
        std::fs::write(&path, &original[..n]).unwrap();
        assert!(LoraModel::load("fuzz", &path, &shapes, 16).is_err(), "truncated to {n} bytes: loaded");
    }
}

#[test]
fn lora_dir_serves_gguf_files_by_stem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gguf_dir("llama").join("e.gguf"), dir.path().join("e.gguf")).unwrap();
    std::fs::copy(gguf_dir("llama").join("a.gguf"), dir.path().join("b.gguf")).unwrap();
    // A folder beats a file of the same name; other files and hidden ones are not adapters.
    let b = dir.path().join("b");
    std::fs::create_dir(&b).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny("llama").join("adapters/b").join(f), b.join(f)).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    std::fs::copy(gguf_dir("llama").join("a.gguf"), dir.path().join(".hidden.gguf")).unwrap();
    let found = scan_lora_dir(dir.path()).unwrap();
    assert_eq!(found, vec![("b".to_string(), b.clone()), ("e".to_string(), dir.path().join("e.gguf"))]);

    let mut e = engine("llama", 16);
    e.loras_mut().add_lora_dir(dir.path().to_path_buf());
    e.loras_mut().resolve("e").unwrap();
    assert!(e.loras_mut().resolve("notes").is_err() && e.loras_mut().resolve(".hidden").is_err());
    let (expected, _) = reference(&gguf_dir("llama"));
    let p = expected.prompts[0].as_slice();
    assert_eq!(greedy(&mut e, &[(p, "e")], expected.max_new_tokens)[0], expected.greedy("e_unmerged")[0]);
    assert_eq!(e.loras().get_by_name("e").unwrap().path, dir.path().join("e.gguf"));
}

/// `--merge-lora x.gguf`: the GGUF adapter folded into the float base for good is named
/// after the file's stem, and the base then answers with the unmerged adapter's tokens.
#[test]
fn gguf_adapter_merged_for_good_gives_the_unmerged_tokens() {
    let prompt: &[u32] = &[284, 282, 359, 298, 264, 300, 17];
    let mut unmerged = engine("llama", 16);
    unmerged.loras_mut().load("a", &gguf_dir("llama").join("a.gguf")).unwrap();
    let want = greedy(&mut unmerged, &[(prompt, "a")], 12);
    let mut merged = engine("llama", 16);
    assert_eq!(merged.merge_adapter_dir(&gguf_dir("llama").join("a.gguf")).unwrap(), "a");
    let base = Request {
        lora: None,
        prompt: Prompt::Tokens(prompt.to_vec()),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) },
    };
    assert_eq!(merged.generate(&[base]).unwrap().remove(0).token_ids, want[0]);
}
