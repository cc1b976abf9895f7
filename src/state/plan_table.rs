//! What a routing plan reads of each deployment, packed in one row a
//! deployment when the snapshot is built: its policy fields as bits, its
//! prices as the ranking computes with them, its tier and weight, and its
//! live state's handles and flags. A plan over an alias reads its rows in
//! order, rather than each deployment's config, its backend's config and
//! its live state, each an allocation of its own.

use std::sync::Arc;

use crate::config::{Backend, Deployment, Policy};
use crate::health::{BackendLive, DeploymentLive, LiveFlags, LoadBasis};
use crate::metering::cost::Rate;
use crate::openai::Endpoint;

/// One deployment, as a plan reads it.
pub struct PlanRow {
    /// What it offers of what a request may need.
    pub offers: Offers,
    pub context_window: u32,
    /// Bit `i` set: residency rule `i` (of the first 64) allows its
    /// backend's region.
    pub residency: u64,
    /// Its live state's flags: none set, it may be taken as it is.
    pub flags: LiveFlags,
    /// Priced by the GPU-hour, so its marginal cost follows its load.
    pub self_hosted: bool,
    pub tier: u32,
    pub weight: u32,
    /// Pico-dollars per token, in floating point as the ranking uses them.
    pub input_price: f64,
    pub cached_input_price: f64,
    pub output_price: f64,
    /// Its configured output price in USD per million tokens (spillover's
    /// price cap).
    pub output_usd_per_mtok: f64,
    /// What its backend's load is measured against.
    pub load: LoadBasis,
    /// A hash of its name, which affinity weighs sessions by.
    pub name_hash: u64,
    pub live: Arc<DeploymentLive>,
    pub backend_live: Arc<BackendLive>,
}

impl PlanRow {
    pub fn new(
        deployment: &Deployment,
        backend: &Backend,
        policy: &Policy,
        rate: Rate,
        name_hash: u64,
        live: &Arc<DeploymentLive>,
        backend_live: &Arc<BackendLive>,
    ) -> Self {
        let region = backend.region.as_ref();
        let residency = policy
            .residency
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, rule)| region.is_some_and(|r| rule.backend_regions.contains(r)))
            .fold(0, |mask, (i, _)| mask | 1 << i);
        Self {
            offers: Offers::of(deployment),
            context_window: deployment.context_window,
            residency,
            flags: live.flags.clone(),
            self_hosted: backend.self_hosted.is_some(),
            tier: deployment.tier,
            weight: deployment.weight,
            input_price: rate.input as f64,
            cached_input_price: rate.cached_input as f64,
            output_price: rate.output as f64,
            output_usd_per_mtok: deployment.price.output_micro_usd_per_mtok as f64 / 1e6,
            load: LoadBasis::of(backend),
            name_hash,
            live: live.clone(),
            backend_live: backend_live.clone(),
        }
    }
}

/// What a deployment offers of what a request may need, one bit each, so
/// the policy filters' common case is one mask test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offers(u16);

impl Offers {
    pub const NONE: Self = Self(0);
    pub const CHAT: Self = Self(1);
    pub const COMPLETIONS: Self = Self(1 << 1);
    pub const EMBEDDINGS: Self = Self(1 << 2);
    pub const IMAGE: Self = Self(1 << 3);
    pub const AUDIO: Self = Self(1 << 4);
    pub const VIDEO: Self = Self(1 << 5);
    pub const TOOLS: Self = Self(1 << 6);
    /// Not a multimodal Llama model: may serve users in the EU.
    pub const EU_LLAMA_LICENCE: Self = Self(1 << 7);
    /// Offered by none: a request that needs it is checked in full.
    pub const NEVER: Self = Self(1 << 8);

    pub fn of(deployment: &Deployment) -> Self {
        let d = deployment;
        [
            (Self::CHAT, d.endpoints.chat),
            (Self::COMPLETIONS, d.endpoints.completions),
            (Self::EMBEDDINGS, d.endpoints.embeddings),
            (Self::IMAGE, d.modalities.image),
            (Self::AUDIO, d.modalities.audio),
            (Self::VIDEO, d.modalities.video),
            (Self::TOOLS, d.tools),
            (Self::EU_LLAMA_LICENCE, !(d.multimodal && d.is_llama())),
        ]
        .into_iter()
        .filter(|(_, offered)| *offered)
        .fold(Self::NONE, |offers, (bit, _)| offers.with(bit))
    }

    /// The bit of an endpoint.
    pub fn endpoint(endpoint: Endpoint) -> Self {
        match endpoint {
            Endpoint::Chat => Self::CHAT,
            Endpoint::Completions => Self::COMPLETIONS,
            Endpoint::Embeddings => Self::EMBEDDINGS,
        }
    }

    /// These and `other`'s.
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// `other` only when `when`.
    pub const fn with_if(self, other: Self, when: bool) -> Self {
        if when { self.with(other) } else { self }
    }

    /// Whether every one of `needed` is offered.
    pub fn covers(self, needed: Self) -> bool {
        self.0 & needed.0 == needed.0
    }
}
