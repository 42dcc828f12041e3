//! loramux's engine: one base LLM in memory, many LoRA adapters beside it, and batches
//! that mix sequences of different adapters in one forward pass.

pub mod attention;
pub mod backend;
pub mod chat;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod input;
pub mod kv;
pub mod lora;
pub mod model_files;
pub mod models;
pub mod permute;
pub mod pooling;
pub mod prefix_cache;
pub mod registry;
pub mod routing;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod structured;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use models::config::ModelConfig;
pub use engine::{Engine, EngineOptions};
pub use error::{panic_message, EngineError, InputField, OverloadReason, Result};
pub use model_files::read_model_config;
pub use models::Architecture;
pub use sequence::{Completion, FinishReason, Sequence};
pub use input::{FairShare, InputProcessor, ProcessedRequest, Prompt, Request};
pub use lora::manager::LoraLimits;
pub use lora::LoraRequest;
pub use registry::{resolve_model, ModelLocation};
pub use sampling::{SampledToken, SamplingParams};
pub use scheduler::{AdmissionGate, AdmissionTicket, RequestEvent, RequestId, RequestOutput, Scheduler, SchedulerConfig, SchedulingPolicy, StepReport};
pub use structured::ResponseFormat;
