//! The gateway's one backoff: a wait that doubles from a first delay up to a ceiling.
//!
//! Reconnects to the cloud draw each wait with *full jitter*: uniformly between zero and
//! the current bound (the variant of AWS's "Exponential Backoff And Jitter" that spreads
//! retries the most), so a fleet of gateways coming back after a cloud outage arrives
//! spread over the whole window instead of in waves. Local retries (a Modbus bus, a serial
//! port, accepting sockets, the login throttle) use the bound itself: nothing else competes
//! for them, and a predictable delay is easier to read in a log.
//!
//! Written here rather than taken from a crate: the `backoff` crate is unmaintained
//! (RUSTSEC-2025-0012), and `backon` or `exponential-backoff` bring a retry framework or
//! proportional jitter for what is a dozen lines over `rand`, which the gateway has anyway.

use std::time::Duration;

use rand::Rng;

/// `first` doubled `doublings` times, at most `max`.
pub fn bound(first: Duration, max: Duration, doublings: u32) -> Duration {
    first.saturating_mul(1u32 << doublings.min(31)).min(max)
}

/// Successive waits of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max: max.max(first),
            attempt: 0,
        }
    }

    /// The bound of the next wait.
    pub fn bound(&self) -> Duration {
        bound(self.first, self.max, self.attempt)
    }

    /// The next wait, drawn uniformly between zero and the bound (full jitter); the bound
    /// doubles for the one after.
    pub fn next_jittered(&mut self) -> Duration {
        let bound = self.bound();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
    }

    /// The next wait, the bound itself; the bound doubles for the one after.
    pub fn next_bound(&mut self) -> Duration {
        let bound = self.bound();
        self.attempt = self.attempt.saturating_add(1);
        bound
    }

    /// After a success: the next wait is bounded by `first` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_bound_doubles_to_its_ceiling_and_never_overflows() {
        assert_eq!(bound(200 * MS, 10_000 * MS, 0), 200 * MS);
        assert_eq!(bound(200 * MS, 10_000 * MS, 1), 400 * MS);
        assert_eq!(bound(200 * MS, 10_000 * MS, 5), 6_400 * MS);
        assert_eq!(bound(200 * MS, 10_000 * MS, 6), 10_000 * MS);
        assert_eq!(bound(200 * MS, 10_000 * MS, u32::MAX), 10_000 * MS);
        let mut b = Backoff::new(500 * MS, 30_000 * MS);
        let waits: Vec<_> = (0..10).map(|_| b.next_bound()).collect();
        assert_eq!(waits[..4], [500 * MS, 1_000 * MS, 2_000 * MS, 4_000 * MS]);
        assert_eq!(waits[9], 30_000 * MS);
        b.reset();
        assert_eq!(b.next_bound(), 500 * MS);
    }

    /// Full jitter: waits fill the whole window from zero to the bound, not a band near it.
    #[test]
    fn jittered_waits_spread_over_the_whole_window() {
        let mut b = Backoff::new(1_000 * MS, 1_000 * MS);
        let waits: Vec<Duration> = (0..2_000).map(|_| b.next_jittered()).collect();
        assert!(waits.iter().all(|w| *w <= 1_000 * MS));
        // Each tenth of the window gets some (2,000 draws: about 200 each).
        for tenth in 0..10u32 {
            let (low, high) = (tenth * 100 * MS, (tenth + 1) * 100 * MS);
            let n = waits.iter().filter(|w| **w >= low && **w < high).count();
            assert!(n >= 100, "{n} waits between {low:?} and {high:?}");
        }
        let mut growing = Backoff::new(100 * MS, 2_000 * MS);
        let waits: Vec<_> = (0..12).map(|_| growing.next_jittered()).collect();
        assert!(waits[0] <= 100 * MS);
        assert!(waits.iter().all(|w| *w <= 2_000 * MS));
    }
}
