//! One immutable view of the configuration and everything built from it
//! (lookup tables, provider clients, each deployment resolved to its
//! backend, prices and health). Requests load it once, from the `ArcSwap`
//! in the app state, and use it to the end.

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use axum::http::HeaderValue;
use foldhash::HashMap;
use foldhash::fast::FixedState;
use futures_util::future::BoxFuture;

use crate::config::{Backend, Config, Deployment, Key};
use crate::error::GatewayError;
use crate::health::{AliasLive, BackendLive, DeploymentLive, Lease, LiveState, LiveView};
use crate::limits::Limits;
use crate::metering::cost::{Counterfactual, Rate};
use crate::metrics::DeploymentSeries;
use crate::openai::unix_now;
use crate::providers::{self, Provider, UpstreamCall, UpstreamReply};

use super::plan_table::PlanRow;

pub struct Snapshot {
    pub config: Config,
    /// When this snapshot was built, in unix seconds (`created` of models).
    pub created: u64,
    /// `config.version` as the header every inference answer carries.
    pub version_header: Option<HeaderValue>,
    models: HashMap<String, usize>,
    keys: HashMap<[u8; 32], usize>,
    /// Per backend, in config order.
    providers: Vec<Arc<dyn Provider>>,
    live: LiveView,
    /// Per model, per deployment: what an attempt needs, resolved once.
    resolved: Vec<Vec<Resolved>>,
    /// Per model, per deployment: what a plan reads, packed.
    plan_tables: Vec<Box<[PlanRow]>>,
    /// Per model: its per-token deployments, for counterfactual costs.
    counterfactuals: Vec<Arc<[Counterfactual]>>,
    /// The keys with a budget, in config order: the fleet's exchange
    /// reads their spend.
    pub budgeted: Arc<[String]>,
}

/// One deployment with everything serving it looks up, resolved when the
/// snapshot is built: requests index it, never search by name.
pub struct Resolved {
    /// Index of its backend in `config.backends`.
    pub backend: usize,
    pub provider: Arc<dyn Provider>,
    /// What its tokens cost.
    pub rate: Rate,
    pub health: Arc<DeploymentLive>,
    pub backend_health: Arc<BackendLive>,
    /// Its metric series, resolved as requests first record to them.
    pub series: Arc<DeploymentSeries>,
}

/// The provider of every backend of an offline config (validated without
/// its secrets), which `tollgate explain` plans with but never calls.
struct Offline;

impl Provider for Offline {
    fn send<'a>(
        &'a self,
        _: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        Box::pin(async {
            Err(GatewayError::internal(
                "this config was validated without its secrets; it cannot serve",
            ))
        })
    }
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
        let previous_backends: HashMap<&str, usize> = previous
            .map(|p| {
                p.config
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.name.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let unchanged = |b: &Backend| {
            let previous = previous?;
            let &i = previous_backends.get(b.name.as_str())?;
            (previous.config.backends[i] == *b).then(|| previous.providers[i].clone())
        };
        let providers = config
            .backends
            .iter()
            .map(|b| match unchanged(b) {
                Some(provider) => Ok(provider),
                // Without its credentials a backend cannot be called.
                None if config.offline => Ok(Arc::new(Offline) as Arc<dyn Provider>),
                None => providers::build(b),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let backend_index: HashMap<&str, usize> = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), i))
            .collect();
        let live = live.view(&config);
        // Validation guarantees every deployment's backend exists.
        let resolve = |m: usize, d: usize, deployment: &Deployment| {
            let backend = backend_index[deployment.backend.as_str()];
            Resolved {
                backend,
                provider: providers[backend].clone(),
                rate: Rate::of(deployment, &config.backends[backend]),
                health: live.deployments[m][d].clone(),
                backend_health: live.backends[backend].clone(),
                series: Arc::default(),
            }
        };
        let resolved: Vec<Vec<Resolved>> = config
            .models
            .iter()
            .enumerate()
            .map(|(m, model)| {
                model
                    .deployments
                    .iter()
                    .enumerate()
                    .map(|(d, deployment)| resolve(m, d, deployment))
                    .collect()
            })
            .collect();
        let plan_tables = config
            .models
            .iter()
            .zip(&resolved)
            .map(|(m, resolved)| {
                m.deployments
                    .iter()
                    .zip(resolved)
                    .map(|(d, r)| {
                        PlanRow::new(
                            d,
                            &config.backends[r.backend],
                            &config.policy,
                            r.rate,
                            FixedState::with_seed(0).hash_one(d.name.as_bytes()),
                            &r.health,
                            &r.backend_health,
                        )
                    })
                    .collect()
            })
            .collect();
        let counterfactuals = config
            .models
            .iter()
            .zip(&resolved)
            .map(|(m, resolved)| {
                m.deployments
                    .iter()
                    .zip(resolved)
                    .filter(|(_, r)| r.rate.per_token)
                    .map(|(d, r)| Counterfactual {
                        deployment: d.name.clone(),
                        rate: r.rate,
                        series: OnceLock::new(),
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            created: unix_now(),
            version_header: HeaderValue::from_str(&config.version).ok(),
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
            providers,
            live,
            resolved,
            plan_tables,
            counterfactuals,
            budgeted: (config.keys.iter())
                .filter(|k| k.budget != crate::config::Budget::default())
                .map(|k| k.name.clone())
                .collect(),
            config,
        })
    }

    /// A deployment of a model, resolved.
    pub fn resolved(&self, model: usize, deployment: usize) -> &Resolved {
        &self.resolved[model][deployment]
    }

    /// What a plan reads of each of a model's deployments, in config order.
    pub fn plan_table(&self, model: usize) -> &[PlanRow] {
        &self.plan_tables[model]
    }

    /// The backend at an index of `config.backends`.
    pub fn backend(&self, index: usize) -> &Backend {
        &self.config.backends[index]
    }

    pub fn counterfactuals(&self, model: usize) -> &Arc<[Counterfactual]> {
        &self.counterfactuals[model]
    }

    pub fn model_index(&self, alias: &str) -> Option<usize> {
        self.models.get(alias).copied()
    }

    pub fn live(&self) -> &LiveView {
        &self.live
    }

    pub fn alias_live(&self, model: usize) -> &Arc<AliasLive> {
        &self.live.aliases[model]
    }

    /// Counts a request against a deployment while the lease lives.
    pub fn lease(&self, model: usize, deployment: usize) -> Lease {
        let r = self.resolved(model, deployment);
        Lease::new(
            r.health.clone(),
            r.backend_health.clone(),
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

    /// Aliases a key may use (all of them without a key), in config order.
    pub fn aliases_for<'a>(&'a self, key: Option<&'a Key>) -> impl Iterator<Item = &'a str> + 'a {
        self.config
            .models
            .iter()
            .map(|m| m.alias.as_str())
            .filter(move |alias| key.is_none_or(|k| k.models.allows(alias)))
    }
}
