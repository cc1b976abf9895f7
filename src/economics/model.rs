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
#[derive(Debug)]
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

    /// Where this pool, sized to serve each load (never below its
    /// configured GPUs), costs less over the month than `request_pico` a
    /// request. The pool's cost rises a GPU at a time while the tokens'
    /// rises with every request, so the pool can be cheaper for a range of
    /// loads and dearer again once it needs its next GPU.
    pub fn break_even(&self, request_pico: u128) -> BreakEven {
        let mut found = BreakEven::default();
        if request_pico == 0 {
            return found;
        }
        let period_request = request_pico * u128::from(self.days);
        // Each GPU more serves at least `step` requests more, so once a
        // size is cheaper for all it serves and `step` requests pay for a
        // GPU's month, every larger size is too.
        let step = self.requests_served(1);
        let pays_for_a_gpu =
            step.saturating_mul(period_request) >= self.pool.day_pico(1) * u128::from(self.days);
        // The cheaper run that reaches the end of the sizes seen so far.
        let mut from: Option<u128> = None;
        let mut lo = 1u128;
        for gpus in u64::from(self.pool.gpus)..=MAX_GPUS {
            // The loads this size serves: from `lo` to `hi`.
            let hi = self.requests_served(gpus);
            if hi < lo {
                continue;
            }
            let first = (self.month_pico(gpus) / period_request + 1).max(lo);
            if first > lo {
                // Dearer at `lo`: a cheaper run before it ended at `lo - 1`.
                if let Some(start) = from.take() {
                    found.earlier.get_or_insert((clamp(start), clamp(lo - 1)));
                }
                from = (first <= hi).then_some(first);
            } else {
                from.get_or_insert(lo);
                if pays_for_a_gpu {
                    break;
                }
            }
            if hi == u128::MAX {
                break;
            }
            lo = hi + 1;
        }
        found.from = from.map(clamp);
        found
    }
}

/// Where a self-hosted pool costs less than a per-token deployment, in
/// requests a day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakEven {
    /// The fewest requests a day from which the pool costs less at every
    /// larger load (up to [`MAX_GPUS`]); `None` when no such load.
    pub from: Option<u64>,
    /// The first range of loads below `from` (or with none) where it costs
    /// less, and more again once it needs another GPU.
    pub earlier: Option<(u64, u64)>,
}

fn clamp(requests: u128) -> u64 {
    u64::try_from(requests).unwrap_or(u64::MAX)
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
        assert_eq!(
            sizing.break_even(10_000_000_000),
            BreakEven {
                from: Some(2_401),
                earlier: None
            }
        );
        // Tokens far cheaper than GPU time: never.
        assert_eq!(sizing.break_even(1), BreakEven::default());
    }

    /// One GPU at $1 an hour serving 86.4 requests a day (1 token a
    /// second, requests of 1,000 tokens, a flat day), with `fixed` dollars
    /// a month.
    fn small_pool(gpus: u32, fixed: u128) -> Sizing {
        Sizing {
            pool: Pool {
                gpus,
                gpu_hour_micro_usd: 1_000_000,
                throughput: f64::from(gpus),
            },
            fixed_pico: fixed * 1_000_000 * PICO_PER_MICRO,
            days: 30,
            max_utilisation: 1.0,
            tokens_per_request: 1_000,
            peak_to_mean_milli: 1_000,
        }
    }

    #[test]
    fn a_pool_cheaper_only_until_its_next_gpu_says_so() {
        // $720 a month a GPU, $200 fixed, 86 requests a day a GPU; 35
        // cents a request, $10.50 a month a request-a-day. One GPU ($920)
        // would be cheaper from 88 requests a day but serves 86. Two
        // ($1,640) are cheaper from 157 to the 172 they serve; three
        // ($2,360) dearer again at 173. Each GPU more serves $903 of
        // requests for $720, so the gap closes: cheaper from 362 (of five
        // GPUs' 346–430) on.
        let sizing = small_pool(1, 200);
        assert_eq!(
            sizing.break_even(350_000_000_000),
            BreakEven {
                from: Some(362),
                earlier: Some((157, 172))
            }
        );
        // At 20 cents a request ($6 a month), GPUs never pay for
        // themselves: four ($2,880) would be cheaper from 481 requests a
        // day, and serve 345.
        assert_eq!(
            small_pool(4, 0).break_even(200_000_000_000),
            BreakEven::default()
        );
    }

    /// Where each load is cheaper, load by load: the pool sized for it
    /// against its requests' tokens.
    fn cheaper_by_load(sizing: &Sizing, request_pico: u128, loads: u64) -> Vec<bool> {
        let period_request = request_pico * u128::from(sizing.days);
        (0..=loads)
            .map(|load| {
                let gpus = sizing.gpus_for(load).max(u64::from(sizing.pool.gpus));
                load > 0 && u128::from(load) * period_request > sizing.month_pico(gpus)
            })
            .collect()
    }

    #[test]
    fn break_even_is_what_pricing_every_load_finds() {
        let mut rng = fastrand::Rng::with_seed(23);
        // How many of each shape: never, a run of loads, a run after an
        // earlier one.
        let mut shapes = [0; 3];
        for _ in 0..300 {
            let gpus = rng.u32(1..5);
            let sizing = Sizing {
                pool: Pool {
                    gpus,
                    gpu_hour_micro_usd: u128::from(rng.u32(100_000..3_000_000)),
                    // 20 to 300 requests a day a GPU.
                    throughput: f64::from(gpus) * f64::from(rng.u32(230..3_500)) / 1_000.0,
                },
                fixed_pico: u128::from(rng.u32(0..2_000)) * 1_000_000 * PICO_PER_MICRO,
                days: 30,
                max_utilisation: f64::from(rng.u32(50..=100)) / 100.0,
                tokens_per_request: 1_000,
                peak_to_mean_milli: u64::from(rng.u32(1_000..3_000)),
            };
            // About what a GPU's requests cost it, from half to twice.
            let gpu_day = sizing.pool.day_pico(1);
            let per_gpu = sizing.requests_served(1).max(1);
            let request_pico = gpu_day / per_gpu * u128::from(rng.u32(50..200)) / 100;
            let found = sizing.break_even(request_pico);
            // Past what it found by a few GPUs' loads, or 200 GPUs'.
            let found_up_to = found.from.max(found.earlier.map(|(_, hi)| hi)).unwrap_or(0);
            let loads = (found_up_to + 5 * per_gpu as u64).max(200 * per_gpu as u64);
            let cheaper = cheaper_by_load(&sizing, request_pico, loads);
            let runs = runs(&cheaper);
            let last = runs.last().copied();
            // A run that reaches the end of the loads priced is `from`;
            // any before it, the first is `earlier`.
            let (expect_from, before) = match last {
                Some((start, end)) if end == loads => (Some(start), &runs[..runs.len() - 1]),
                _ => (None, &runs[..]),
            };
            let context = format!("{sizing:?} at {request_pico}: {found:?}, runs {runs:?}");
            assert_eq!(found.from, expect_from, "{context}");
            assert_eq!(found.earlier, before.first().copied(), "{context}");
            shapes[usize::from(found.from.is_some()) + usize::from(found.earlier.is_some())] += 1;
        }
        assert!(shapes.iter().all(|&n| n > 20), "{shapes:?}");
    }

    /// The runs of `true`, as first and last index.
    fn runs(cheaper: &[bool]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start = None;
        for (load, &c) in cheaper.iter().enumerate() {
            match (c, start) {
                (true, None) => start = Some(load as u64),
                (false, Some(s)) => {
                    runs.push((s, load as u64 - 1));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, cheaper.len() as u64 - 1));
        }
        runs
    }
}
