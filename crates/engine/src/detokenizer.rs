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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The tiny fixture's byte-level BPE: random ids give incomplete and invalid UTF-8 and
    /// multi-byte characters split across tokens.
    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")).unwrap()
    }

    fn random_ids(rng: &mut StdRng, vocab: usize) -> Vec<u32> {
        let len = rng.random_range(1..48);
        (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()
    }

    /// Pushes `ids` one token at a time (as generation does) until a stop string matches;
    /// returns the detokenizer, what `take_stable` handed out, and whether a stop matched.
    fn run(tok: &Tokenizer, ids: &[u32], stop: &[String]) -> (Detokenizer, String, bool) {
        let mut d = Detokenizer::new(stop);
        let mut streamed = String::new();
        for k in 1..=ids.len() {
            if d.push(tok, &ids[..k], stop).unwrap() {
                streamed.push_str(d.take_stable(true));
                return (d, streamed, true);
            }
            streamed.push_str(d.take_stable(false));
        }
        streamed.push_str(d.take_stable(true));
        (d, streamed, false)
    }

    #[test]
    fn token_by_token_text_equals_a_full_decode() {
        let tok = tokenizer();
        let mut rng = StdRng::seed_from_u64(10);
        let (mut exact, mut held_tail) = (0, 0);
        for case in 0..2000 {
            let ids = random_ids(&mut rng, tok.vocab_size());
            let full = tok.decode(&ids, true).unwrap();
            let (d, streamed, stopped) = run(&tok, &ids, &[]);
            assert!(!stopped);
            assert_eq!(streamed, d.text(), "case {case}: take_stable pieces add up to the text");
            if full.ends_with('\u{FFFD}') {
                // An incomplete character at the very end is held back, never shown mangled.
                assert!(full.starts_with(d.text()), "case {case} {ids:?}: {:?} is not a prefix of {full:?}", d.text());
                held_tail += 1;
            } else {
                assert_eq!(d.text(), full, "case {case}: ids {ids:?}");
                exact += 1;
            }
        }
        assert!(exact > 1000 && held_tail > 0, "both kinds of case occur: {exact} exact, {held_tail} with a held tail");
    }

    #[test]
    fn stable_pieces_concatenate_to_the_final_text_and_stops_cut_exactly() {
        let tok = tokenizer();
        let mut rng = StdRng::seed_from_u64(11);
        let mut cuts = 0;
        for case in 0..2000 {
            let ids = random_ids(&mut rng, tok.vocab_size());
            let full = tok.decode(&ids, true).unwrap();
            if full.ends_with('\u{FFFD}') {
                continue;
            }
            // A stop string taken from the text itself (1 to 3 characters, often multi-byte
            // or U+FFFD), or a fixed multi-byte one that rarely occurs.
            let chars: Vec<(usize, char)> = full.char_indices().collect();
            let stop = if chars.is_empty() || case % 4 == 0 {
                ["é", "€", "\u{FFFD}\u{FFFD}", "ab"][rng.random_range(0..4)].to_string()
            } else {
                let i = rng.random_range(0..chars.len());
                let n = rng.random_range(1..=3).min(chars.len() - i);
                let end = chars.get(i + n).map_or(full.len(), |c| c.0);
                full[chars[i].0..end].to_string()
            };
            let stops = vec![stop.clone(), "\u{1}never".to_string()];
            let (d, streamed, stopped) = run(&tok, &ids, &stops);
            let want = match full.find(&stop) {
                Some(at) => {
                    cuts += 1;
                    assert!(stopped, "case {case}: {stop:?} occurs in {full:?} but did not stop");
                    &full[..at]
                }
                None => {
                    assert!(!stopped, "case {case}: stopped on {stop:?} absent from {full:?}");
                    full.as_str()
                }
            };
            assert_eq!(d.text(), want, "case {case}: stop {stop:?} in {full:?}");
            assert_eq!(streamed, want, "case {case}: take_stable pieces, stop {stop:?}");
        }
        assert!(cuts > 1000, "only {cuts} cases cut");
    }

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back() {
        let tok = tokenizer();
        let ids = tok.encode("hello wor", false).unwrap();
        let whole = tok.decode(&ids, true).unwrap();
        assert!(whole.ends_with("hello wor"), "{whole:?}");
        let stop = vec!["world".to_string()];
        let mut d = Detokenizer::new(&stop);
        let mut out = String::new();
        for k in 1..=ids.len() {
            assert!(!d.push(&tok, &ids[..k], &stop).unwrap());
            out.push_str(d.take_stable(false));
        }
        assert_eq!(d.text(), whole);
        // " wor" (one byte less than "world") might still become the stop string: held back.
        assert_eq!(out, whole.strip_suffix(" wor").unwrap());
        assert_eq!(d.take_stable(true), " wor");

        // Completing the stop string cuts it (and what was held back) off.
        let ids = tok.encode("hello world and more", false).unwrap();
        let whole = tok.decode(&ids, true).unwrap();
        let want = &whole[..whole.find("world").unwrap()];
        let (d, streamed, stopped) = run(&tok, &ids, &stop);
        assert!(stopped);
        assert_eq!((d.text(), streamed.as_str()), (want, want));

        // Multi-byte characters split across byte tokens: a stop inside one is found whole.
        let ids = tok.encode("prix: 5€, café", false).unwrap();
        let whole = tok.decode(&ids, true).unwrap();
        assert!(whole.ends_with("prix: 5€, café"), "{whole:?}");
        for stop in ["€", "é", ", c"] {
            let want = &whole[..whole.find(stop).unwrap()];
            let (d, streamed, stopped) = run(&tok, &ids, &[stop.to_string()]);
            assert!(stopped, "{stop:?}");
            assert_eq!((d.text(), streamed.as_str()), (want, want), "stop {stop:?}");
        }
        let (d, streamed, _) = run(&tok, &ids, &[]);
        assert_eq!((d.text(), streamed.as_str()), (whole.as_str(), whole.as_str()));
    }
}
