//! Adaptive busy-polling of a queue, as QEMU's event loops poll (`poll-max-ns`, `poll-grow`,
//! `poll-shrink`): after handling its work, a queue thread keeps looking at its ring and its
//! completions for a window before it sleeps, because waking a sleeping thread costs
//! microseconds a request at queue depth 1 feels in full.
//!
//! The window follows what the queue does. After every sleep, the time from the last work to
//! the event that ended the sleep says whether a longer window would have caught the event:
//! if so, the window grows (from 4 µs, times `grow`, up to the bound); if even the bound would
//! not have, polling is no use now and the window shrinks (divided by `shrink`, or to zero). A
//! queue that goes idle thus stops polling after its first long sleep, and an idle VM costs no
//! CPU: the thread polls only after an event.
//!
//! Unlike QEMU's rule, the time a sleep lasted is not taken as the time the event took to
//! come: it also holds the wake-up of the sleeping thread, tens of microseconds on a VM (about
//! 30 µs here), longer than the bound. Taken at face value, a guest that turns a request
//! around in 10 µs looks like one that takes 40 µs, and polling is dropped exactly where it
//! helps most (qemu-storage-daemon's depth-1 latency shows it: its polling never catches the
//! next request here). So a sleep counts as too long only past the bound plus
//! [`WAKE_ALLOWANCE`]; and polls that keep missing are given up after [`MAX_MISSES`] in a
//! row, for a number of events that doubles at each give-up until a poll catches again, so
//! that polling costs next to nothing where it cannot help (a guest under emulation, whose
//! requests come 50–80 µs apart).

use std::time::Duration;

/// The first window a queue that starts polling uses (QEMU's starting point).
const START: Duration = Duration::from_micros(4);
/// What a sleep lasts beyond the wait for the event itself: waking the thread.
pub const WAKE_ALLOWANCE: Duration = Duration::from_micros(50);
/// Polls in a row that catch nothing before polling is given up for a while.
pub const MAX_MISSES: u32 = 8;
/// Events sat out after the first give-up; doubled at each give-up in a row, up to
/// [`MAX_HOLDOFF`], and forgotten at the first catch.
const FIRST_HOLDOFF: u32 = 8;
const MAX_HOLDOFF: u32 = 1024;

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
    /// Polls since one last caught an event.
    misses: u32,
    /// Events left to sit out before polling again.
    holdoff: u32,
    /// The hold-off of the next give-up.
    next_holdoff: u32,
}

impl AdaptivePoll {
    pub fn new(policy: PollPolicy) -> Self {
        AdaptivePoll {
            policy,
            window: Duration::ZERO,
            misses: 0,
            holdoff: 0,
            next_holdoff: FIRST_HOLDOFF,
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

    /// The window caught an event: it serves.
    #[inline]
    pub fn caught(&mut self) {
        self.misses = 0;
        self.next_holdoff = FIRST_HOLDOFF;
    }

    /// The queue slept; `idle` passed from its last work to its waking up for the next event
    /// (the wake-up included).
    pub fn woke_after(&mut self, idle: Duration) {
        let max = self.policy.max;
        if max.is_zero() {
            return;
        }
        if self.holdoff > 0 {
            self.holdoff -= 1;
            return;
        }
        if idle > max.saturating_add(WAKE_ALLOWANCE) {
            // Even the longest window would not have caught it: poll less.
            self.shrink();
            return;
        }
        if !self.window.is_zero() {
            // A poll ran and missed.
            self.misses += 1;
            if self.misses >= MAX_MISSES {
                self.misses = 0;
                self.window = Duration::ZERO;
                self.holdoff = self.next_holdoff;
                self.next_holdoff = self.next_holdoff.saturating_mul(2).min(MAX_HOLDOFF);
                return;
            }
        }
        if self.window < max {
            // A longer window may catch the next one: poll longer.
            self.window = if self.window.is_zero() {
                START
            } else {
                self.window.saturating_mul(self.policy.grow.max(2))
            }
            .min(max);
        }
    }

    fn shrink(&mut self) {
        self.window = match self.policy.shrink {
            0 => Duration::ZERO,
            n => self.window / n,
        };
        // A window below the start is no use: stop.
        if self.window < START {
            self.window = Duration::ZERO;
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
    fn grows_while_the_next_event_comes_soon_and_stays_while_it_catches() {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        assert_eq!(p.window(), Duration::ZERO);
        // The guest turns a request around in 10 µs; a sleep lasts 40 µs with the wake-up.
        for expected in [4, 8, 16, 32, 32] {
            p.woke_after(us(40));
            assert_eq!(p.window(), us(expected));
        }
        // The window catches events: it stays, however long that goes on.
        for _ in 0..100 {
            p.caught();
            p.woke_after(us(40));
        }
        assert_eq!(p.window(), us(32));
        assert_eq!(p.window(), us(32));
    }

    #[test]
    fn polls_that_only_miss_are_given_up_for_longer_and_longer() {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        // Events 60 µs apart: no window up to 32 µs catches them. The first sleep starts the
        // window; then MAX_MISSES polls miss and it is given up.
        let mut sleeps = 1;
        p.woke_after(us(60));
        while !p.window().is_zero() {
            p.woke_after(us(60));
            sleeps += 1;
        }
        assert_eq!(sleeps, 1 + MAX_MISSES);
        // Sat out for FIRST_HOLDOFF events, then tried again; each give-up doubles it.
        for holdoff in [FIRST_HOLDOFF, 2 * FIRST_HOLDOFF, 4 * FIRST_HOLDOFF] {
            for _ in 0..holdoff {
                p.woke_after(us(60));
                assert_eq!(p.window(), Duration::ZERO, "sitting out");
            }
            p.woke_after(us(60));
            assert_eq!(p.window(), us(4), "tried again");
            while !p.window().is_zero() {
                p.woke_after(us(60));
            }
        }
        // A catch forgets it all.
        for _ in 0..8 * FIRST_HOLDOFF {
            p.woke_after(us(60));
        }
        p.woke_after(us(20));
        assert_eq!(p.window(), us(4));
        p.caught();
        p.woke_after(us(20));
        p.woke_after(us(20));
        assert_eq!(p.window(), us(16));
        p.caught();
        for _ in 0..1000 {
            p.woke_after(us(20));
            p.caught();
        }
        assert_eq!(p.window(), us(32), "catching: never given up");
    }

    #[test]
    fn a_long_sleep_stops_polling_and_an_idle_queue_never_starts() {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        for _ in 0..5 {
            p.woke_after(us(20));
        }
        assert_eq!(p.window(), us(32));
        p.woke_after(us(32) + WAKE_ALLOWANCE + us(1));
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
            p.woke_after(us(100));
            assert_eq!(p.window(), us(expected));
        }
        for expected in [32, 16, 8, 4, 0] {
            p.woke_after(us(200));
            assert_eq!(p.window(), us(expected));
        }

        let mut off = AdaptivePoll::new(PollPolicy::OFF);
        assert!(!off.enabled());
        off.woke_after(us(1));
        assert_eq!(off.window(), Duration::ZERO);
    }
}
