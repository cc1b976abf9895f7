//! The config as written, which `GET /admin/config` shows and diffs
//! compare: a JSON document of every table but `[[keys]]`, and the keys as
//! parsed. Keys stay out of the document because a config of 100,000 keys
//! would hold each again as a JSON object, and every reload would build,
//! compare and drop them all; they are shown as JSON only when asked.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use sha2::Digest;

use super::Config;
use super::schema::RawKey;

/// The `[[keys]]` of a config, as parsed, in file order.
#[derive(Debug, Clone, Default)]
pub struct WrittenKeys(Vec<RawKey>);

impl WrittenKeys {
    pub(super) fn new(keys: Vec<RawKey>) -> Self {
        Self(keys)
    }

    /// Each key's name and what was written for it, compared as a whole.
    pub(super) fn by_name(&self) -> impl Iterator<Item = (&str, &RawKey)> {
        self.0.iter().map(|k| (k.name.as_str(), k))
    }
}

impl Config {
    /// The config as written, as JSON: the document with the keys put back,
    /// their digests replaced by a fingerprint (enough to see that one
    /// changed). Secrets themselves never sit in the file, only the names
    /// of the variables holding them.
    pub fn written(&self) -> impl Serialize + '_ {
        Written(self)
    }
}

struct Written<'a>(&'a Config);

impl Serialize for Written<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (document, keys) = (&self.0.document, &self.0.written_keys.0);
        let Some(tables) = document.as_object() else {
            return document.serialize(serializer);
        };
        let mut map = serializer.serialize_map(None)?;
        for (name, table) in tables {
            map.serialize_entry(name, table)?;
        }
        if !keys.is_empty() {
            map.serialize_entry("keys", &Keys(keys))?;
        }
        map.end()
    }
}

struct Keys<'a>(&'a [RawKey]);

impl Serialize for Keys<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(Key))
    }
}

/// One key with the fields it was written with.
struct Key<'a>(&'a RawKey);

impl Serialize for Key<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let k = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", &k.name)?;
        if let Some(digest) = &k.sha256 {
            map.serialize_entry("sha256", &redacted(digest))?;
        }
        if let Some(var) = &k.key_env {
            map.serialize_entry("key_env", var)?;
        }
        map.serialize_entry("models", &k.models)?;
        if let Some(region) = &k.region {
            map.serialize_entry("region", region)?;
        }
        if k.region_header {
            map.serialize_entry("region_header", &true)?;
        }
        if let Some(usd) = k.budget_daily_usd {
            map.serialize_entry("budget_daily_usd", &usd)?;
        }
        if let Some(usd) = k.budget_monthly_usd {
            map.serialize_entry("budget_monthly_usd", &usd)?;
        }
        if let Some(rpm) = k.rpm {
            map.serialize_entry("rpm", &rpm)?;
        }
        if let Some(tpm) = k.tpm {
            map.serialize_entry("tpm", &tpm)?;
        }
        if k.metrics {
            map.serialize_entry("metrics", &true)?;
        }
        map.end()
    }
}

/// A digest's fingerprint: the first 4 bytes of the sha256 of the digest
/// as a JSON string.
fn redacted(digest: &str) -> String {
    let quoted = serde_json::to_string(digest).unwrap_or_default();
    let print = sha2::Sha256::digest(quoted.as_bytes());
    format!("[redacted {}]", hex::encode(&print[..4]))
}
