//! Cutting a QMP client's byte stream into JSON messages, with bounds on what one message may
//! cost.
//!
//! QMP is a stream of JSON values, not of lines: QEMU's own Python client sends requests with
//! no newline after them, and a human may type one over several lines. QEMU's JSON streamer
//! finds message boundaries by counting braces and brackets outside strings; this does the
//! same, byte by byte, so that a message is only handed to serde_json once it is complete and
//! known to be within bounds. A message over a bound is answered with an error as soon as the
//! bound is crossed and the rest of it is skipped, still counting braces but no longer kept in
//! memory, so that the session goes on with the next message (QEMU recovers the same way).
//! Error texts are QEMU's.

use thiserror::Error;

/// What one message may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of one message, from its first byte to its last.
    pub max_bytes: usize,
    /// Structural tokens (`{`, `[`, `,`, `:`) of one message; bounds the number of values, so
    /// that a message within `max_bytes` cannot become many times that much memory once parsed.
    pub max_tokens: usize,
    /// Open braces plus brackets. Below serde_json's recursion limit (128), so that a deep
    /// message is refused here, without buffering, rather than by the parser.
    pub max_depth: usize,
}

/// The limits of vubd's control socket (documented in docs/usage.md).
pub const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_tokens: 1 << 16,
    max_depth: 64,
};

// serde_json refuses anything deeper than 128 levels; messages must never get that far.
const _: () = assert!(LIMITS.max_depth < 128);

/// Bytes of a string shown in a [`FrameError::Stray`] error: enough to find it, without
/// echoing a long string back.
const STRAY_SHOWN: usize = 64;

/// Why a message was refused before parsing.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("JSON token size limit exceeded")]
    Size,
    #[error("JSON token count limit exceeded")]
    Tokens,
    #[error("JSON nesting depth limit exceeded")]
    Depth,
    /// A raw control character in a string: QEMU's lexer ends the string there with this
    /// error, so that an unterminated string does not swallow the lines that follow. Holds
    /// the string from its opening quote to that character, as QEMU shows it (cut short).
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
}

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message within the limits, to be parsed.
    Message(Vec<u8>),
    /// A message that broke a limit; its remaining bytes will be skipped.
    Error(FrameError),
}

/// Where in a message the next byte falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between messages.
    Idle,
    /// A top-level run of bytes that is neither an object, an array nor a string (a number,
    /// `true`, or junk); it ends at whitespace or at the start of the next message.
    Scalar,
    /// A top-level string.
    TopString,
    /// Inside an object or array.
    Nested,
}

/// Splits a byte stream into messages; see the module documentation.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    state: State,
    buf: Vec<u8>,
    /// Counted apart, and never below zero, as QEMU's streamer counts them: a message ends
    /// when both are back to zero.
    braces: usize,
    brackets: usize,
    tokens: usize,
    in_string: bool,
    /// Where the string being read starts in `buf`.
    string_start: usize,
    escape: bool,
    /// The message broke a limit: its error went out, the rest of it is skipped.
    skipping: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl Framer {
    pub fn new(limits: Limits) -> Framer {
        Framer {
            // A message's first byte is always kept, so every bound is at least one.
            limits: Limits {
                max_bytes: limits.max_bytes.max(1),
                max_tokens: limits.max_tokens.max(1),
                max_depth: limits.max_depth.max(1),
            },
            state: State::Idle,
            buf: Vec::new(),
            braces: 0,
            brackets: 0,
            tokens: 0,
            in_string: false,
            string_start: 0,
            escape: false,
            skipping: false,
        }
    }

    /// Take the next byte of the stream; returns a message once its last byte arrived, or an
    /// error once it broke a limit.
    pub fn push(&mut self, b: u8) -> Option<Frame> {
        match self.state {
            State::Idle => {
                self.start(b);
                None
            }
            State::Scalar => {
                if is_space(b) || matches!(b, b'{' | b'[' | b'"') {
                    let done = self.finish();
                    // Whitespace, or the first byte of a message: never a frame of its own.
                    self.start(b);
                    done
                } else {
                    self.keep(b)
                }
            }
            State::TopString => self.string_byte(b),
            State::Nested if self.in_string => self.string_byte(b),
            State::Nested => self.nested_byte(b),
        }
    }

    /// The first byte of a message (or whitespace between messages).
    fn start(&mut self, b: u8) {
        self.state = match b {
            _ if is_space(b) => return,
            b'{' | b'[' => {
                self.open(b);
                State::Nested
            }
            b'"' => State::TopString,
            _ => State::Scalar,
        };
        self.tokens = usize::from(matches!(b, b'{' | b'['));
        self.string_start = 0;
        self.buf.push(b);
    }

    fn open(&mut self, b: u8) {
        if b == b'{' {
            self.braces += 1;
        } else {
            self.brackets += 1;
        }
    }

    fn string_byte(&mut self, b: u8) -> Option<Frame> {
        if self.escape {
            self.escape = false;
        } else if b == b'\\' {
            self.escape = true;
        } else if b == b'"' {
            self.in_string = false;
            let kept = self.keep(b);
            if self.state == State::TopString {
                // After an error (`kept`), finish only resets: never two frames at once.
                let done = self.finish();
                return kept.or(done);
            }
            return kept;
        } else if b < 0x20 {
            self.in_string = false;
            let failed = self.fail(FrameError::Stray(self.stray_token(b)));
            if self.state == State::TopString {
                self.finish();
            }
            return failed;
        }
        self.keep(b)
    }

    fn nested_byte(&mut self, b: u8) -> Option<Frame> {
        let mut refused = None;
        match b {
            b'"' => {
                self.in_string = true;
                self.string_start = self.buf.len();
            }
            b'{' | b'[' => {
                self.open(b);
                if self.braces + self.brackets > self.limits.max_depth {
                    refused = self.fail(FrameError::Depth);
                }
                refused = refused.or_else(|| self.count_token());
            }
            b',' | b':' => refused = self.count_token(),
            b'}' => self.braces = self.braces.saturating_sub(1),
            b']' => self.brackets = self.brackets.saturating_sub(1),
            _ => {}
        }
        let kept = refused.or_else(|| self.keep(b));
        if self.braces == 0 && self.brackets == 0 {
            // After an error (`kept`) the message is skipped and finish only resets: never two
            // frames at once.
            let done = self.finish();
            return kept.or(done);
        }
        kept
    }

    /// The string being read, ended by `b`, to show in an error: at most its first
    /// [`STRAY_SHOWN`] bytes.
    fn stray_token(&self, b: u8) -> String {
        let token = self.buf.get(self.string_start..).unwrap_or_default();
        if token.len() > STRAY_SHOWN {
            return format!("{}...", String::from_utf8_lossy(&token[..STRAY_SHOWN]));
        }
        let mut shown = String::from_utf8_lossy(token).into_owned();
        shown.push(char::from(b));
        shown
    }

    fn count_token(&mut self) -> Option<Frame> {
        self.tokens += 1;
        if self.tokens > self.limits.max_tokens {
            return self.fail(FrameError::Tokens);
        }
        None
    }

    /// Keep `b` as part of the message, unless the message is being skipped.
    fn keep(&mut self, b: u8) -> Option<Frame> {
        if self.skipping {
            return None;
        }
        if self.buf.len() >= self.limits.max_bytes {
            return self.fail(FrameError::Size);
        }
        self.buf.push(b);
        None
    }

    /// The message broke a limit: report it once and skip the rest of it.
    fn fail(&mut self, e: FrameError) -> Option<Frame> {
        if self.skipping {
            return None;
        }
        self.skipping = true;
        // Give the memory back now: the rest of the message may be long.
        self.buf = Vec::new();
        Some(Frame::Error(e))
    }

    /// The message is complete: hand it over (unless it is being skipped) and start afresh.
    fn finish(&mut self) -> Option<Frame> {
        let buf = std::mem::take(&mut self.buf);
        let skipped = self.skipping;
        self.state = State::Idle;
        self.braces = 0;
        self.brackets = 0;
        self.tokens = 0;
        self.in_string = false;
        self.escape = false;
        self.skipping = false;
        (!skipped).then_some(Frame::Message(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        max_bytes: 64,
        max_tokens: 8,
        max_depth: 3,
    };

    /// Feed `input`; messages as strings, errors as their text.
    fn frames(limits: Limits, input: &[u8]) -> Vec<String> {
        let mut framer = Framer::new(limits);
        input
            .iter()
            .filter_map(|&b| framer.push(b))
            .map(|f| match f {
                Frame::Message(m) => String::from_utf8_lossy(&m).into_owned(),
                Frame::Error(e) => format!("error: {e}"),
            })
            .collect()
    }

    #[test]
    fn messages_are_cut_by_braces_not_lines() {
        assert_eq!(
            frames(LIMITS, b"{\"a\": 1}{\"b\": [2, {}]}\n  {\"c\":\n 3}"),
            ["{\"a\": 1}", "{\"b\": [2, {}]}", "{\"c\":\n 3}"]
        );
        // A message is only complete once its last brace arrives.
        assert!(frames(LIMITS, b"{\"execute\": \"x\"").is_empty());
    }

    #[test]
    fn braces_inside_strings_do_not_count() {
        assert_eq!(
            frames(LIMITS, br#"{"a": "}{\"]"} {"b": "\\"}"#),
            [r#"{"a": "}{\"]"}"#, r#"{"b": "\\"}"#]
        );
    }

    #[test]
    fn top_level_scalars_and_junk_are_messages_of_their_own() {
        assert_eq!(
            frames(LIMITS, b"42 true\n\"s {\" foo}{}\t] x[1]"),
            ["42", "true", "\"s {\"", "foo}", "{}", "]", "x", "[1]"]
        );
    }

    #[test]
    fn stray_closers_inside_a_message_do_not_go_below_zero() {
        // QEMU's counts: `]` with no open bracket leaves both at (1, 0); `}` ends the message.
        assert_eq!(frames(LIMITS, b"{]}{}"), ["{]}", "{}"]);
    }

    #[test]
    fn an_oversized_message_is_refused_once_and_skipped() {
        let mut input = b"{\"a\": \"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1000));
        input.extend_from_slice(b"{[\"} {\"b\": 1}");
        assert_eq!(
            frames(SMALL, &input),
            ["error: JSON token size limit exceeded", "{\"b\": 1}"]
        );
        // The same for a top-level run and a top-level string.
        let mut input = vec![b'7'; 100];
        input.extend_from_slice(b" 8 \"");
        input.extend(std::iter::repeat_n(b'y', 100));
        input.extend_from_slice(b"\" 9 ");
        assert_eq!(
            frames(SMALL, &input),
            [
                "error: JSON token size limit exceeded",
                "8",
                "error: JSON token size limit exceeded",
                "9"
            ]
        );
    }

    #[test]
    fn a_message_refused_on_its_last_byte_ends_there() {
        // 65 bytes: the closing brace is the one over the limit.
        let message = format!("{{\"a\": \"{}\"}}", "x".repeat(56));
        assert_eq!(message.len(), 65);
        assert_eq!(
            frames(SMALL, format!("{message}{{}}").as_bytes()),
            ["error: JSON token size limit exceeded", "{}"]
        );
        let string = format!("\"{}\"", "s".repeat(63));
        assert_eq!(
            frames(SMALL, format!("{string}[]").as_bytes()),
            ["error: JSON token size limit exceeded", "[]"]
        );
    }

    #[test]
    fn the_buffer_is_released_when_a_message_is_refused() {
        let mut framer = Framer::new(SMALL);
        for &b in b"[\"" {
            framer.push(b);
        }
        let refused = (0..10_000).find_map(|_| framer.push(b'z'));
        assert_eq!(refused, Some(Frame::Error(FrameError::Size)));
        assert_eq!(framer.buf.capacity(), 0);
        for _ in 0..10_000 {
            assert_eq!(framer.push(b'z'), None);
        }
        assert_eq!(framer.buf.capacity(), 0);
    }

    #[test]
    fn deep_nesting_is_refused_without_parsing() {
        assert_eq!(
            frames(SMALL, b"[[[[[[]]]]]] [[[]]]"),
            ["error: JSON nesting depth limit exceeded", "[[[]]]"]
        );
        assert_eq!(
            frames(SMALL, b"{\"a\": {\"b\": {\"c\": {}}}} {}"),
            ["error: JSON nesting depth limit exceeded", "{}"]
        );
    }

    #[test]
    fn too_many_values_are_refused() {
        assert_eq!(
            frames(SMALL, b"[1,2,3,4,5,6,7,8,9] [1,2]"),
            ["error: JSON token count limit exceeded", "[1,2]"]
        );
    }

    #[test]
    fn a_control_character_ends_a_string_with_an_error() {
        // The unterminated string does not swallow the next line; the object still has to
        // be closed, as in QEMU.
        assert_eq!(
            frames(LIMITS, b"{\"execute\": \"foo\n}\n{\"execute\": \"bar\"}"),
            [
                "error: JSON parse error, stray '\"foo\n'",
                "{\"execute\": \"bar\"}"
            ]
        );
        assert_eq!(
            frames(LIMITS, b"\"abc\r{}"),
            ["error: JSON parse error, stray '\"abc\r'", "{}"]
        );
        // A long string is cut short in the error.
        let long = format!("[\"{}\n]", "y".repeat(100));
        let shown = format!("\"{}...", "y".repeat(63));
        assert_eq!(
            frames(LIMITS, long.as_bytes()),
            [format!("error: JSON parse error, stray '{shown}'")]
        );
    }

    #[test]
    fn the_deepest_message_allowed_parses_and_one_level_more_is_refused() {
        let deep = format!(
            "{}{}",
            "[".repeat(LIMITS.max_depth),
            "]".repeat(LIMITS.max_depth)
        );
        let framed = frames(LIMITS, deep.as_bytes());
        assert_eq!(framed, [deep.as_str()]);
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_ok());
        let deeper = format!("[{deep}]");
        assert_eq!(
            frames(LIMITS, deeper.as_bytes()),
            ["error: JSON nesting depth limit exceeded"]
        );
    }
}
