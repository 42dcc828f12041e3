//! Reading adapters from disk: [`LoraModel::load`] picks the reader by what the path is
//! (a PEFT directory: `super::peft`; a GGUF file: `super::gguf`). Reads run off the batch
//! loop: each read runs on its own thread and its
//! result comes back through a channel the manager polls between steps. A read carries the
//! adapter's generation when it started, so a read that finishes after the adapter was
//! replaced or removed is recognised as stale and dropped; a reader that panics reports
//! an error instead of leaving the adapter "loading" forever.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use super::{gguf, peft, LoraModel, ModuleShapes};
use crate::error::{panic_message, EngineError};

impl LoraModel {
    /// Reads and validates an adapter: a directory is a PEFT adapter, a file (or a path
    /// ending in `.gguf`) a llama.cpp GGUF adapter. `max_rank` bounds every projection's rank.
    pub fn load(name: &str, path: &Path, shapes: &ModuleShapes, max_rank: usize) -> crate::Result<Self> {
        if path.is_dir() {
            peft::load(name, path, shapes, max_rank)
        } else if path.is_file() || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            gguf::load(name, path, shapes, max_rank)
        } else {
            Err(EngineError::adapter(
                name,
                "path",
                format!("{} is neither a PEFT adapter directory nor a GGUF adapter file", path.display()),
            ))
        }
    }
}

/// Reads and validates adapters against one base model's shapes and rank limit, on any
/// thread: the batch loop's lazy reads and the server's runtime loads share it.
#[derive(Clone, Debug)]
pub struct AdapterReader {
    shapes: ModuleShapes,
    max_rank: usize,
}

impl AdapterReader {
    pub(crate) fn new(shapes: ModuleShapes, max_rank: usize) -> Self {
        Self { shapes, max_rank }
    }

    /// Reads the adapter at `path` (a PEFT directory or a GGUF file) as `name`, with the
    /// seconds it took.
    pub fn read(&self, name: &str, path: &Path) -> crate::error::Result<(LoraModel, f64)> {
        let t = Instant::now();
        let model = LoraModel::load(name, path, &self.shapes, self.max_rank)?;
        Ok((model, t.elapsed().as_secs_f64()))
    }
}

/// A finished read: the adapter with its read time, or why it failed.
pub(crate) struct LoadResult {
    pub name: String,
    pub generation: u64,
    pub result: Result<(LoraModel, f64), Arc<EngineError>>,
}

/// Reads in flight and their results.
pub(crate) struct AdapterLoader {
    tx: Sender<LoadResult>,
    rx: Receiver<LoadResult>,
    /// Names being read, with the generation each read started at.
    in_flight: HashMap<String, u64>,
    /// Adapter name whose read panics on purpose (fault-injection tests only).
    panic_on: Option<String>,
}

impl AdapterLoader {
    pub fn new(panic_on: Option<String>) -> Self {
        let (tx, rx) = mpsc::channel();
        Self { tx, rx, in_flight: HashMap::new(), panic_on }
    }

    pub fn is_loading(&self, name: &str) -> bool {
        self.in_flight.contains_key(name)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Starts reading `path` as adapter `name` on a new thread.
    pub fn start(&mut self, name: &str, path: PathBuf, generation: u64, reader: AdapterReader) {
        let tx = self.tx.clone();
        let thread_name = name.to_string();
        let panic_on = self.panic_on.as_deref() == Some(name);
        let spawned = std::thread::Builder::new().name("loramux-lora-load".into()).spawn(move || {
            let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if panic_on {
                    panic!("injected fault: adapter reader panics");
                }
                reader.read(&thread_name, &path)
            }));
            let result = match read {
                Ok(Ok(read)) => Ok(read),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(panic) => Err(Arc::new(EngineError::adapter(
                    &thread_name,
                    "adapter_model.safetensors",
                    format!("the adapter reader crashed: {}", panic_message(&*panic)),
                ))),
            };
            let _ = tx.send(LoadResult { name: thread_name, generation, result });
        });
        match spawned {
            Ok(_) => {
                self.in_flight.insert(name.to_string(), generation);
            }
            Err(e) => {
                let _ = self.tx.send(LoadResult {
                    name: name.to_string(),
                    generation,
                    result: Err(Arc::new(EngineError::io("adapter reader thread", e))),
                });
                self.in_flight.insert(name.to_string(), generation);
            }
        }
    }

    /// Forgets a read in flight: its result will be dropped as stale.
    pub fn cancel(&mut self, name: &str) {
        self.in_flight.remove(name);
    }

    /// Results of reads that finished since the last call and are still wanted.
    pub fn finished(&mut self) -> Vec<LoadResult> {
        let mut out = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            if self.in_flight.get(&r.name) == Some(&r.generation) {
                self.in_flight.remove(&r.name);
                out.push(r);
            }
        }
        out
    }
}
