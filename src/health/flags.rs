//! The flags of a deployment's live state that the router reads for
//! every candidate of every request: whether its circuit is other than
//! closed, whether a 429 cooldown may be running, whether its quota has
//! limits or upstream reports to check. One byte a deployment, the bytes of deployments
//! that came in with one config side by side in blocks of 64, so the
//! common case of a plan (none set) reads one cache line per 64
//! deployments rather than one or more per deployment.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Deployments a block holds: one cache line of flags.
const BLOCK: usize = 64;

type Block = [AtomicU8; BLOCK];

/// One deployment's flags: a byte in a block shared with others.
#[derive(Clone)]
pub struct LiveFlags {
    block: Arc<Block>,
    slot: u8,
}

impl LiveFlags {
    /// The circuit is open or half-open.
    pub const CIRCUIT: u8 = 1;
    /// A 429 cooldown may be running.
    pub const COOLING: u8 = 1 << 1;
    /// Its own rate limits are configured.
    pub const LIMITED: u8 = 1 << 2;
    /// An upstream reported what is left of its quota.
    pub const REPORTED: u8 = 1 << 3;

    fn byte(&self) -> &AtomicU8 {
        &self.block[usize::from(self.slot)]
    }

    /// The flags set; none when the deployment may be taken as it is.
    pub fn get(&self) -> u8 {
        self.byte().load(Ordering::Acquire)
    }

    pub fn is_set(&self, flag: u8) -> bool {
        self.get() & flag != 0
    }

    /// Sets or clears `flag`, writing only on a change: the byte's cache
    /// line is read by every plan, and shared with other deployments.
    /// Writers of one flag are serialised by its owner (the circuit's
    /// lock, the estimates' lock, reloads), so the test cannot race.
    pub fn put(&self, flag: u8, on: bool) {
        if self.is_set(flag) == on {
            return;
        }
        if on {
            self.byte().fetch_or(flag, Ordering::Release);
        } else {
            self.byte().fetch_and(!flag, Ordering::Release);
        }
    }
}

impl Default for LiveFlags {
    /// Flags in a block of their own.
    fn default() -> Self {
        Blocks::default().next()
    }
}

/// Hands out flags side by side, a new block every 64.
#[derive(Default)]
pub struct Blocks {
    block: Option<Arc<Block>>,
    next: usize,
}

impl Blocks {
    pub fn next(&mut self) -> LiveFlags {
        let block = match &self.block {
            Some(block) if self.next < BLOCK => block.clone(),
            _ => {
                self.next = 0;
                self.block
                    .insert(Arc::new(std::array::from_fn(|_| AtomicU8::new(0))))
                    .clone()
            }
        };
        let slot = self.next as u8;
        self.next += 1;
        LiveFlags { block, slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_of_one_block_are_side_by_side_and_independent() {
        let mut blocks = Blocks::default();
        let all: Vec<LiveFlags> = (0..BLOCK + 1).map(|_| blocks.next()).collect();
        assert!(Arc::ptr_eq(&all[0].block, &all[BLOCK - 1].block));
        assert!(!Arc::ptr_eq(&all[0].block, &all[BLOCK].block));
        all[1].put(LiveFlags::CIRCUIT, true);
        all[1].put(LiveFlags::LIMITED, true);
        assert_eq!(all[0].get(), 0);
        assert_eq!(all[1].get(), LiveFlags::CIRCUIT | LiveFlags::LIMITED);
        all[1].put(LiveFlags::CIRCUIT, false);
        assert_eq!(all[1].get(), LiveFlags::LIMITED);
    }
}
