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
//! [`WAKE_ALLOWANCE`]; and polls that keep missing — [`MAX_MISSES`] in a row, or more than
//! half of the last 16 — are given up for a number of events that doubles at each give-up,
//! until polls catch again, so that polling costs little where it cannot help: a miss spins
//! for the whole window, more CPU than the wake-up a catch saves (a guest under emulation,
//! whose requests come 5 to 80 µs apart, catches some and misses many).

use std::time::Duration;

/// The first window a queue that starts polling uses (QEMU's starting point).
const START: Duration = Duration::from_micros(4);
/// What a sleep lasts beyond the wait for the event itself: waking the thread.
pub const WAKE_ALLOWANCE: Duration = Duration::from_micros(50);
/// Polls in a row that catch nothing before polling is given up for a while.
pub const MAX_MISSES: u32 = 8;
/// Polls tallied before judging whether they catch more than they miss.
const TALLY: u32 = 16;
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
    /// Catches and misses of the current tally.
    tally_caught: u32,
    tally_missed: u32,
}

impl AdaptivePoll {
    pub fn new(policy: PollPolicy) -> Self {
        AdaptivePoll {
            policy,
            window: Duration::ZERO,
            misses: 0,
            holdoff: 0,
            next_holdoff: FIRST_HOLDOFF,
            tally_caught: 0,
            tally_missed: 0,
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
        self.tally_caught += 1;
        self.judge_tally();
    }

    /// After [`TALLY`] polls: polls that mostly miss are given up; polls that mostly catch
    /// forget earlier give-ups.
    fn judge_tally(&mut self) {
        if self.tally_caught + self.tally_missed < TALLY {
            return;
        }
        let missing = self.tally_missed > self.tally_caught;
        self.tally_caught = 0;
        self.tally_missed = 0;
        if missing {
            self.give_up();
        } else {
            self.next_holdoff = FIRST_HOLDOFF;
        }
    }

    /// Stop polling for the next hold-off's events; the one after is twice as long.
    fn give_up(&mut self) {
        self.misses = 0;
        self.tally_caught = 0;
        self.tally_missed = 0;
        self.window = Duration::ZERO;
        self.holdoff = self.next_holdoff;
        self.next_holdoff = self.next_holdoff.saturating_mul(2).min(MAX_HOLDOFF);
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
            self.tally_missed += 1;
            if self.misses >= MAX_MISSES {
                self.give_up();
                return;
            }
            self.judge_tally();
            if self.window.is_zero() {
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

    /// A default poller whose window has grown to the bound (4, 8, 16, 32 µs).
    fn polling_at_the_bound() -> AdaptivePoll {
        let mut p = AdaptivePoll::new(PollPolicy::DEFAULT);
        for _ in 0..4 {
            p.woke_after(us(20));
        }
        assert_eq!(p.window(), us(32));
        p
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
        // Polls that catch keep going, and a tally of catches forgets the give-ups.
        for _ in 0..8 * FIRST_HOLDOFF {
            p.woke_after(us(60));
        }
        p.woke_after(us(20));
        assert_eq!(p.window(), us(4));
        p.woke_after(us(20));
        p.woke_after(us(20));
        assert_eq!(p.window(), us(16));
        for _ in 0..1000 {
            p.caught();
        }
        assert_eq!(p.window(), us(16), "catching: never given up");
        assert_eq!(p.next_holdoff, FIRST_HOLDOFF);
    }

    #[test]
    fn polls_that_miss_more_than_they_catch_are_given_up() {
        let mut p = polling_at_the_bound();
        // One catch, two misses, again and again: never 8 misses in a row, but mostly misses.
        let mut rounds = 0;
        while !p.window().is_zero() {
            p.caught();
            p.woke_after(us(60));
            p.woke_after(us(60));
            rounds += 1;
            assert!(rounds <= TALLY, "given up within a tally");
        }
        // Two catches for one miss: polling goes on.
        let mut p = polling_at_the_bound();
        for _ in 0..100 {
            p.caught();
            p.caught();
            p.woke_after(us(60));
        }
        assert_eq!(p.window(), us(32));
    }

    #[test]
    fn a_long_sleep_stops_polling_and_an_idle_queue_never_starts() {
        let mut p = polling_at_the_bound();
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
