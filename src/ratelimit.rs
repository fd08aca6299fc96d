//! Rate-limited warnings, so that a hostile guest cannot flood the log.

use std::time::{Duration, Instant};

/// Logs at most one message per interval, counting the rest.
#[derive(Debug)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    const INTERVAL: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    /// Warn about queue `queue`, unless a warning went out less than an interval ago.
    pub fn warn(&mut self, queue: usize, msg: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "queue {queue}: {msg} ({} similar messages suppressed)",
                self.suppressed
            );
        } else {
            log::warn!("queue {queue}: {msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }

    /// Messages dropped since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_message_of_an_interval_is_logged() {
        let mut log = RateLimitedLog::new();
        log.warn(0, format_args!("first"));
        assert_eq!(log.suppressed(), 0);
        log.warn(0, format_args!("second"));
        log.warn(0, format_args!("third"));
        assert_eq!(log.suppressed(), 2);
    }
}
