//! Affinity: the requests of one session, or of one prompt prefix, go to
//! the deployment whose engine has their prefix in its cache, while it is
//! healthy, not saturated and within its share of the load.
//!
//! A session binds by rendezvous hashing (each deployment's weight is a
//! hash of the session and the deployment's name; the heaviest wins), a
//! form of consistent hashing: when a deployment leaves, only its own
//! sessions move. The load is bounded as in consistent hashing with
//! bounded loads (Mirrokni, Thorup and Zadimoghaddam): a deployment with
//! ⌈(1 + ε) × (requests in flight + 1) / deployments⌉ requests in flight
//! takes no more, and its sessions go to their next heaviest. With
//! `affinity = "prefix"`, the deployment that most recently served the
//! longest prefix of the prompt's blocks wins first; a prompt no
//! deployment has seen binds by its session.

use std::sync::atomic::Ordering;

use super::session::Session;
use super::strategy::{self, Contender};
use crate::config::{Affinity, Strategy};
use crate::metering::prefix::{Block, Matched};

/// What affinity decided for one request.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub mode: Affinity,
    pub session: Session,
    /// The deployment the request is bound to (an index into the model's
    /// deployments); `None` when none may take it.
    pub bound: Option<usize>,
    /// The session's own deployment was saturated or at its load bound,
    /// so it is bound to the next.
    pub moved: bool,
    /// Prefix affinity: how much of the prompt the bound deployment
    /// served last.
    pub matched: Matched,
}

/// A deployment's weight for a session: a folded multiply of the two
/// hashes, so every bit of each moves every bit of the weight.
fn weight(session: u64, deployment: u64) -> u64 {
    let full = u128::from(session ^ 0x243f_6a88_85a3_08d3)
        * u128::from(deployment ^ 0x1319_8a2e_0370_7344);
    (full as u64) ^ ((full >> 64) as u64)
}

/// Whether `option` has no room: its backend at or over capacity, or,
/// for spillover, past its high load and not yet back under the low.
fn saturated(option: &Contender<'_>, strategy: Strategy, now: std::time::Instant) -> bool {
    let load = option.load(now);
    match strategy {
        Strategy::Spillover(spill) => strategy::saturated(option.live(), load, spill),
        Strategy::Cost | Strategy::Latency | Strategy::Weighted => load.is_some_and(|l| l >= 1.0),
    }
}

/// The deployments the strategy holds equal, among which a session binds:
/// under `cost`, the self-hosted ones when there are any (their marginal
/// cost follows load, which the bound on load balances), else all; under
/// `spillover`, the lowest tier with room; under the others, all.
fn pool<'o, 'a>(
    options: &'o [Contender<'a>],
    strategy: Strategy,
    now: std::time::Instant,
) -> impl Iterator<Item = &'o Contender<'a>> + Clone {
    let any_self_hosted = options.iter().any(|o| o.row.self_hosted);
    let lowest_tier = match strategy {
        Strategy::Spillover(_) => options
            .iter()
            .filter(|o| !saturated(o, strategy, now))
            .map(|o| o.row.tier)
            .min(),
        Strategy::Cost | Strategy::Latency | Strategy::Weighted => None,
    };
    options.iter().filter(move |o| match strategy {
        Strategy::Cost => !any_self_hosted || o.row.self_hosted,
        Strategy::Spillover(_) => Some(o.row.tier) == lowest_tier,
        Strategy::Latency | Strategy::Weighted => true,
    })
}

/// Binds the request to one of `options` (those policy and health kept).
pub fn bind(
    options: &[Contender<'_>],
    mode: Affinity,
    session: Session,
    blocks: &[Block],
    strategy: Strategy,
    epsilon: f64,
    now: std::time::Instant,
) -> Binding {
    let pool = pool(options, strategy, now);
    let in_flight = |o: &Contender<'_>| o.live().in_flight.load(Ordering::Relaxed);
    let (count, total) = pool
        .clone()
        .fold((0u64, 0u64), |(n, sum), o| (n + 1, sum + in_flight(o)));
    let mut binding = Binding {
        mode,
        session,
        bound: None,
        moved: false,
        matched: Matched::default(),
    };
    if count == 0 {
        return binding;
    }
    // Some deployment is always under the bound: were all at it, they
    // would hold more than the total in flight.
    let cap = ((1.0 + epsilon) * (total + 1) as f64 / count as f64).ceil() as u64;
    let by_prefix = mode == Affinity::Prefix && !blocks.is_empty();
    // One pass: the session's own deployment (the heaviest), the heaviest
    // of those open (under the bound and not saturated) and, for prefix
    // affinity, the open one that served the most of the prompt the most
    // recently. Ties go to the last, as `max_by_key`'s do.
    let mut own: Option<(u64, usize)> = None;
    let mut open: Option<(u64, usize)> = None;
    let mut served: Option<(Matched, usize)> = None;
    for o in pool {
        let heavier = |best: Option<(u64, usize)>, weight| best.is_none_or(|(b, _)| weight >= b);
        let w = weight(session.hash, o.row.name_hash);
        if heavier(own, w) {
            own = Some((w, o.index));
        }
        // Without prefixes to match, only an option that would be the
        // heaviest open one needs its room read: about ln(n) of n.
        if !by_prefix && !heavier(open, w) {
            continue;
        }
        if in_flight(o) >= cap || saturated(o, strategy, now) {
            continue;
        }
        if heavier(open, w) {
            open = Some((w, o.index));
        }
        if by_prefix {
            let m = o.live().prefix.matched(blocks);
            let more = |(b, _): (Matched, usize)| (m.blocks, m.served) >= (b.blocks, b.served);
            if m.blocks > 0 && served.is_none_or(more) {
                served = Some((m, o.index));
            }
        }
    }
    if let Some((matched, index)) = served {
        binding.bound = Some(index);
        binding.matched = matched;
        return binding;
    }
    binding.bound = open.map(|(_, index)| index);
    binding.moved = own.map(|(_, index)| index) != binding.bound;
    binding
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_spread_sessions_evenly_and_move_only_a_leaving_deployments_share() {
        let deployments: Vec<u64> = (0..4u64)
            .map(|d| d.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let owner =
            |session: u64, of: &[u64]| *of.iter().max_by_key(|&&d| weight(session, d)).unwrap();
        let mut counts = [0u32; 4];
        let mut moved = 0;
        for s in 0..4000u64 {
            let session = s.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let before = owner(session, &deployments);
            counts[deployments.iter().position(|&d| d == before).unwrap()] += 1;
            let after = owner(session, &deployments[..3]);
            if before != after {
                assert_eq!(
                    before, deployments[3],
                    "only the leaving deployment's sessions move"
                );
                moved += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (850..=1150).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(moved, counts[3]);
    }
}
