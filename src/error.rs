//! Printing errors with their causes on one line.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources, joined by `": "`. Errors keep their own
/// message and their cause apart (the cause is `source()`), so this is how a user or a log
/// line gets the whole story, each part once.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            let text = e.to_string();
            if !text.is_empty() {
                write!(f, ": {text}")?;
            }
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening disk.raw")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_level_once() {
        let e = Outer(std::io::Error::other("no such file"));
        assert_eq!(Chain(&e).to_string(), "opening disk.raw: no such file");
    }
}
