//! Post-processing of generated tokens: incremental UTF-8 decoding (a character split
//! across tokens is released whole) and stop sequences (text that may begin a stop is
//! held back until it is known not to be one).

#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
    held: String,
    stops: Vec<String>,
    stopped: bool,
}

/// What one token released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence matched: `text` ends just before it.
    pub stop: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Takes one token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stop: true,
            };
        }
        self.pending.extend_from_slice(bytes);
        let text = self.take_utf8();
        self.release(&text)
    }

    /// The end of generation: whatever is still held.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        let released = self.release(&tail);
        if released.stop {
            return released.text;
        }
        released.text + &std::mem::take(&mut self.held)
    }

    /// The complete characters at the front of `pending`.
    fn take_utf8(&mut self) -> String {
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits for the next token.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Bytes no later token can complete are released, replaced.
            Err(_) => self.pending.len(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    fn release(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.stopped = true;
            return Released { text, stop: true };
        }
        let cut = self.held.len() - self.partial_stop_len();
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stop: false }
    }

    /// The longest suffix of the held text that begins some stop sequence.
    fn partial_stop_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() <= best {
                    break;
                }
                if stop.starts_with(suffix) {
                    best = suffix.len();
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(s: &mut TextStream, text: &str) -> Released {
        s.push(text.as_bytes())
    }

    #[test]
    fn holds_back_a_partial_stop_and_cuts_at_it() {
        let mut s = TextStream::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(push(&mut s, "Hello E").text, "Hello ");
        let r = push(&mut s, "NDING");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stop: true
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn releases_held_text_that_was_not_a_stop() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(push(&mut s, "a EN").text, "a ");
        assert_eq!(push(&mut s, "d").text, "ENd");
        assert_eq!(push(&mut s, " E").text, " ");
        assert_eq!(s.finish(), "E");
    }

    #[test]
    fn split_characters_are_released_whole() {
        let mut s = TextStream::new(vec![]);
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..1]).text, "");
        assert_eq!(s.push(&euro[1..]).text, "€");
        assert_eq!(s.push(b"ab\xe2").text, "ab");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
