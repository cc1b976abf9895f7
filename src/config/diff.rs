//! What changes between two configs: backends, models, deployments and
//! keys added, removed or changed, and the other tables that changed.
//! Compared as written (the redacted documents), by name.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::Config;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    fn between(old: &BTreeMap<String, Value>, new: &BTreeMap<String, Value>) -> Self {
        let mut changes = Self::default();
        for (name, value) in new {
            match old.get(name) {
                None => changes.added.push(name.clone()),
                Some(before) if before != value => changes.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .keys()
            .filter(|name| !new.contains_key(*name))
            .cloned()
            .collect();
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConfigDiff {
    pub from_version: String,
    pub to_version: String,
    pub backends: Changes,
    pub models: Changes,
    pub deployments: Changes,
    pub keys: Changes,
    /// Other top-level tables that changed (`server`, `routing`, ...).
    pub settings: Vec<String>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
            && self.models.is_empty()
            && self.deployments.is_empty()
            && self.keys.is_empty()
            && self.settings.is_empty()
    }
}

/// The items of a list table by name; `field` names them.
fn by_name(document: &Value, list: &str, field: &str) -> BTreeMap<String, Value> {
    document[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| Some((item[field].as_str()?.to_owned(), item.clone())))
        .collect()
}

/// Models without their deployments, which are compared on their own.
fn models(document: &Value) -> BTreeMap<String, Value> {
    by_name(document, "models", "alias")
        .into_iter()
        .map(|(alias, mut model)| {
            if let Some(m) = model.as_object_mut() {
                m.remove("deployments");
            }
            (alias, model)
        })
        .collect()
}

/// Deployments by the name the gateway gives them.
fn deployments(config: &Config) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let written = config.document["models"].as_array();
    for (i, model) in config.models.iter().enumerate() {
        for (j, deployment) in model.deployments.iter().enumerate() {
            let raw = written
                .and_then(|m| m.get(i))
                .and_then(|m| m["deployments"].get(j))
                .cloned()
                .unwrap_or_default();
            out.insert(deployment.name.clone(), raw);
        }
    }
    out
}

pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let (a, b) = (&old.document, &new.document);
    let mut settings: Vec<String> = [
        "server", "routing", "policy", "ledger", "state", "admin", "metrics", "logging", "tracing",
    ]
    .into_iter()
    .filter(|table| a.get(*table) != b.get(*table))
    .map(str::to_owned)
    .collect();
    settings.sort();
    ConfigDiff {
        from_version: old.version.clone(),
        to_version: new.version.clone(),
        backends: Changes::between(
            &by_name(a, "backends", "name"),
            &by_name(b, "backends", "name"),
        ),
        models: Changes::between(&models(a), &models(b)),
        deployments: Changes::between(&deployments(old), &deployments(new)),
        keys: Changes::between(&by_name(a, "keys", "name"), &by_name(b, "keys", "name")),
        settings,
    }
}
