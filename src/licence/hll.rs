//! A HyperLogLog sketch of distinct end users: 2^14 registers, a standard
//! error of 1.04 / √16384 ≈ 0.81%.
//!
//! Registers of our own rather than a crate's: a request adds its user
//! with one relaxed load and, rarely, one `fetch_max` on an `AtomicU8`,
//! with no lock and no allocation, from any number of threads at once; and
//! the registers are plain bytes that merge by maximum across replicas
//! and restarts (the ledger, Redis). The hash is XXH3 with a fixed seed,
//! so the same user lands in the same register in every process.

use std::sync::atomic::{AtomicU8, Ordering};

/// Index bits: 2^14 registers.
pub const PRECISION: u32 = 14;
pub const REGISTERS: usize = 1 << PRECISION;

/// Fixed, so sketches from every replica and every run merge.
const SEED: u64 = 0x746f_6c6c_6761_7465;

/// The hash of an end user's id, taken once per request.
pub fn hash(user: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(user, SEED)
}

pub struct Sketch {
    registers: Box<[AtomicU8; REGISTERS]>,
}

impl Default for Sketch {
    fn default() -> Self {
        Self {
            registers: Box::new([const { AtomicU8::new(0) }; REGISTERS]),
        }
    }
}

impl Sketch {
    /// Adds a user by its [`hash`]: the top bits pick a register, which
    /// keeps the longest run of leading zeros seen in the rest (plus one).
    pub fn add(&self, hash: u64) {
        let index = (hash >> (64 - PRECISION)) as usize;
        // The sentinel bit bounds the rank at 64 − 14 + 1 = 51.
        let rest = (hash << PRECISION) | (1 << (PRECISION - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        let register = &self.registers[index];
        // Most users were seen before: a load, and no write.
        if register.load(Ordering::Relaxed) < rank {
            register.fetch_max(rank, Ordering::Relaxed);
        }
    }

    /// Takes in another sketch's registers (register by register, the
    /// larger); a slice of another length is ignored.
    pub fn merge(&self, registers: &[u8]) {
        if registers.len() != REGISTERS {
            return;
        }
        for (mine, theirs) in self.registers.iter().zip(registers) {
            if mine.load(Ordering::Relaxed) < *theirs {
                mine.fetch_max(*theirs, Ordering::Relaxed);
            }
        }
    }

    pub fn registers(&self) -> Vec<u8> {
        self.registers
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect()
    }

    pub fn estimate(&self) -> u64 {
        estimate(&self.registers())
    }
}

/// The distinct users `registers` saw: the HyperLogLog estimate, with
/// linear counting where it is the better one (few users).
pub fn estimate(registers: &[u8]) -> u64 {
    if registers.len() != REGISTERS {
        return 0;
    }
    let m = REGISTERS as f64;
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let (sum, zeros) = registers.iter().fold((0.0, 0u32), |(sum, zeros), &r| {
        (sum + 2f64.powi(-i32::from(r)), zeros + u32::from(r == 0))
    });
    let raw = alpha * m * m / sum;
    let estimate = if raw <= 2.5 * m && zeros > 0 {
        m * (m / f64::from(zeros)).ln()
    } else {
        raw
    };
    estimate.round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error of the sketch of `users` distinct ids of `set`.
    fn error(set: &str, users: u64) -> f64 {
        let sketch = Sketch::default();
        for i in 0..users {
            sketch.add(hash(format!("{set}-user-{i}").as_bytes()));
        }
        // Seen again: no change.
        for i in 0..users.min(1_000) {
            sketch.add(hash(format!("{set}-user-{i}").as_bytes()));
        }
        let estimate = sketch.estimate();
        let error = (estimate as f64 - users as f64) / users as f64;
        println!(
            "{set}: {users} users, estimate {estimate}, error {:+.3}%",
            error * 100.0
        );
        error
    }

    #[test]
    fn a_million_users_are_counted_with_a_standard_error_under_one_percent() {
        // Eight sets of a million: each within four standard errors
        // (3.2%), and their root mean square error, the standard error
        // measured, under 1%.
        let errors: Vec<f64> = (0..8)
            .map(|set| error(&format!("s{set}"), 1_000_000))
            .collect();
        for e in &errors {
            assert!(e.abs() < 0.0325, "relative error {e}");
        }
        let rms = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        println!(
            "standard error over {} sets: {:.3}%",
            errors.len(),
            rms * 100.0
        );
        assert!(rms < 0.01, "standard error {rms}");
    }

    #[test]
    fn few_users_are_counted_almost_exactly() {
        assert_eq!(Sketch::default().estimate(), 0);
        assert!(error("few", 1_000).abs() < 0.01);
    }

    #[test]
    fn merged_sketches_count_the_union_once() {
        let (a, b) = (Sketch::default(), Sketch::default());
        for i in 0..60_000 {
            a.add(hash(format!("u{i}").as_bytes()));
        }
        for i in 30_000..90_000 {
            b.add(hash(format!("u{i}").as_bytes()));
        }
        a.merge(&b.registers());
        let error = (a.estimate() as f64 - 90_000.0).abs() / 90_000.0;
        assert!(error < 0.0244, "union estimated as {}", a.estimate());
        // Merging is idempotent: the same registers again change nothing.
        let before = a.registers();
        a.merge(&b.registers());
        assert_eq!(a.registers(), before);
    }
}
