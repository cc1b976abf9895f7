//! The registry of live state by name, and the view of it that one config
//! snapshot holds, in the config's order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use super::flags::Blocks;
use super::{AliasLive, BackendLive, DeploymentLive};
use crate::config::Config;
use crate::limits::{Limits, SharedTokens};

/// The registry the snapshot takes its live entries from.
#[derive(Default)]
pub struct LiveState {
    inner: Mutex<Registry>,
    /// The fleet's shared limits, when replicas share them.
    shared: OnceLock<Arc<dyn SharedTokens>>,
}

#[derive(Default)]
struct Registry {
    deployments: HashMap<String, Arc<DeploymentLive>>,
    backends: HashMap<String, Arc<BackendLive>>,
    aliases: HashMap<String, Arc<AliasLive>>,
    keys: HashMap<String, Arc<Limits>>,
}

/// The live entries for one config, in the config's order.
pub struct LiveView {
    /// Per model, per deployment.
    pub deployments: Vec<Vec<Arc<DeploymentLive>>>,
    pub backends: Vec<Arc<BackendLive>>,
    pub aliases: Vec<Arc<AliasLive>>,
    /// Per key, its rate limits.
    pub keys: Vec<Arc<Limits>>,
}

impl LiveState {
    /// Every key's and deployment's limits, now and after reloads, send
    /// the tokens charged after admission to the fleet's shared cells.
    pub fn share_limits(&self, sink: Arc<dyn SharedTokens>) {
        let _ = self.shared.set(sink);
    }

    /// The entries for `config`: existing ones for names that persist, new
    /// ones for new names. Names the config no longer has are forgotten.
    pub fn view(&self, config: &Config) -> LiveView {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::take(&mut *guard);
        // New deployments' flags side by side, in config order, so a
        // plan over an alias reads them together.
        let mut blocks = Blocks::default();
        let view = LiveView {
            deployments: config
                .models
                .iter()
                .map(|m| {
                    m.deployments
                        .iter()
                        .map(|d| match old.deployments.get(&d.name) {
                            Some(live) => live.clone(),
                            None => Arc::new(DeploymentLive::new(blocks.next())),
                        })
                        .collect()
                })
                .collect(),
            backends: config
                .backends
                .iter()
                .map(|b| reuse(&old.backends, &b.name))
                .collect(),
            aliases: config
                .models
                .iter()
                .map(|m| reuse(&old.aliases, &m.alias))
                .collect(),
            keys: config
                .keys
                .iter()
                .map(|k| reuse(&old.keys, &k.name))
                .collect(),
        };
        let shared = self.shared.get();
        for (model, live) in config.models.iter().zip(&view.deployments) {
            for (d, l) in model.deployments.iter().zip(live) {
                l.quota.configure(d.limits);
                l.prefix.set_capacity(config.routing.prefix_blocks);
                if let Some(sink) = shared {
                    l.quota
                        .limits
                        .share(sink.clone(), format!("deployment:{}", d.name));
                }
                guard.deployments.insert(d.name.clone(), l.clone());
            }
        }
        for (k, l) in config.keys.iter().zip(&view.keys) {
            l.configure(k.limits);
            if let Some(sink) = shared {
                l.share(sink.clone(), format!("key:{}", k.name));
            }
            guard.keys.insert(k.name.clone(), l.clone());
        }
        let now = Instant::now();
        for (b, l) in config.backends.iter().zip(&view.backends) {
            l.configure(b.self_hosted, now);
            guard.backends.insert(b.name.clone(), l.clone());
        }
        for (m, l) in config.models.iter().zip(&view.aliases) {
            guard.aliases.insert(m.alias.clone(), l.clone());
        }
        view
    }
}

fn reuse<T: Default>(map: &HashMap<String, Arc<T>>, name: &str) -> Arc<T> {
    map.get(name).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn config(key_rpm: u32, deployment_rpm: u32) -> Config {
        let text = format!(
            "{}rpm = {deployment_rpm}\n\n[[keys]]\nname = \"web\"\nsha256 = \"{}\"\nmodels = [\"*\"]\nrpm = {key_rpm}\n",
            crate::config::tests::MINIMAL,
            "ab".repeat(32)
        );
        crate::config::parse(&text, &|_| None).expect("valid")
    }

    #[test]
    fn rate_limiters_survive_a_reload_for_the_same_name_until_their_quota_changes() {
        let live = LiveState::default();
        let first = live.view(&config(1, 1));
        first.keys[0].admit(0, Instant::now()).unwrap();
        first.deployments[0][0]
            .quota
            .limits
            .admit(0, Instant::now())
            .unwrap();

        let same = live.view(&config(1, 1));
        assert!(Arc::ptr_eq(&first.keys[0], &same.keys[0]));
        assert!(
            same.keys[0].admit(0, Instant::now()).is_err(),
            "the key's minute goes on"
        );
        assert!(
            same.deployments[0][0]
                .quota
                .limits
                .admit(0, Instant::now())
                .is_err(),
            "so does the deployment's"
        );

        let raised = live.view(&config(5, 1));
        assert_eq!(
            raised.keys[0].admit(0, Instant::now()),
            Ok(()),
            "a new quota starts afresh"
        );
        assert!(
            raised.deployments[0][0]
                .quota
                .limits
                .admit(0, Instant::now())
                .is_err()
        );
    }
}
