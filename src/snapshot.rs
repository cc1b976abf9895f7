//! One immutable view of the configuration and everything built from it
//! (lookup tables, provider clients). Requests load it once, from the
//! `ArcSwap` in the app state, and use it to the end.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use foldhash::HashMap;

use crate::config::{Backend, Config, Deployment, Key};
use crate::limits::Limits;
use crate::metering::cost::Rate;
use crate::providers::{self, Provider};
use crate::routing::{AliasLive, BackendLive, DeploymentLive, Lease, LiveState, LiveView};

pub struct Snapshot {
    pub config: Config,
    /// When this snapshot was built, in unix seconds (`created` of models).
    pub created: u64,
    models: HashMap<String, usize>,
    keys: HashMap<[u8; 32], usize>,
    backends: HashMap<String, (usize, Arc<dyn Provider>)>,
    live: LiveView,
    /// Per model, per deployment: what its tokens cost.
    rates: Vec<Vec<Rate>>,
    /// Per model: its per-token deployments, for counterfactual costs.
    counterfactuals: Vec<Arc<[(String, Rate)]>>,
}

impl Snapshot {
    /// Builds the snapshot of `config`, taking live state for its names
    /// from `live` (carried over from the previous snapshot's names).
    pub fn build(config: Config, live: &LiveState) -> Result<Self, String> {
        Self::rebuild(config, live, None)
    }

    /// Like [`Snapshot::build`], reusing the providers of `previous` for
    /// backends whose settings did not change, so their connection pools
    /// stay warm and a reload builds only what changed.
    pub fn rebuild(
        config: Config,
        live: &LiveState,
        previous: Option<&Snapshot>,
    ) -> Result<Self, String> {
        let unchanged = |b: &Backend| {
            let previous = previous?;
            let (i, provider) = previous.backends.get(&b.name)?;
            (previous.config.backends[*i] == *b).then(|| provider.clone())
        };
        let backends = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let provider = match unchanged(b) {
                    Some(provider) => provider,
                    None => providers::build(b)?,
                };
                Ok((b.name.clone(), (i, provider)))
            })
            .collect::<Result<HashMap<_, _>, String>>()?;
        let backend_of = |d: &Deployment| &config.backends[backends[&d.backend].0];
        let rates: Vec<Vec<Rate>> = config
            .models
            .iter()
            .map(|m| {
                m.deployments
                    .iter()
                    .map(|d| Rate::of(d, backend_of(d)))
                    .collect()
            })
            .collect();
        let counterfactuals = config
            .models
            .iter()
            .zip(&rates)
            .map(|(m, rates)| {
                m.deployments
                    .iter()
                    .zip(rates)
                    .filter(|(_, rate)| rate.per_token)
                    .map(|(d, rate)| (d.name.clone(), *rate))
                    .collect()
            })
            .collect();
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
            live: live.view(&config),
            rates,
            counterfactuals,
            config,
        })
    }

    pub fn rate(&self, model: usize, deployment: usize) -> Rate {
        self.rates[model][deployment]
    }

    pub fn counterfactuals(&self, model: usize) -> &Arc<[(String, Rate)]> {
        &self.counterfactuals[model]
    }

    pub fn model_index(&self, alias: &str) -> Option<usize> {
        self.models.get(alias).copied()
    }

    pub fn live(&self) -> &LiveView {
        &self.live
    }

    pub fn deployment_live(&self, model: usize, deployment: usize) -> &Arc<DeploymentLive> {
        &self.live.deployments[model][deployment]
    }

    pub fn alias_live(&self, model: usize) -> &Arc<AliasLive> {
        &self.live.aliases[model]
    }

    /// A deployment's backend and its live state.
    pub fn backend_live(&self, deployment: &Deployment) -> (&Backend, &Arc<BackendLive>) {
        let (i, _) = &self.backends[&deployment.backend];
        (&self.config.backends[*i], &self.live.backends[*i])
    }

    /// Counts a request against a deployment while the lease lives.
    pub fn lease(&self, model: usize, deployment: usize) -> Lease {
        let d = &self.config.models[model].deployments[deployment];
        Lease::new(
            self.deployment_live(model, deployment).clone(),
            self.backend_live(d).1.clone(),
            self.alias_live(model).clone(),
        )
    }

    /// Keys are looked up by the sha256 of what the client sent.
    pub fn key(&self, sha256: &[u8; 32]) -> Option<&Key> {
        self.keys.get(sha256).map(|&i| &self.config.keys[i])
    }

    /// A key's rate limits, which live as long as its name.
    pub fn key_limits(&self, key: &Key) -> &Arc<Limits> {
        &self.live.keys[self.keys[&key.sha256]]
    }

    pub fn key_named(&self, name: &str) -> Option<&Key> {
        self.config.keys.iter().find(|k| k.name == name)
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
