//! One immutable view of the configuration and everything built from it
//! (lookup tables, provider clients). Requests load it once, from the
//! `ArcSwap` in the app state, and use it to the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Backend, Config, Deployment, Key, Model};
use crate::providers::{self, Provider};

pub struct Snapshot {
    pub config: Config,
    /// When this snapshot was built, in unix seconds (`created` of models).
    pub created: u64,
    models: HashMap<String, usize>,
    keys: HashMap<[u8; 32], usize>,
    backends: HashMap<String, (usize, Arc<dyn Provider>)>,
}

impl Snapshot {
    pub fn build(config: Config) -> Result<Self, String> {
        let backends = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Ok((b.name.clone(), (i, providers::build(b)?))))
            .collect::<Result<_, String>>()?;
        Ok(Self {
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            models: config
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| (m.alias.clone(), i))
                .collect(),
            keys: config
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.sha256, i))
                .collect(),
            backends,
            config,
        })
    }

    pub fn model(&self, alias: &str) -> Option<&Model> {
        self.models.get(alias).map(|&i| &self.config.models[i])
    }

    /// Keys are looked up by the sha256 of what the client sent.
    pub fn key(&self, sha256: &[u8; 32]) -> Option<&Key> {
        self.keys.get(sha256).map(|&i| &self.config.keys[i])
    }

    pub fn auth_required(&self) -> bool {
        !self.config.keys.is_empty()
    }

    /// The backend serving a deployment and its provider. Validation
    /// guarantees the backend exists.
    pub fn backend(&self, deployment: &Deployment) -> (&Backend, &dyn Provider) {
        let (i, provider) = &self.backends[&deployment.backend];
        (&self.config.backends[*i], provider.as_ref())
    }

    /// Aliases a key may use (all of them without a key), in config order.
    pub fn aliases_for<'a>(&'a self, key: Option<&'a Key>) -> impl Iterator<Item = &'a str> + 'a {
        self.config
            .models
            .iter()
            .map(|m| m.alias.as_str())
            .filter(move |alias| key.is_none_or(|k| k.models.allows(alias)))
    }
}
