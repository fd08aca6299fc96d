//! Adaptive busy-polling of a queue, as QEMU's event loops poll (`poll-max-ns`, `poll-grow`,
//! `poll-shrink`): after handling its work, a queue thread keeps looking at its ring and its
//! completions for a window before it sleeps, because waking a sleeping thread costs
//! microseconds a request at queue depth 1 feels in full.
//!
//! The window follows what the queue does. After every sleep, the time from the last work to
//! the event that ended the sleep says whether a window of that length would have caught the
//! event: if it already did, nothing changes; if a window up to the bound would have, the
//! window grows (from 4 µs, times `grow`); if even the bound would not have, polling is no use
//! now and the window shrinks (divided by `shrink`, or to zero). A queue that goes idle thus
//! stops polling after its first long sleep, and an idle VM costs no CPU: the thread polls only
//! after an event.

use std::time::Duration;

/// The first window a queue that starts polling uses (QEMU's starting point).
const START: Duration = Duration::from_micros(4);

/// How a queue polls: the bound and the growth and shrink factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    /// The longest window; zero turns polling off.
    pub max: Duration,
    /// Factor the window grows by (at least 2).
    pub grow: u32,
    /// Divisor the window shrinks by; 0 drops it to zero at once (QEMU's default).
    pub shrink: u32,
}

impl PollPolicy {
    /// Polling off.
    pub const OFF: PollPolicy = PollPolicy {
        max: Duration::ZERO,
        grow: 2,
        shrink: 0,
    };

    /// QEMU's iothread defaults: up to 32 µs, doubling, dropped at once.
    pub const DEFAULT: PollPolicy = PollPolicy {
        max: Duration::from_micros(32),
        grow: 2,
        shrink: 0,
    };

    pub fn is_off(&self) -> bool {
        self.max.is_zero()
    }
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::DEFAULT
    }
}

/// One queue's current window.
#[derive(Debug)]
pub struct AdaptivePoll {
    policy: PollPolicy,
    window: Duration,
}

impl AdaptivePoll {
    pub fn new(policy: PollPolicy) -> Self {
        AdaptivePoll {
            policy,
            window: Duration::ZERO,
        }
    }

    /// Whether the queue polls at all.
    pub fn enabled(&self) -> bool {
        !self.policy.is_off()
    }

    /// How long to poll now (zero: sleep at once).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The queue slept; `idle` passed from its last work to the event that woke it.
    pub fn woke_after(&mut self, idle: Duration) {
        let max = self.policy.max;
        if idle <= self.window {
            // The window would have caught it: the sweet spot.
        } else if idle > max {
            // Even the longest window would not have: poll less.
            self.window = match self.policy.shrink {
                0 => Duration::ZERO,
                n => self.window / n,
            };
            // A window below the start is no use: stop.
            if self.window < START {
                self.window = Duration::ZERO;
            }
        } else if self.window < max {
            // A longer window would have caught it: poll longer.
            self.window = if self.window.is_zero() {
                START
            } else {
                self.window.saturating_mul(self.policy.grow.max(2))
            }
            .min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn grows_while_a_longer_window_would_catch_the_next_event() {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        assert_eq!(p.window(), Duration::ZERO);
        // The guest turns a request around in 10 µs: 4, 8, 16, then it is caught.
        for expected in [4, 8, 16] {
            p.woke_after(us(10));
            assert_eq!(p.window(), us(expected));
        }
        p.woke_after(us(10));
        assert_eq!(p.window(), us(16), "caught: no change");
        // Never past the bound.
        for _ in 0..10 {
            p.woke_after(us(30));
        }
        assert_eq!(p.window(), us(32));
    }

    #[test]
    fn a_long_sleep_stops_polling_and_an_idle_queue_never_starts() {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        for _ in 0..5 {
            p.woke_after(us(20));
        }
        assert_eq!(p.window(), us(32));
        p.woke_after(Duration::from_secs(1));
        assert_eq!(
            p.window(),
            Duration::ZERO,
            "QEMU's default: dropped at once"
        );
        p.woke_after(Duration::from_secs(5));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn shrinking_by_a_divisor_and_off() {
        let mut p = AdaptivePoll::new(PollPolicy {
            max: us(64),
            grow: 4,
            shrink: 2,
        });
        for expected in [4, 16, 64] {
            p.woke_after(us(50));
            assert_eq!(p.window(), us(expected));
        }
        p.woke_after(us(100));
        assert_eq!(p.window(), us(32));
        p.woke_after(us(100));
        assert_eq!(p.window(), us(16));
        for _ in 0..3 {
            p.woke_after(us(100));
        }
        assert_eq!(p.window(), Duration::ZERO, "below the start: off");

        let mut off = AdaptivePoll::new(PollPolicy::OFF);
        assert!(!off.enabled());
        off.woke_after(us(1));
        assert_eq!(off.window(), Duration::ZERO);
    }
}
