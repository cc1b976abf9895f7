//! The arithmetic of `simulate`, in integers: money in pico-dollars,
//! traffic in tokens per day.
//!
//! The day's shape is what the profile gives: a mean and the busiest
//! hour's ratio to it. Between them, the hours of the day sorted by load
//! are taken to rise in a straight line from the quietest to the busiest
//! (a linear load-duration curve): from `2 × mean − peak` to `peak` when
//! the peak is at most twice the mean, else from nothing, with traffic in
//! only `2 × mean / peak` of the day. What a pool of a given capacity
//! cannot take is the area of that line above the capacity.

use super::profile::MILLI;

/// Pico-dollars in one micro-dollar.
pub const PICO_PER_MICRO: u128 = 1_000_000;
/// Pico-dollars in one cent.
const PICO_PER_CENT: u128 = 10_000_000_000;
const SECONDS_PER_DAY: f64 = 86_400.0;

/// `a / b` rounded half up; `b` is not zero.
pub fn div_round(a: u128, b: u128) -> u128 {
    (a + b / 2) / b
}

/// Pico-dollars over `days` as whole cents a day, rounded half up once.
pub fn daily_cents(period_pico: u128, days: u32) -> u128 {
    div_round(period_pico, PICO_PER_CENT * u128::from(days))
}

pub fn cents(pico: u128) -> u128 {
    div_round(pico, PICO_PER_CENT)
}

/// Pico-dollars per million tokens over a period, as micro-dollars per
/// million tokens (USD to six places); `None` without tokens.
pub fn micro_usd_per_mtok(period_pico: u128, period_tokens: u128) -> Option<u128> {
    (period_tokens > 0).then(|| div_round(period_pico, period_tokens))
}

/// Tokens a day of traffic with `mean` tokens a day, peaked as
/// `peak_to_mean_milli`, puts above a capacity of `capacity` tokens a day
/// (rounded down: whole tokens).
pub fn spilled(mean: u128, peak_to_mean_milli: u64, capacity: u128) -> u128 {
    // In thousandths of a token a day, so the peak is an integer.
    let m = mean * u128::from(MILLI);
    let p = mean * u128::from(peak_to_mean_milli);
    let c = capacity.saturating_mul(u128::from(MILLI));
    if c >= p {
        return 0;
    }
    let over = if peak_to_mean_milli <= 2 * MILLI {
        let low = 2 * m - p;
        if c <= low {
            m - c
        } else {
            // A triangle: (p − c)² / (2 (p − low)), over the whole day.
            (p - c) * (p - c) / (2 * (p - low))
        }
    } else {
        // Traffic in 2m/p of the day, rising from nothing to p: the
        // triangle above c is m × ((p − c) / p)².
        let share = (p - c) * (p - c) / p;
        m * share / p
    };
    over / u128::from(MILLI)
}

/// A self-hosted pool as simulate prices it.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub gpus: u32,
    /// Micro-dollars per GPU-hour.
    pub gpu_hour_micro_usd: u128,
    /// Tokens a second the whole pool processes flat out.
    pub throughput: f64,
}

impl Pool {
    /// What `gpus` GPUs of this pool cost a day.
    pub fn day_pico(&self, gpus: u32) -> u128 {
        self.gpu_hour_micro_usd * PICO_PER_MICRO * 24 * u128::from(gpus)
    }

    /// Tokens a day `gpus` GPUs process at `utilisation` of flat out.
    pub fn capacity(&self, gpus: u32, utilisation: f64) -> u128 {
        let per_gpu = self.throughput / f64::from(self.gpus);
        (per_gpu * f64::from(gpus) * utilisation * SECONDS_PER_DAY).floor() as u128
    }

    /// Thousandths of a token a day one GPU processes at `utilisation`
    /// of flat out.
    fn per_gpu_milli(&self, utilisation: f64) -> u128 {
        (self.throughput / f64::from(self.gpus) * utilisation * SECONDS_PER_DAY * MILLI as f64)
            .floor() as u128
    }

    /// The GPUs that serve a busiest hour of `peak` tokens a day (in
    /// thousandths, as `spilled` has it) within `max_utilisation`.
    pub fn gpus_needed(&self, peak_milli: u128, max_utilisation: f64) -> u64 {
        let per_gpu = self.per_gpu_milli(max_utilisation).max(1);
        u64::try_from(peak_milli.div_ceil(per_gpu)).unwrap_or(u64::MAX)
    }
}

/// The busiest hour of `mean` tokens a day, in thousandths of a token a
/// day.
pub fn peak_milli(mean: u128, peak_to_mean_milli: u64) -> u128 {
    mean * u128::from(peak_to_mean_milli)
}

/// Sizing a self-hosted pool for a load: GPUs never below those
/// configured (they are paid for), more when the peak needs them.
pub struct Sizing {
    pub pool: Pool,
    /// Fixed costs of the backend over the month, pico-dollars.
    pub fixed_pico: u128,
    pub days: u32,
    pub max_utilisation: f64,
    pub tokens_per_request: u64,
    pub peak_to_mean_milli: u64,
}

/// The most GPUs a break-even search sizes a pool to (the config's own
/// bound on `gpus`).
const MAX_GPUS: u64 = 100_000;

impl Sizing {
    /// The GPUs that serve `requests` a day.
    pub fn gpus_for(&self, requests: u64) -> u64 {
        let mean = u128::from(requests) * u128::from(self.tokens_per_request);
        self.pool.gpus_needed(
            peak_milli(mean, self.peak_to_mean_milli),
            self.max_utilisation,
        )
    }

    /// The month's cost of `gpus` GPUs and the fixed costs.
    pub fn month_pico(&self, gpus: u64) -> u128 {
        let gpus = u32::try_from(gpus).unwrap_or(u32::MAX);
        self.pool.day_pico(gpus) * u128::from(self.days) + self.fixed_pico
    }

    /// The most requests a day `gpus` GPUs serve within
    /// `max_utilisation` at the busiest hour.
    fn requests_served(&self, gpus: u64) -> u128 {
        let per_gpu_milli = self.pool.per_gpu_milli(self.max_utilisation);
        let per_request_peak =
            u128::from(self.tokens_per_request) * u128::from(self.peak_to_mean_milli);
        if per_request_peak == 0 {
            return u128::MAX;
        }
        per_gpu_milli * u128::from(gpus) / per_request_peak
    }

    /// The fewest requests a day at which this pool, sized to serve them
    /// (never below its configured GPUs), costs less over the month than
    /// `request_pico` a request: `None` when it never does.
    pub fn break_even(&self, request_pico: u128) -> Option<u64> {
        if request_pico == 0 {
            return None;
        }
        let period_request = request_pico * u128::from(self.days);
        let mut gpus = u64::from(self.pool.gpus);
        while gpus <= MAX_GPUS {
            // At this size the pool costs the same for every load it
            // serves: cheaper from the first load whose tokens cost more.
            let first = self.month_pico(gpus) / period_request + 1;
            if first <= self.requests_served(gpus) {
                return u64::try_from(first).ok();
            }
            gpus += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_spills_below_the_peak_and_everything_above_capacity_does() {
        // 2,400 tokens a day, flat: 100 an hour.
        assert_eq!(spilled(2_400, 1_000, 2_400), 0);
        assert_eq!(spilled(2_400, 1_000, 2_000), 400);
        assert_eq!(spilled(2_400, 1_000, 0), 2_400);
        assert_eq!(spilled(0, 2_500, 0), 0);
    }

    #[test]
    fn a_peaked_day_spills_the_triangle_above_capacity() {
        // Mean 2,400 a day, peak 1.5×: from 1,200 to 3,600 a day-rate.
        // Capacity 3,000: (3,600 − 3,000)² / (2 × 2,400) = 75.
        assert_eq!(spilled(2_400, 1_500, 3_000), 75);
        // Capacity below the quietest hour: all above it, 2,400 − 1,000.
        assert_eq!(spilled(2_400, 1_500, 1_000), 1_400);
        // Peak 4×: traffic in half the day rising to 9,600; capacity
        // 4,800 leaves 2,400 × (4,800 / 9,600)² = 600.
        assert_eq!(spilled(2_400, 4_000, 4_800), 600);
    }

    #[test]
    fn break_even_is_where_the_pool_first_costs_less_than_the_tokens() {
        // One GPU at $1 an hour ($24 a day) serving 1,000 tokens a second;
        // requests of 1,000 tokens at a flat day; tokens at 1 cent a
        // request.
        let sizing = Sizing {
            pool: Pool {
                gpus: 1,
                gpu_hour_micro_usd: 1_000_000,
                throughput: 1_000.0,
            },
            fixed_pico: 0,
            days: 30,
            max_utilisation: 1.0,
            tokens_per_request: 1_000,
            peak_to_mean_milli: 1_000,
        };
        // $24 a day is 2,400 requests; the 2,401st makes the pool cheaper.
        assert_eq!(sizing.break_even(10_000_000_000), Some(2_401));
        // Tokens far cheaper than GPU time: never.
        assert_eq!(sizing.break_even(1), None);
    }
}
