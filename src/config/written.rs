//! The config as written, which `GET /admin/config` shows and diffs
//! compare: a JSON document of every table but `[[keys]]`, and the keys as
//! parsed. Keys stay out of the document because a config of 100,000 keys
//! would hold each again as a JSON object, and every reload would build,
//! compare and drop them all; they are shown as JSON only when asked.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

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
            map.serialize_entry("keys", keys)?;
        }
        map.end()
    }
}
