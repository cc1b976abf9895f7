//! What a replica tells the fleet and reads back in its periodic exchange
//! (`lua/sync.lua`), as the state module gathers it from live state, and
//! the wire shapes the script reads and writes.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::health::Pressure;

/// What another replica published of a deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PressureSeen {
    /// When it was published, on the store's clock (microseconds): newer
    /// than the last one applied, or already applied.
    pub at: u64,
    pub pressure: Pressure,
}

/// What the state module asks of one exchange.
#[derive(Debug, Default)]
pub struct SyncAsk {
    /// Deployments whose pressure changed here since the last exchange.
    pub push: Vec<(String, Pressure)>,
    /// Every deployment of the current config, to read the fleet's.
    pub pull: Vec<String>,
    /// Keys with budgets: their spend is read back (what changed since
    /// the last exchange), and seeded from the ledger when the store lost
    /// it. The same list from one exchange to the next while the config
    /// stays.
    pub budgets: Arc<[String]>,
    /// Deployments of aliases with prefix affinity: the prompt blocks the
    /// other replicas routed to them are read back.
    pub prefixes: Vec<String>,
    /// Blocks the fleet keeps per deployment (`routing.prefix_blocks`).
    pub prefix_blocks: u32,
}

/// What came back, in the order asked.
#[derive(Debug, Default)]
pub struct SyncReply {
    /// Replicas seen in the last minute, this one included.
    pub replicas: u64,
    /// Per `pull`: what another replica published, if anything.
    pub pressure: Vec<Option<PressureSeen>>,
    /// Per `prefixes`: the block hashes other replicas routed to it since
    /// the last exchange, the oldest first.
    pub blocks: Vec<Vec<u64>>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One deployment's pressure as `sync.lua` takes it: times relative, in
/// microseconds.
#[derive(Debug, Serialize)]
pub(super) struct WirePush {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cool: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rq_until: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tk: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tk_until: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    open: Option<u64>,
}

impl WirePush {
    pub fn of(key: String, p: &Pressure) -> Self {
        Self {
            key,
            cool: p.cooling.map(micros),
            rq: p.requests.map(|r| r.0),
            rq_until: p.requests.map(|r| micros(r.1)),
            tk: p.tokens.map(|t| t.0),
            tk_until: p.tokens.map(|t| micros(t.1)),
            open: p.open.map(micros),
        }
    }
}

/// One deployment's pressure as `sync.lua` returns it.
#[derive(Debug, Default, Deserialize)]
pub(super) struct WireSeen {
    #[serde(default)]
    by: String,
    #[serde(default)]
    at: f64,
    cool: Option<f64>,
    rq: Option<f64>,
    rq_until: Option<f64>,
    tk: Option<f64>,
    tk_until: Option<f64>,
    open: Option<f64>,
}

impl WireSeen {
    /// `None` when nothing was published, or this replica published it.
    pub fn seen(self, replica: &str) -> Option<PressureSeen> {
        if self.by.is_empty() || self.by == replica {
            return None;
        }
        let span = |us: Option<f64>| us.map(|us| Duration::from_micros(us.max(0.0) as u64));
        let left = |n: Option<f64>, until: Option<f64>| Some((n? as u64, span(until)?));
        Some(PressureSeen {
            at: self.at as u64,
            pressure: Pressure {
                cooling: span(self.cool),
                requests: left(self.rq, self.rq_until),
                tokens: left(self.tk, self.tk_until),
                open: span(self.open),
            },
        })
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct WireReply {
    pub replicas: u64,
    #[serde(deserialize_with = "list")]
    pub pressure: Vec<WireSeen>,
    /// Per key read: day's spend, month's spend, held; as strings.
    #[serde(deserialize_with = "list")]
    pub spent: Vec<[String; 3]>,
    /// The budget hashes changed since the position the exchange gave:
    /// hash, day's spend, month's spend, held.
    #[serde(default, deserialize_with = "list")]
    pub changed: Vec<[String; 4]>,
    /// The spend log began anew after that position: the hashes it does
    /// not name have nothing.
    #[serde(default)]
    pub reset: bool,
    /// The spend log's position after this exchange: epoch and number.
    #[serde(default)]
    pub version: Option<[String; 2]>,
    /// Per prefix set read: its new block hashes, 16 hex digits each.
    #[serde(default, deserialize_with = "list")]
    pub blocks: Vec<String>,
    /// The store's time of the read (microseconds), as a string.
    #[serde(default)]
    pub prefix_at: String,
    /// The store had lost its data before this exchange.
    #[serde(default)]
    pub lost: bool,
}

/// A Lua table encodes an empty list as `{}`.
fn list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List<T> {
        Items(Vec<T>),
        Empty {},
    }
    Ok(match List::deserialize(deserializer)? {
        List::Items(items) => items,
        List::Empty {} => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_lua_table_reads_as_an_empty_list() {
        let reply: WireReply =
            serde_json::from_str(r#"{"replicas":2,"pressure":{},"spent":{}}"#).unwrap();
        assert_eq!((reply.replicas, reply.pressure.len()), (2, 0));
        let reply: WireReply = serde_json::from_str(
            r#"{"replicas":1,"pressure":[{"by":"b","at":5,"cool":2000000}],"spent":[["1","2","3"]]}"#,
        )
        .unwrap();
        let seen = reply.pressure.into_iter().next().unwrap().seen("a");
        assert_eq!(seen.unwrap().pressure.cooling, Some(Duration::from_secs(2)));
    }

    #[test]
    fn what_this_replica_published_is_not_applied_again() {
        let wire = WireSeen {
            by: "me".into(),
            at: 1.0,
            ..WireSeen::default()
        };
        assert_eq!(wire.seen("me"), None);
    }
}
