//! Prefix memory shared by the fleet: the prompt blocks each replica
//! routes with prefix affinity are queued here, per deployment, and go
//! out in the replica's periodic exchange (`lua/sync.lua`), which also
//! brings back the blocks the other replicas routed since this one last
//! asked. The request path only queues; it never waits on Redis.

use std::collections::HashMap;
use std::fmt::Write;

use hashlink::LruCache;
use serde::Serialize;

use crate::metering::prefix::Block;

/// Blocks per deployment one exchange sends, or takes, at most: about
/// 64k prompt tokens in each 250 ms, more than one engine prefills. It
/// bounds the queue here, the exchange's payload and the script's work
/// in Redis; past it, the oldest queued or the oldest routed elsewhere
/// are left out.
pub const BATCH: usize = 4096;

/// How long Redis keeps a deployment's blocks after a replica last sent
/// some: longer than an engine's cache keeps an idle prefix under load,
/// and the end of the blocks of a deployment no config names any more.
const KEEP_MS: u64 = 3_600_000;

/// What this replica routed and has not yet sent, and how far it has
/// read what the others routed.
#[derive(Default)]
pub(super) struct Prefixes {
    /// Per deployment, the blocks routed since the last exchange, the
    /// least recently routed first.
    queued: HashMap<String, LruCache<u64, ()>>,
    /// Per deployment, the store's time (microseconds) of the last
    /// exchange that read its blocks.
    since: HashMap<String, u64>,
}

/// Blocks routed and not yet acknowledged by the store, per deployment:
/// queued again, behind newer ones, when the exchange fails.
pub(super) type Unsent = HashMap<String, LruCache<u64, ()>>;

impl Prefixes {
    pub fn queue(&mut self, deployment: &str, blocks: &[Block]) {
        let queue = match self.queued.get_mut(deployment) {
            Some(queue) => queue,
            None => self
                .queued
                .entry(deployment.to_owned())
                .or_insert_with(|| LruCache::new(BATCH)),
        };
        for block in blocks {
            queue.insert(block.hash, ());
        }
    }

    pub fn take(&mut self) -> Unsent {
        std::mem::take(&mut self.queued)
    }

    /// Puts back what an exchange that failed took: blocks routed since
    /// stay the more recent.
    pub fn restore(&mut self, unsent: Unsent) {
        for (deployment, older) in unsent {
            match self.queued.remove(&deployment) {
                Some(newer) => {
                    let mut queue = older;
                    for (&hash, ()) in &newer {
                        queue.insert(hash, ());
                    }
                    self.queued.insert(deployment, queue);
                }
                None => {
                    self.queued.insert(deployment, older);
                }
            }
        }
    }

    /// The exchange read `deployments`' blocks up to `now`, the store's
    /// time; the marks of deployments it no longer reads are dropped.
    pub fn read(&mut self, deployments: &[String], now: u64) {
        self.since = deployments.iter().map(|d| (d.clone(), now)).collect();
    }

    /// What `sync.lua` reads: the blocks to add and the sets to read,
    /// each set a key under the store's prefix (`key` of a deployment).
    pub fn wire(
        &self,
        unsent: &Unsent,
        pull: &[String],
        cap: u32,
        key: impl Fn(&str) -> String,
    ) -> WirePrefixes {
        let push = unsent
            .iter()
            .filter(|(_, blocks)| !blocks.is_empty())
            .map(|(deployment, blocks)| {
                let mut hashes = String::with_capacity(blocks.len() * 16);
                for (hash, ()) in blocks {
                    let _ = write!(hashes, "{hash:016x}");
                }
                (key(deployment), hashes)
            })
            .collect();
        let pull = pull
            .iter()
            .map(|d| {
                let since = self.since.get(d).copied().unwrap_or(0);
                (key(d), since.to_string())
            })
            .collect();
        WirePrefixes {
            push,
            pull,
            cap,
            most: BATCH,
            keep: KEEP_MS,
        }
    }
}

/// The prefix memory's part of an exchange, as `sync.lua` takes it: block
/// hashes as 16 hex digits each, one string per deployment.
#[derive(Debug, Serialize)]
pub(super) struct WirePrefixes {
    /// `[set, hashes]`, the least recently routed first.
    push: Vec<(String, String)>,
    /// `[set, since]`: its blocks added after `since`, the store's time.
    pull: Vec<(String, String)>,
    /// Blocks a set keeps: the newest, as each replica's memory does.
    cap: u32,
    /// Blocks one read returns, the newest.
    most: usize,
    /// Milliseconds a set outlives its last addition.
    keep: u64,
}

/// Hashes as `sync.lua` returns them, the newest first, into the order a
/// prefix memory takes them up: the oldest first. `None` when malformed.
pub(super) fn hashes(hex: &str) -> Option<Vec<u64>> {
    if hex.len() % 16 != 0 || !hex.is_ascii() {
        return None;
    }
    let mut hashes = (0..hex.len() / 16)
        .map(|i| u64::from_str_radix(&hex[i * 16..(i + 1) * 16], 16).ok())
        .collect::<Option<Vec<u64>>>()?;
    hashes.reverse();
    Some(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(hashes: &[u64]) -> Vec<Block> {
        hashes
            .iter()
            .map(|&hash| Block { hash, tokens: 16 })
            .collect()
    }

    #[test]
    fn queued_blocks_go_out_once_in_routing_order_and_come_back_oldest_first() {
        let mut prefixes = Prefixes::default();
        prefixes.queue("d", &blocks(&[1, 2, 3]));
        prefixes.queue("d", &blocks(&[1, 0xabc]));
        let unsent = prefixes.take();
        let wire = prefixes.wire(&unsent, &["d".into()], 10, |d| format!("p:{d}"));
        let hex = "0000000000000002000000000000000300000000000000010000000000000abc";
        assert_eq!(wire.push, vec![("p:d".into(), hex.into())]);
        assert_eq!(wire.pull, vec![("p:d".into(), "0".into())]);
        // The store returns the newest first.
        assert_eq!(hashes(hex), Some(vec![0xabc, 1, 3, 2]));
        assert_eq!(hashes("12"), None);
        assert_eq!(hashes(&"g".repeat(16)), None);
        prefixes.read(&["d".into()], 77);
        let unsent = prefixes.take();
        let again = prefixes.wire(&unsent, &["d".into()], 10, |d| d.into());
        assert!(again.push.is_empty());
        assert_eq!(again.pull, vec![("d".into(), "77".into())]);
    }

    #[test]
    fn what_a_failed_exchange_took_is_queued_again_behind_newer_blocks_and_bounded() {
        let mut prefixes = Prefixes::default();
        let old: Vec<u64> = (0..BATCH as u64).collect();
        prefixes.queue("d", &blocks(&old));
        let unsent = prefixes.take();
        prefixes.queue("d", &blocks(&[1_000_000]));
        prefixes.restore(unsent);
        let queue = &prefixes.queued["d"];
        assert_eq!(queue.len(), BATCH);
        let order: Vec<u64> = queue.iter().map(|(&h, ())| h).collect();
        assert_eq!(order.first(), Some(&1), "the oldest went");
        assert_eq!(order.last(), Some(&1_000_000), "the newest stays newest");
    }
}
