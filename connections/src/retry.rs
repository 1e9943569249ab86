//! Athanor's one retry policy: how long every component waits before trying again
//! something that failed (publishing a batch, reopening a consumer or a watch, writing
//! a transaction, reconnecting to NATS).
//!
//! A [`Backoff`] is exponential: the wait before retry `n` (counting from 0) is at most
//! `base · 2ⁿ`, and never more than `cap`. Each wait is drawn uniformly from the upper
//! half of that ceiling, `[ceiling / 2, ceiling]` ("equal jitter"): the floor keeps a
//! failing loop from spinning, the spread keeps the processes that all lost NATS at the
//! same instant (a server restart) from all coming back at the same instant, and again
//! at every retry after that. Jitter only ever shortens a wait, so no retry comes later
//! than it would without it.
//!
//! The named policies below are every retry loop's base and cap, in one place; a loop
//! keeps its own failure count in a [`Retries`], and decides for itself what to log and
//! whether shutdown ends the wait.

use std::time::Duration;

/// Exponential backoff from `base` to `cap` with equal jitter (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// A worker publishing a batch: 50 ms, doubling up to 2 s. The publisher never
    /// gives up (the run's output would be lost); the cap bounds how long a run's
    /// output lags once NATS is back.
    pub const PUBLISH: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    /// The aggregator writing a transaction while the database is unavailable: 100 ms,
    /// doubling up to `aggregator.max_retry_delay` (set with [`Backoff::with_cap`]).
    pub const STORE: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    /// Opening again a consumer or a watch that could not be opened (request queues,
    /// cancel keys, the aggregator's consumer, a run's live feed): about a second each
    /// time. It is not stretched further: the NATS client already backs off its own
    /// reconnects, and a reopen only waits for those to succeed.
    pub const REOPEN: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
    /// Pulling again from a consumer after a failed fetch: about half a second.
    pub const FETCH: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_millis(500));
    /// The NATS client reconnecting to a server: 100 ms, doubling up to 1 s.
    pub const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

    /// Waits from `base`, doubling per retry, capped at `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The same policy with another cap (a configured one).
    pub const fn with_cap(self, cap: Duration) -> Backoff {
        Backoff { cap, ..self }
    }

    pub const fn base(&self) -> Duration {
        self.base
    }

    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The longest wait before retry `retry` (0 for the first): `base · 2^retry`,
    /// capped.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.cap)
    }

    /// The wait before retry `retry` (0 for the first): drawn uniformly from
    /// `[ceiling / 2, ceiling]`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        half.saturating_add((ceiling - half).mul_f64(fastrand::f64()))
            .min(ceiling)
    }

    /// A fresh count of failures under this policy.
    pub const fn retries(self) -> Retries {
        Retries {
            policy: self,
            failed: 0,
        }
    }
}

/// One retry loop's failures so far, under a [`Backoff`].
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    failed: u32,
}

impl Retries {
    /// Counts a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.failed);
        self.failed = self.failed.saturating_add(1);
        delay
    }

    /// After a success: the next failure waits from the base again.
    pub fn reset(&mut self) {
        self.failed = 0;
    }

    /// Failures counted since the last success.
    pub fn failed(&self) -> u32 {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_the_base_up_to_the_cap() {
        let ceilings: Vec<Duration> = (0..9).map(|n| Backoff::PUBLISH.ceiling(n)).collect();
        let expected: Vec<Duration> = [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000]
            .iter()
            .map(|&ms| ms * MS)
            .collect();
        assert_eq!(ceilings, expected);
        let reconnect: Vec<Duration> = (0..6).map(|n| Backoff::RECONNECT.ceiling(n)).collect();
        let expected: Vec<Duration> = [100, 200, 400, 800, 1000, 1000]
            .iter()
            .map(|&ms| ms * MS)
            .collect();
        assert_eq!(reconnect, expected);
    }

    #[test]
    fn a_base_equal_to_the_cap_is_a_steady_pace() {
        for n in [0, 1, 5, 1000] {
            assert_eq!(Backoff::REOPEN.ceiling(n), Duration::from_secs(1));
            assert_eq!(Backoff::FETCH.ceiling(n), 500 * MS);
        }
    }

    #[test]
    fn a_configured_cap_replaces_the_default_one() {
        let store = Backoff::STORE.with_cap(500 * MS);
        assert_eq!(store.base(), 100 * MS);
        assert_eq!(store.cap(), 500 * MS);
        assert_eq!(
            (0..5).map(|n| store.ceiling(n)).collect::<Vec<_>>(),
            vec![100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]
        );
    }

    #[test]
    fn many_retries_do_not_overflow() {
        // The doubling stops at 2³¹ (well past any cap).
        let policy = Backoff::new(Duration::from_secs(3600), Duration::MAX);
        assert_eq!(
            policy.ceiling(u32::MAX),
            Duration::from_secs(3600 * (1 << 31))
        );
        assert_eq!(policy.ceiling(u32::MAX), policy.ceiling(31));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.ceiling(1), Duration::MAX);
        assert!(huge.delay(1) >= Duration::MAX / 2);
        assert_eq!(
            Backoff::PUBLISH.ceiling(u32::MAX),
            2 * Duration::from_secs(1)
        );
        let mut retries = Backoff::PUBLISH.retries();
        retries.failed = u32::MAX;
        assert!(retries.next_delay() <= Duration::from_secs(2));
        assert_eq!(retries.failed(), u32::MAX);
    }

    #[test]
    fn delays_stay_within_the_upper_half_of_the_ceiling() {
        for policy in [
            Backoff::PUBLISH,
            Backoff::STORE,
            Backoff::REOPEN,
            Backoff::FETCH,
            Backoff::RECONNECT,
        ] {
            for n in 0..12 {
                let ceiling = policy.ceiling(n);
                for _ in 0..200 {
                    let delay = policy.delay(n);
                    assert!(
                        delay >= ceiling / 2 && delay <= ceiling,
                        "{policy:?} retry {n}: {delay:?} outside [{:?}, {ceiling:?}]",
                        ceiling / 2
                    );
                }
            }
        }
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        // 1 000 processes that lost NATS at the same instant: their first retries are
        // spread over [500 ms, 1 s], not bunched together.
        let mut delays: Vec<Duration> = (0..1000).map(|_| Backoff::REOPEN.delay(0)).collect();
        delays.sort();
        let distinct = delays.windows(2).filter(|w| w[0] != w[1]).count() + 1;
        assert!(distinct > 900, "only {distinct} distinct delays");
        assert!(delays[0] < 550 * MS, "shortest {:?}", delays[0]);
        assert!(delays[999] > 950 * MS, "longest {:?}", delays[999]);
        // Each tenth of the range holds some of them (uniform, not clustered).
        for tenth in 0..10 {
            let low = 500 * MS + 50 * MS * tenth;
            let high = low + 50 * MS;
            let n = delays.iter().filter(|d| **d >= low && **d < high).count();
            assert!(n >= 40, "{n} delays in [{low:?}, {high:?})");
        }
    }

    #[test]
    fn retries_grow_until_a_success_resets_them() {
        let mut retries = Backoff::PUBLISH.retries();
        let first: Vec<Duration> = (0..8).map(|_| retries.next_delay()).collect();
        assert_eq!(retries.failed(), 8);
        for (n, delay) in first.iter().enumerate() {
            let ceiling = Backoff::PUBLISH.ceiling(n as u32);
            assert!(*delay >= ceiling / 2 && *delay <= ceiling, "{n}: {delay:?}");
        }
        // Growth: every wait from the third on is longer than any of the first two.
        assert!(first[2..].iter().all(|d| *d >= first[0].max(first[1])));
        assert!(first[6] >= Duration::from_secs(1) && first[7] >= Duration::from_secs(1));
        retries.reset();
        assert_eq!(retries.failed(), 0);
        assert!(retries.next_delay() <= 50 * MS);
    }
}
