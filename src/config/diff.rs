//! What changes between two configs: backends, models, deployments and
//! keys added, removed or changed, and the other tables that changed.
//! Compared as written, by name: the JSON document, and the keys as parsed.

use foldhash::HashMap;
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
    /// Items by name, before and after; each list comes out sorted.
    fn between<'a, V: PartialEq>(
        old: impl IntoIterator<Item = (&'a str, V)>,
        new: impl IntoIterator<Item = (&'a str, V)>,
    ) -> Self {
        let old: HashMap<&str, V> = old.into_iter().collect();
        let new: HashMap<&str, V> = new.into_iter().collect();
        let mut changes = Self::default();
        for (name, value) in &new {
            match old.get(name) {
                None => changes.added.push((*name).to_owned()),
                Some(before) if before != value => changes.changed.push((*name).to_owned()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .keys()
            .filter(|name| !new.contains_key(*name))
            .map(|name| (*name).to_owned())
            .collect();
        for names in [
            &mut changes.added,
            &mut changes.removed,
            &mut changes.changed,
        ] {
            names.sort_unstable();
        }
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
fn by_name<'a>(
    document: &'a Value,
    list: &str,
    field: &str,
) -> impl Iterator<Item = (&'a str, &'a Value)> {
    document[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |item| Some((item[field].as_str()?, item)))
}

/// Models without their deployments, which are compared on their own.
fn models(document: &Value) -> impl Iterator<Item = (&str, Value)> {
    by_name(document, "models", "alias").map(|(alias, model)| {
        let settings = model.as_object().map(|m| {
            m.iter()
                .filter(|(field, _)| *field != "deployments")
                .map(|(field, value)| (field.clone(), value.clone()))
                .collect()
        });
        (alias, settings.map_or(Value::Null, Value::Object))
    })
}

/// Deployments by the name the gateway gives them.
fn deployments(config: &Config) -> impl Iterator<Item = (&str, &Value)> {
    let written = config.document["models"].as_array();
    config
        .models
        .iter()
        .enumerate()
        .flat_map(move |(i, model)| {
            model
                .deployments
                .iter()
                .enumerate()
                .map(move |(j, deployment)| {
                    let raw = written
                        .and_then(|m| m.get(i))
                        .and_then(|m| m["deployments"].get(j))
                        .unwrap_or(&Value::Null);
                    (deployment.name.as_str(), raw)
                })
        })
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
            by_name(a, "backends", "name"),
            by_name(b, "backends", "name"),
        ),
        models: Changes::between(models(a), models(b)),
        deployments: Changes::between(deployments(old), deployments(new)),
        keys: Changes::between(old.written_keys.by_name(), new.written_keys.by_name()),
        settings,
    }
}
