//! A deployment's recent times to a first byte, kept to read a quantile
//! of them: when hedging waits for "the slowest 5%", it needs the
//! distribution, not the moving average routing ranks by.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Samples kept per kind of request: enough for a 0.99 quantile to rest
/// on more than one sample, few enough that a change of regime shows
/// within a minute of ordinary traffic.
const WINDOW: usize = 256;

/// Below this many samples a quantile is not read: 20 is the least for
/// 0.95 to lie between two of them.
const MIN_SAMPLES: usize = 20;

/// Times to a first stream chunk and to whole answers, apart: the two are
/// orders of magnitude apart.
#[derive(Default)]
pub struct FirstBytes([Mutex<Window>; 2]);

struct Window {
    /// Microseconds, saturating at about 71 minutes.
    samples: Box<[u32; WINDOW]>,
    len: usize,
    next: usize,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            samples: Box::new([0; WINDOW]),
            len: 0,
            next: 0,
        }
    }
}

impl FirstBytes {
    fn window(&self, stream: bool) -> std::sync::MutexGuard<'_, Window> {
        self.0[usize::from(stream)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A first byte came after `elapsed`; for an attempt cancelled before
    /// its first byte, `elapsed` is a lower bound, kept so the slow tail
    /// that hedging cuts short still counts.
    pub fn record(&self, stream: bool, elapsed: Duration) {
        let micros = u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX);
        let mut w = self.window(stream);
        let at = w.next;
        w.samples[at] = micros;
        w.next = (at + 1) % WINDOW;
        w.len = (w.len + 1).min(WINDOW);
    }

    /// The `q` quantile of the recent samples (nearest rank); `None` until
    /// there are enough of them.
    pub fn quantile(&self, stream: bool, q: f64) -> Option<Duration> {
        let mut recent = [0u32; WINDOW];
        let len = {
            let w = self.window(stream);
            recent[..w.len].copy_from_slice(&w.samples[..w.len]);
            w.len
        };
        if len < MIN_SAMPLES {
            return None;
        }
        let rank = ((q * len as f64).ceil() as usize).clamp(1, len) - 1;
        let (_, value, _) = recent[..len].select_nth_unstable(rank);
        Some(Duration::from_micros(u64::from(*value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_needs_enough_samples_and_reads_the_nearest_rank() {
        let times = FirstBytes::default();
        for ms in 1..MIN_SAMPLES as u64 {
            times.record(true, Duration::from_millis(ms));
        }
        assert_eq!(times.quantile(true, 0.95), None);
        times.record(true, Duration::from_millis(20));
        // 20 samples, 1..=20 ms: the 0.95 quantile is the 19th.
        assert_eq!(times.quantile(true, 0.95), Some(Duration::from_millis(19)));
        assert_eq!(times.quantile(true, 0.5), Some(Duration::from_millis(10)));
        assert_eq!(times.quantile(false, 0.5), None, "whole answers apart");
    }

    #[test]
    fn the_window_keeps_the_latest_samples() {
        let times = FirstBytes::default();
        for _ in 0..WINDOW {
            times.record(false, Duration::from_millis(900));
        }
        for _ in 0..WINDOW {
            times.record(false, Duration::from_millis(100));
        }
        assert_eq!(
            times.quantile(false, 0.99),
            Some(Duration::from_millis(100))
        );
    }
}
