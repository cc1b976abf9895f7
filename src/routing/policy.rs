//! The policy filters, run before any scoring: data residency, the Llama
//! licence in the EU, the endpoint, modality, context window and tools.

use crate::config::{Backend, Deployment, Policy, Residency};
use crate::openai::Endpoint;

use super::facts::RequestFacts;

/// A policy rule; its name labels metrics and explain output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    Residency,
    LlamaEuMultimodal,
    Endpoint,
    Modality,
    ContextWindow,
    Tools,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Residency => "residency",
            Self::LlamaEuMultimodal => "llama_eu_multimodal",
            Self::Endpoint => "endpoint",
            Self::Modality => "modality",
            Self::ContextWindow => "context_window",
            Self::Tools => "tools",
        }
    }

    /// What the rule means, for a client whose request no deployment may
    /// serve.
    pub fn explain(self, policy: &Policy, facts: &RequestFacts) -> String {
        let region = facts.region.as_deref().unwrap_or_default();
        match self {
            Self::Residency => format!(
                "requests from region \"{region}\" may be served only in {} (policy.residency)",
                policy
                    .residency_for(region)
                    .map(|r| r.backend_regions.join(", "))
                    .unwrap_or_default()
            ),
            Self::LlamaEuMultimodal => "the Llama licence does not allow multimodal Llama models \
                 to serve users in the EU, even for text-only requests"
                .into(),
            Self::Endpoint => format!("no deployment serves {}", facts.endpoint.name()),
            Self::Modality => format!(
                "no deployment accepts {} input",
                media_kinds(facts).join(" or ")
            ),
            Self::ContextWindow => format!(
                "about {} input tokens{} do not fit any deployment's context window",
                facts.input_tokens,
                facts
                    .max_output_tokens
                    .map(|m| format!(" plus {m} requested output tokens"))
                    .unwrap_or_default()
            ),
            Self::Tools => "no deployment supports tools".into(),
        }
    }
}

fn media_kinds(facts: &RequestFacts) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    if facts.image {
        kinds.push("image");
    }
    if facts.audio {
        kinds.push("audio");
    }
    kinds
}

/// What policy makes of a request's region, read once per plan rather
/// than once per deployment: the residency rule that limits it, and
/// whether it is in the EU.
pub struct Scope<'a> {
    facts: &'a RequestFacts,
    region: Option<&'a str>,
    residency: Option<&'a Residency>,
    eu: bool,
}

impl<'a> Scope<'a> {
    pub fn of(policy: &'a Policy, facts: &'a RequestFacts) -> Self {
        let region = facts.region.as_deref();
        Self {
            facts,
            region,
            residency: region.and_then(|r| policy.residency_for(r)),
            eu: policy.llama_eu_multimodal_block && region.is_some_and(|r| policy.is_eu(r)),
        }
    }

    /// The first rule that keeps `deployment` on `backend` from serving
    /// the request, with the reason for this deployment.
    pub fn check(&self, deployment: &Deployment, backend: &Backend) -> Result<(), (Rule, String)> {
        let facts = self.facts;
        let region = self.region.unwrap_or_default();
        if let Some(rule) = self.residency {
            let allowed = backend
                .region
                .as_ref()
                .is_some_and(|r| rule.backend_regions.contains(r));
            if !allowed {
                return Err((
                    Rule::Residency,
                    match &backend.region {
                        Some(r) => {
                            format!(
                                "backend region \"{r}\" may not serve requests from \"{region}\""
                            )
                        }
                        None => format!(
                            "backend has no region, and requests from \"{region}\" must stay in named regions"
                        ),
                    },
                ));
            }
        }
        if self.eu && deployment.multimodal && deployment.is_llama() {
            return Err((
                Rule::LlamaEuMultimodal,
                format!(
                    "multimodal Llama model; its licence excludes users in the EU (\"{region}\")"
                ),
            ));
        }
        if !serves(deployment, facts.endpoint) {
            let serves: Vec<&str> = deployment.endpoints.names().collect();
            return Err((
                Rule::Endpoint,
                format!(
                    "serves {}, not {}",
                    serves.join(" and "),
                    facts.endpoint.name()
                ),
            ));
        }
        let m = &deployment.modalities;
        if (facts.image && !m.image) || (facts.audio && !m.audio) {
            return Err((
                Rule::Modality,
                format!("does not accept {} input", media_kinds(facts).join(" or ")),
            ));
        }
        let needed = facts.input_tokens + facts.max_output_tokens.unwrap_or(0);
        if needed > u64::from(deployment.context_window) {
            return Err((
                Rule::ContextWindow,
                format!(
                    "about {needed} tokens exceed its context window of {}",
                    deployment.context_window
                ),
            ));
        }
        if facts.tools && !deployment.tools {
            return Err((Rule::Tools, "does not support tools".into()));
        }
        Ok(())
    }
}

/// Whether `deployment` lists `endpoint` among those it serves.
pub fn serves(deployment: &Deployment, endpoint: Endpoint) -> bool {
    let e = deployment.endpoints;
    match endpoint {
        Endpoint::Chat => e.chat,
        Endpoint::Completions => e.completions,
        Endpoint::Embeddings => e.embeddings,
    }
}
