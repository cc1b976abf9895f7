//! One per-minute limit as a generic cell rate algorithm (GCRA): the
//! bucket is a single timestamp, the moment it is full again (the
//! theoretical arrival time, TAT), moved with one compare-and-swap.
//!
//! `governor` implements the same algorithm, but its state cannot pass
//! "empty": what a request used beyond its admission could not be charged,
//! so a key could take many times its tpm in long answers. Here usage
//! charged after the fact pushes the TAT past the bucket's depth — debt —
//! and later requests wait until it is paid off; an overrated estimate is
//! given back. The clock is passed in, so tests run on a clock of their own.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MINUTE_NANOS: u128 = 60_000_000_000;

pub struct Gcra {
    per_minute: NonZeroU32,
    /// Times are nanoseconds since `origin`.
    origin: Instant,
    /// When the bucket is full again; at or before now, it is full.
    full_at: AtomicU64,
}

impl Gcra {
    pub fn new(per_minute: NonZeroU32, now: Instant) -> Self {
        Self {
            per_minute,
            origin: now,
            full_at: AtomicU64::new(0),
        }
    }

    pub fn per_minute(&self) -> NonZeroU32 {
        self.per_minute
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long `cells` take to drain back: a minute per `per_minute`.
    fn span(&self, cells: u64) -> u64 {
        u64::try_from(u128::from(cells) * MINUTE_NANOS / u128::from(self.per_minute.get()))
            .unwrap_or(u64::MAX)
    }

    /// When `cells` more would fit, if not now: `Err(None)` when they
    /// never can (more than a whole minute's quota).
    fn wait(&self, full_at: u64, cells: u64, now: u64) -> Result<(), Option<Duration>> {
        if cells > u64::from(self.per_minute.get()) {
            return Err(None);
        }
        // Admitted while the bucket, with these cells in it, holds at
        // most a minute's worth.
        let after = full_at.max(now).saturating_add(self.span(cells));
        let fits_at = after.saturating_sub(MINUTE_NANOS as u64);
        if fits_at <= now {
            Ok(())
        } else {
            Err(Some(Duration::from_nanos(fits_at - now)))
        }
    }

    /// How long until the bucket is full again at `now`: nothing taken
    /// from it, debt paid off.
    pub fn full_in(&self, now: Instant) -> Duration {
        let now = self.nanos(now);
        Duration::from_nanos(self.full_at.load(Ordering::Acquire).saturating_sub(now))
    }

    /// Whether `cells` would be admitted at `now`, without taking them.
    pub fn check(&self, cells: u64, now: Instant) -> Result<(), Option<Duration>> {
        let now = self.nanos(now);
        self.wait(self.full_at.load(Ordering::Acquire), cells, now)
    }

    /// Takes `cells` if they fit, else says when they would.
    pub fn take(&self, cells: u64, now: Instant) -> Result<(), Option<Duration>> {
        let now = self.nanos(now);
        let span = self.span(cells);
        self.update(|full_at| {
            self.wait(full_at, cells, now)?;
            Ok(full_at.max(now).saturating_add(span))
        })
    }

    /// Charges `cells` that were used whether or not they fit: past
    /// empty, the bucket owes them, and nothing fits until they are paid.
    pub fn charge(&self, cells: u64, now: Instant) {
        let now = self.nanos(now);
        let span = self.span(cells);
        let _ = self.update::<()>(|full_at| Ok(full_at.max(now).saturating_add(span)));
    }

    /// Gives back `cells` taken for a use that turned out smaller; the
    /// bucket never holds more than full.
    pub fn refund(&self, cells: u64, now: Instant) {
        let now = self.nanos(now);
        let span = self.span(cells);
        let _ = self.update::<()>(|full_at| Ok(full_at.saturating_sub(span).max(now)));
    }

    fn update<E>(&self, next: impl Fn(u64) -> Result<u64, E>) -> Result<(), E> {
        let mut current = self.full_at.load(Ordering::Acquire);
        loop {
            let new = next(current)?;
            match self.full_at.compare_exchange_weak(
                current,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The cells a limit of `per_minute` admits at once when it is full again
/// in `full_in`: what it has left.
pub fn room(per_minute: u32, full_in: Duration) -> u64 {
    let free = MINUTE_NANOS.saturating_sub(full_in.as_nanos());
    u64::try_from(free * u128::from(per_minute) / MINUTE_NANOS).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn gcra(per_minute: u32) -> (Gcra, Instant) {
        let t0 = Instant::now();
        (Gcra::new(NonZeroU32::new(per_minute).unwrap(), t0), t0)
    }

    #[test]
    fn a_full_bucket_admits_a_minutes_worth_then_refills_at_the_rate() {
        let (limit, t0) = gcra(60);
        assert_eq!(limit.take(60, t0), Ok(()));
        assert_eq!(limit.take(1, t0), Err(Some(SECOND)));
        assert_eq!(limit.check(1, t0 + SECOND), Ok(()));
        assert_eq!(limit.take(2, t0 + SECOND), Err(Some(SECOND)));
        assert_eq!(limit.take(61, t0 + 100 * SECOND), Err(None), "never fits");
    }

    #[test]
    fn what_is_left_is_what_fits_at_once() {
        let (limit, t0) = gcra(60);
        assert_eq!(room(60, limit.full_in(t0)), 60);
        limit.take(45, t0).unwrap();
        let full_in = limit.full_in(t0);
        assert_eq!(full_in, 45 * SECOND);
        assert_eq!(room(60, full_in), 15);
        assert_eq!(limit.take(16, t0), Err(Some(SECOND)));
        assert_eq!(limit.take(15, t0), Ok(()));
        assert_eq!(room(60, limit.full_in(t0)), 0);
        assert_eq!(room(60, limit.full_in(t0 + SECOND + SECOND / 2)), 1);
        limit.charge(600, t0);
        assert_eq!(limit.full_in(t0), 660 * SECOND, "debt");
        assert_eq!(room(60, limit.full_in(t0)), 0);
    }

    #[test]
    fn usage_charged_past_empty_is_debt_that_later_requests_wait_out() {
        let (limit, t0) = gcra(300);
        limit.take(10, t0).unwrap();
        // The answer was 3,000 tokens: ten minutes of quota, less what the
        // bucket held.
        limit.charge(3_000, t0);
        let wait = limit.take(10, t0).unwrap_err().unwrap();
        assert_eq!(wait, Duration::from_millis(604_000 - 60_000));
        assert!(limit.take(10, t0 + wait - SECOND).is_err());
        assert_eq!(limit.take(10, t0 + wait), Ok(()));
    }

    #[test]
    fn refunds_return_overrated_estimates_but_never_overfill() {
        let (limit, t0) = gcra(60);
        limit.take(60, t0).unwrap();
        limit.refund(30, t0);
        assert_eq!(limit.take(30, t0), Ok(()));
        assert!(limit.take(1, t0).is_err());
        limit.refund(1_000, t0);
        assert_eq!(limit.take(60, t0), Ok(()));
        assert!(limit.take(1, t0).is_err(), "a refund fills it, no more");
    }

    #[test]
    fn a_clock_before_the_limit_was_made_counts_as_its_start() {
        let (limit, t0) = gcra(60);
        let earlier = t0.checked_sub(SECOND).unwrap_or(t0);
        assert_eq!(limit.take(60, earlier), Ok(()));
        assert!(limit.take(1, t0).is_err());
    }
}
