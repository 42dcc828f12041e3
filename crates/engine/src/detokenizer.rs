//! Incremental detokenization with stop strings, as vLLM and TGI do it: each new token
//! decodes only a short window of recent tokens (`prefix_offset..`), so a token costs O(1)
//! however long the output is, and text already handed out is never re-decoded or sliced
//! again. Stop strings are searched only where a new match can start, and the text held
//! back while a stop string might still complete is bounded by the longest stop string.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Longest stop string accepted, in bytes: the text a stream may hold back is bounded by it.
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// The output text of one sequence, grown one token at a time.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Output text so far (cut at a stop string once one matched).
    text: String,
    /// Start of the token window decoded for context: the tokens of the last piece of
    /// text, so that a tokenizer whose text for a token depends on its neighbour
    /// (SentencePiece's leading space) gives the right characters.
    prefix_offset: usize,
    /// Tokens whose text is already in `text`.
    read_offset: usize,
    /// Bytes of `text` already handed out by [`Detokenizer::take_stable`].
    emitted: usize,
    /// Bytes of `text` already searched for stop strings (a match may start later only).
    searched: usize,
    /// Longest stop string in bytes.
    max_stop_len: usize,
}

impl Detokenizer {
    /// A detokenizer for output ended by any of `stop` (byte lengths bounded by the caller).
    pub fn new(stop: &[String]) -> Self {
        Self { max_stop_len: stop.iter().map(String::len).max().unwrap_or(0), ..Self::default() }
    }

    /// The whole output text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Decodes what `output_ids` added since the last call and reports whether a stop
    /// string now ends the text (the text is cut before it).
    pub fn push(&mut self, tokenizer: &Tokenizer, output_ids: &[u32], stop: &[String]) -> Result<bool> {
        let prefix = tokenizer.decode(&output_ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&output_ids[self.prefix_offset..], true)?;
        // An incomplete UTF-8 character decodes to U+FFFD at the end: wait for its rest.
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = output_ids.len();
        }
        Ok(self.cut_at_stop(stop))
    }

    fn cut_at_stop(&mut self, stop: &[String]) -> bool {
        if self.max_stop_len == 0 {
            return false;
        }
        let mut from = self.searched.saturating_sub(self.max_stop_len - 1);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &self.text[from..];
        let cut = stop.iter().filter(|s| !s.is_empty()).filter_map(|s| window.find(s.as_str())).min();
        self.searched = self.text.len();
        match cut {
            Some(at) => {
                self.text.truncate(from + at);
                self.emitted = self.emitted.min(self.text.len());
                true
            }
            None => false,
        }
    }

    /// Text produced since the last call that can no longer change. While the sequence
    /// runs (`finished` false), the tail that might still begin a stop string is held back.
    pub fn take_stable(&mut self, finished: bool) -> &str {
        let mut end = self.text.len();
        if !finished {
            end = end.saturating_sub(self.max_stop_len.saturating_sub(1));
        }
        while end > self.emitted && !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return "";
        }
        let start = self.emitted;
        self.emitted = end;
        &self.text[start..end]
    }

    /// Hands out the whole output text (for callers that want it at the end only).
    pub fn into_text(self) -> String {
        self.text
    }
}
