//! Stop sequences over streamed text: text that could be the start of a stop sequence is
//! held back until it is known not to be one, so a client never sees part of a stop.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one push released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence matched: `text` ends just before it and generation should end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.partial_suffix_len();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// The longest suffix of the held text that begins some stop sequence.
    fn partial_suffix_len(&self) -> usize {
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

    /// The end of generation: held text was not a stop after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_partial_match_and_cuts_at_the_stop() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("Hello E").text, "Hello ");
        let r = m.push("NDING");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn releases_held_text_that_turns_out_not_to_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a EN").text, "a ");
        assert_eq!(m.push("d").text, "ENd");
        assert_eq!(m.push(" E").text, " ");
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn no_stops_releases_everything() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("x€").text, "x€");
    }
}
