//! Turning a request into checked token ids (vLLM's input processor): chat-template
//! rendering, tokenization, every check of the prompt and the room it leaves for the
//! completion, and the compiling of a structured output's grammar. It is shared (`Arc`) so
//! HTTP handlers run it on their own threads, never on the batch loop, and a
//! [`ProcessedRequest`] can only come from here: the scheduler and the model trust its
//! lengths and ids without checking them again.

use std::sync::{Arc, OnceLock};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, InputField, Result};
use crate::lora::LoraRequest;
use crate::pooling::Pooling;
use crate::sampling::SamplingParams;
use crate::structured::{Grammar, GrammarCompiler, ResponseFormat};
use crate::tokenizer::Tokenizer;

/// What the model is asked to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text (completions API).
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// One generation request as a caller gives it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The adapter, or `None` for the base model.
    pub lora: Option<LoraRequest>,
    pub prompt: Prompt,
    /// `max_tokens: None` fills the context.
    pub params: SamplingParams,
}

/// A request whose prompt is tokenized and checked, and whose `max_tokens` is resolved.
#[derive(Clone, Debug)]
pub struct ProcessedRequest {
    lora: Option<LoraRequest>,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
    share: Option<FairShare>,
    /// Set for an embedding request: prefill only, its pooled last-layer state is the answer.
    pooling: Option<Pooling>,
}

/// Whose request it is, for the scheduler's fair share between clients (tenants): the
/// client's name and its weight (a client of weight 2 is owed twice the service of one of
/// weight 1 while both wait).
#[derive(Clone, Debug, PartialEq)]
pub struct FairShare {
    pub client: std::sync::Arc<str>,
    pub weight: f64,
}

impl ProcessedRequest {
    /// The adapter the request runs with.
    pub fn lora(&self) -> Option<&LoraRequest> {
        self.lora.as_ref()
    }

    /// Prompt token ids (non-empty, inside the vocabulary, leaving room to generate).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// Sampling parameters, `max_tokens` resolved.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The client the request is served for (`None`: no fair share, one common queue).
    pub fn share(&self) -> Option<&FairShare> {
        self.share.as_ref()
    }

    /// Marks the request as `share`'s.
    pub fn with_share(mut self, share: FairShare) -> Self {
        self.share = Some(share);
        self
    }

    /// Most tokens the completion can have.
    pub fn max_tokens(&self) -> usize {
        self.params.max_tokens.expect("resolved by the input processor")
    }

    pub(crate) fn into_parts(self) -> (Option<LoraRequest>, Vec<u32>, SamplingParams, Option<Pooling>) {
        (self.lora, self.prompt_ids, self.params, self.pooling)
    }
}

/// Tokenizer, chat template and length limits of one model.
pub struct InputProcessor {
    tokenizer: Arc<Tokenizer>,
    chat: Option<ChatTemplate>,
    max_model_len: usize,
    vocab_size: usize,
    /// Structured output's vocabulary tables, built by the first request that asks for one
    /// (they take a while and most deployments never need them); the error says why this
    /// tokenizer cannot have them.
    grammars: OnceLock<std::result::Result<GrammarCompiler, String>>,
}

impl InputProcessor {
    pub(crate) fn new(tokenizer: Arc<Tokenizer>, chat: Option<ChatTemplate>, max_model_len: usize, vocab_size: usize) -> Self {
        Self { tokenizer, chat, max_model_len, vocab_size, grammars: OnceLock::new() }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Longest prompt plus completion.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Token ids of a prompt, unchecked.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Chat(messages) => self.tokenize_chat(messages, None),
        }
    }

    /// Token ids of a chat rendered with tool definitions in the template's context.
    pub fn tokenize_chat(&self, messages: &[ChatMessage], tools: Option<&[serde_json::Value]>) -> Result<Vec<u32>> {
        let chat = self
            .chat
            .as_ref()
            .ok_or_else(|| EngineError::InvalidRequest("this model has no chat template; send a plain prompt".into()))?;
        let text = chat.render_with_tools(messages, tools, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Tokenizes and checks a request: the one place prompts are checked.
    pub fn process(&self, request: Request) -> Result<ProcessedRequest> {
        let ids = self.tokenize(&request.prompt)?;
        self.process_tokens(request.lora, ids, &request.prompt, request.params)
    }

    /// Like [`InputProcessor::process`] for a prompt already tokenized with
    /// [`InputProcessor::tokenize`] (several choices of one prompt tokenize it once).
    pub fn process_tokens(
        &self,
        lora: Option<LoraRequest>,
        prompt_ids: Vec<u32>,
        prompt: &Prompt,
        mut params: SamplingParams,
    ) -> Result<ProcessedRequest> {
        let what = if matches!(prompt, Prompt::Chat(_)) { "messages" } else { "prompt" };
        let max_len = self.max_model_len;
        let invalid = |field, message: String, context_length_exceeded| EngineError::InvalidInput {
            field,
            message,
            context_length_exceeded,
        };
        let n = prompt_ids.len();
        if n == 0 {
            return Err(invalid(InputField::Prompt, "the prompt is empty".into(), false));
        }
        if n >= max_len {
            return Err(invalid(
                InputField::Prompt,
                format!(
                    "This model's maximum context length is {max_len} tokens. However, your request has {n} input tokens \
                     (at least one token must be left for the completion). Please reduce the length of the input."
                ),
                true,
            ));
        }
        if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(invalid(
                InputField::Prompt,
                format!("token id {bad} is outside the vocabulary (size {})", self.vocab_size),
                false,
            ));
        }
        match params.max_tokens {
            Some(m) if n + m > max_len => {
                return Err(invalid(
                    InputField::MaxTokens,
                    format!(
                        "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                         ({n} in the {what}, {m} in the completion). Please reduce the length of the {what} or completion.",
                        n + m
                    ),
                    true,
                ));
            }
            Some(_) => {}
            None => params.max_tokens = Some(max_len - n),
        }
        params.validate()?;
        self.check_controls(&mut params)?;
        params.grammar = self.grammar(&params.response_format)?;
        Ok(ProcessedRequest { lora, prompt_ids, params, share: None, pooling: None })
    }

    /// An embedding request (`/v1/embeddings`): `prompt_ids` prefilled through the batch like
    /// any prompt, with `lora`'s adapter, generating nothing; it finishes with its `pooling`
    /// of the last decoder layer's states ([`crate::Completion::embedding`]). The prompt may
    /// fill the whole context (no token is left to generate).
    pub fn process_embedding(&self, lora: Option<LoraRequest>, prompt_ids: Vec<u32>, pooling: Pooling) -> Result<ProcessedRequest> {
        let invalid = |message: String, context_length_exceeded| EngineError::InvalidInput { field: InputField::Prompt, message, context_length_exceeded };
        let (n, max_len) = (prompt_ids.len(), self.max_model_len);
        if n == 0 {
            return Err(invalid("the input is empty".into(), false));
        }
        if n > max_len {
            return Err(invalid(format!("the input has {n} tokens; this model's context is {max_len}"), true));
        }
        if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(invalid(format!("token id {bad} is outside the vocabulary (size {})", self.vocab_size), false));
        }
        let params = SamplingParams { max_tokens: Some(0), ..SamplingParams::default() };
        Ok(ProcessedRequest { lora, prompt_ids, params, share: None, pooling: Some(pooling) })
    }

    /// The compiled grammar of a format (`None` for text); one that cannot compile is an
    /// input error on `response_format`. Also how a caller checks a schema it may use later
    /// (a tool's `parameters`) before anything is queued.
    pub fn grammar(&self, format: &ResponseFormat) -> Result<Option<Grammar>> {
        if *format == ResponseFormat::Text {
            return Ok(None);
        }
        let compiler = self.grammars.get_or_init(|| GrammarCompiler::new(&self.tokenizer, self.vocab_size));
        let compiler = compiler.as_ref().map_err(|why| EngineError::InvalidInput {
            field: InputField::Sampling("response_format"),
            message: format!("structured output is not available for this model: {why}"),
            context_length_exceeded: false,
        })?;
        compiler.compile(format)
    }
}

impl InputProcessor {
    /// Token ids of `logit_bias` and `allowed_token_ids` inside the vocabulary, and
    /// `bad_words` tokenized as vLLM does: each word alone and after a space.
    fn check_controls(&self, params: &mut SamplingParams) -> Result<()> {
        let vocab = self.vocab_size;
        let outside = |field: &'static str, id: u32| EngineError::InvalidInput {
            field: InputField::Sampling(field),
            message: format!("token id {id} in '{field}' is outside the vocabulary (size {vocab})"),
            context_length_exceeded: false,
        };
        if let Some(&(id, _)) = params.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(outside("logit_bias", id));
        }
        if let Some(&id) = params.allowed_token_ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(outside("allowed_token_ids", id));
        }
        let mut ids = Vec::with_capacity(params.bad_words.len() * 2);
        for word in &params.bad_words {
            for text in [word.clone(), format!(" {word}")] {
                let w = self.tokenizer.encode(&text, false)?;
                if !w.is_empty() && !ids.contains(&w) {
                    ids.push(w);
                }
            }
        }
        params.bad_words_ids = ids;
        Ok(())
    }
}
