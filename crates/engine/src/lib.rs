//! loramux's engine: one base LLM in memory, many LoRA adapters beside it, and batches
//! that mix sequences of different adapters in one forward pass.

pub mod attention;
pub mod chat;
pub mod config;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod input;
mod kernels;
pub mod kv;
pub mod lora;
pub mod model;
pub mod prefix_cache;
pub mod quant;
pub mod registry;
pub mod sampling;
pub mod scheduler;
pub mod structured;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use engine::{Completion, Engine, EngineOptions, FinishReason, Sequence};
pub use error::{EngineError, InputField, Result};
pub use input::{InputProcessor, ProcessedRequest, Prompt, Request};
pub use lora::manager::LoraLimits;
pub use lora::LoraRequest;
pub use registry::{resolve_model, ModelLocation};
pub use sampling::{SampledToken, SamplingParams};
pub use scheduler::{AdmissionGate, AdmissionTicket, RequestEvent, RequestId, RequestOutput, Scheduler, SchedulerConfig, StepReport};
pub use structured::ResponseFormat;
