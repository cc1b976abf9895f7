//! What one request holds while it is served: a lease on its deployment
//! and backend, and an attempt admitted by the deployment's circuit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{AliasLive, BackendLive, DeploymentLive};
use crate::config::RoutingSettings;
use crate::error::{ErrorKind, GatewayError};
use crate::metering::Settle;
use crate::openai::Usage;

/// Counts a request against its deployment and backend for as long as it
/// lives: from the upstream call until the response has been sent.
pub struct Lease {
    deployment: Arc<DeploymentLive>,
    backend: Arc<BackendLive>,
    alias: Arc<AliasLive>,
}

impl Lease {
    pub fn new(
        deployment: Arc<DeploymentLive>,
        backend: Arc<BackendLive>,
        alias: Arc<AliasLive>,
    ) -> Self {
        deployment.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            deployment,
            backend,
            alias,
        }
    }
}

impl Settle for Lease {
    /// Charges the deployment's token quota as output is generated.
    fn generated(&self, tokens: u64, now: Instant) {
        self.deployment.quota.limits.charge(tokens, now);
    }

    /// Counts the tokens served by the backend, teaches the alias how long
    /// its answers run and the deployment how much of a prompt its cache
    /// holds (for cost estimates) when the count is the upstream's own,
    /// and settles the deployment's token quota to what
    /// the request used.
    fn settle(&self, charged: u64, usage: &Usage, reported: bool, now: Instant) {
        // A prompt token read from the engine's prefix cache took no GPU
        // time, and is charged nothing.
        self.backend.tokens_served.fetch_add(
            usage.total_tokens.saturating_sub(usage.cached_tokens()),
            Ordering::Relaxed,
        );
        if reported {
            self.alias.record_output_tokens(usage.completion_tokens);
            self.deployment.record_cache_hit(usage);
        }
        self.deployment
            .quota
            .limits
            .settle(charged, usage.total_tokens, now);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One try at one deployment, admitted by its circuit. It ends in
/// [`Attempt::succeeded`], [`Attempt::failed`] or, for the loser of a
/// hedge, [`Attempt::cancelled`]; dropped otherwise (the
/// client left first), it frees a half-open circuit's probe slot.
pub struct Attempt {
    deployment: Option<Arc<DeploymentLive>>,
    probe: bool,
    started: Instant,
}

impl Attempt {
    /// `None` when the deployment's circuit does not admit a request now.
    pub fn begin(deployment: &Arc<DeploymentLive>) -> Option<Self> {
        let started = Instant::now();
        let probe = deployment.circuit.admit(started)?;
        Some(Self {
            deployment: Some(deployment.clone()),
            probe,
            started,
        })
    }

    /// When the attempt began, as its circuit admitted it.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn take(&mut self) -> Arc<DeploymentLive> {
        self.deployment.take().expect("an attempt ends once")
    }

    /// The upstream answered (the first chunk, or the whole body): the
    /// circuit closes and the latency counts.
    pub fn succeeded(mut self, stream: bool) {
        let d = self.take();
        d.circuit.on_success();
        d.answered();
        d.record_latency(stream, self.started.elapsed());
    }

    /// The upstream failed before the client saw a byte. A 429 cools the
    /// deployment for its `retry-after`, or for a backoff of the gateway's
    /// when it gave none, which the client is then told to wait; other
    /// upstream failures count against the circuit; an upstream that
    /// rejected the request itself (a 4xx) is healthy.
    pub fn failed(mut self, error: &mut GatewayError, settings: &RoutingSettings) {
        let d = self.take();
        let now = Instant::now();
        match error.kind() {
            ErrorKind::UpstreamRateLimited => {
                let wait = d.rate_limited(error.wait(), self.started, now);
                error.or_wait(wait);
                d.record_failure(error.message());
                d.circuit.on_abandon(self.probe);
            }
            kind if kind.upstream_at_fault() => {
                d.record_failure(error.message());
                d.circuit.on_failure(self.probe, now, settings);
                if matches!(d.circuit.view(now), super::CircuitView::Open { .. }) {
                    d.circuit_opened();
                }
            }
            _ => d.circuit.on_success(),
        }
    }

    /// Another deployment answered first and this attempt is dropped
    /// before its first byte: its wait so far counts towards the
    /// deployment's first-byte times, as the least it would have taken.
    pub fn cancelled(mut self, stream: bool) {
        let d = self.take();
        d.first_bytes.record(stream, self.started.elapsed());
        d.circuit.on_abandon(self.probe);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(d) = &self.deployment {
            d.circuit.on_abandon(self.probe);
        }
    }
}
