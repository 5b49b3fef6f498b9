//! Stop strings matched on decoded text across token boundaries.
//!
//! Invariants: text that might be the start of a stop string is held back until it is
//! proven not to be; a stop string and everything after it are never emitted; emitted
//! chunks are always cut at `char` boundaries.

/// What one push released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text now safe to emit.
    pub text: String,
    /// A stop string matched: generation must end.
    pub stopped: bool,
}

/// Holds back text that could start a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds decoded text; returns what became safe and whether a stop string matched.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome {
                text,
                stopped: true,
            };
        }
        // The longest suffix of `held` that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        let text = std::mem::replace(&mut self.held, rest);
        StopOutcome {
            text,
            stopped: false,
        }
    }

    /// Ends the stream without a match: whatever was held back is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The text currently held back.
    pub fn held(&self) -> &str {
        &self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for c in chunks {
            let o = m.push(c);
            out.push(o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_chunks_is_caught_and_never_leaked() {
        let (out, stopped) = run(&["STOP"], &["Hello S", "T", "OP world"]);
        assert!(stopped);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert!(!out.concat().contains('S'));
    }

    #[test]
    fn false_start_is_released() {
        let (out, stopped) = run(&["STOP"], &["a ST", "ar"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "STar", ""]);
    }

    #[test]
    fn held_text_released_at_finish() {
        let (out, stopped) = run(&["\n\n"], &["line\n"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "line\n");
        assert_eq!(out[0], "line");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let (out, stopped) = run(&["é!", "xyz"], &["caf", "é", "!xyz"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, stopped) = run(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
