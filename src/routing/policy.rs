//! The policy filters, run before any scoring: data residency, the Llama
//! licence in the EU, the endpoint, modality, context window and tools.

use crate::config::{Backend, Deployment, Policy, Residency};
use crate::openai::Endpoint;
use crate::state::{Offers, PlanRow};

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
                facts.window_tokens(),
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
    [
        (facts.image, "image"),
        (facts.audio, "audio"),
        (facts.video, "video"),
    ]
    .into_iter()
    .filter_map(|(carried, kind)| carried.then_some(kind))
    .collect()
}

/// What policy makes of a request's region, read once per plan rather
/// than once per deployment: the residency rule that limits it, whether
/// it is in the EU, and what the request needs of a deployment as bits.
pub struct Scope<'a> {
    facts: &'a RequestFacts,
    region: Option<&'a str>,
    residency: Option<&'a Residency>,
    eu: bool,
    /// What a deployment must offer.
    needs: Offers,
    /// The residency rule's bit in a row's `residency`, 0 without one.
    residency_bit: u64,
    /// Prompt and requested output, against a context window.
    tokens: u64,
}

impl<'a> Scope<'a> {
    pub fn of(policy: &'a Policy, facts: &'a RequestFacts) -> Self {
        let region = facts.region.as_deref();
        let rule = region.and_then(|r| {
            policy
                .residency
                .iter()
                .position(|rule| rule.request_region == r)
        });
        let eu = policy.llama_eu_multimodal_block && region.is_some_and(|r| policy.is_eu(r));
        // Rows hold the verdicts of the first 64 residency rules; one past
        // those is checked in full.
        let (residency_bit, beyond_rows) = match rule {
            Some(i) if i < 64 => (1 << i, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        Self {
            facts,
            region,
            residency: rule.map(|i| &policy.residency[i]),
            eu,
            needs: Offers::endpoint(facts.endpoint)
                .with_if(Offers::IMAGE, facts.image)
                .with_if(Offers::AUDIO, facts.audio)
                .with_if(Offers::VIDEO, facts.video)
                .with_if(Offers::TOOLS, facts.tools)
                .with_if(Offers::EU_LLAMA_LICENCE, eu)
                .with_if(Offers::NEVER, beyond_rows),
            residency_bit,
            tokens: facts.window_tokens() + facts.max_output_tokens.unwrap_or(0),
        }
    }

    /// Whether policy lets the deployment of `row` serve the request, as
    /// far as its row tells; when it does not, [`Scope::check`] says why
    /// (or, past the rows' residency rules, that it may).
    pub fn admits(&self, row: &PlanRow) -> bool {
        row.offers.covers(self.needs)
            && self.tokens <= u64::from(row.context_window)
            && row.residency & self.residency_bit == self.residency_bit
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
        if (facts.image && !m.image) || (facts.audio && !m.audio) || (facts.video && !m.video) {
            return Err((
                Rule::Modality,
                format!("does not accept {} input", media_kinds(facts).join(" or ")),
            ));
        }
        let needed = self.tokens;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::LiveState;
    use crate::state::Snapshot;

    /// Deployments that differ in every field policy reads, on backends in
    /// two regions and none, under `rules` residency rules (the first for
    /// "eu", the others for "r1", "r2", …).
    fn snapshot(rules: usize) -> Snapshot {
        let mut text = String::new();
        for (name, region) in [
            ("eu", "region = \"eu-west-1\"\n"),
            ("us", "region = \"us-east-1\"\n"),
            ("unplaced", ""),
        ] {
            text += &format!("[[backends]]\nname = \"{name}\"\nkind = \"simulated\"\n{region}");
        }
        text += "[[models]]\nalias = \"m\"\n";
        let kinds = [
            "licence = \"llama\"\nmultimodal = true\nmodalities = [\"text\", \"image\"]\n",
            "multimodal = true\nmodalities = [\"text\", \"image\", \"audio\"]\ntools = true\n",
            "multimodal = true\nmodalities = [\"text\", \"video\"]\n",
            "endpoints = [\"embeddings\"]\n",
            "endpoints = [\"completions\"]\ntools = true\n",
            "",
        ];
        for backend in ["eu", "us", "unplaced"] {
            for (k, kind) in kinds.iter().enumerate() {
                text += &format!(
                    "[[models.deployments]]\nname = \"{backend}{k}\"\nbackend = \"{backend}\"\nmodel = \"x\"\ncontext_window = {}\n{kind}",
                    1000 * (k + 1)
                );
            }
        }
        text += "[policy]\neu_regions = [\"eu\"]\n";
        text +=
            "[[policy.residency]]\nrequest_region = \"eu\"\nbackend_regions = [\"eu-west-1\"]\n";
        for i in 1..rules {
            text += &format!(
                "[[policy.residency]]\nrequest_region = \"r{i}\"\nbackend_regions = [\"us-east-1\"]\n"
            );
        }
        let config = crate::config::parse(&text, &|_| None).expect("valid config");
        Snapshot::build(config, &LiveState::default()).expect("builds")
    }

    /// Every request of every kind from `regions`, against every row.
    fn assert_rows_agree(snapshot: &Snapshot, regions: &[&str]) {
        let model = &snapshot.config.models[0];
        for region in regions.iter().map(|r| Some(r.to_string())).chain([None]) {
            for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
                for (image, audio, video, tools, input_tokens) in [
                    (false, false, false, false, 10),
                    (true, false, false, false, 10),
                    (false, true, false, true, 10),
                    (false, false, true, false, 10),
                    (true, false, true, false, 10),
                    (false, false, false, false, 2500),
                ] {
                    let facts = RequestFacts {
                        endpoint,
                        region: region.clone(),
                        image,
                        audio,
                        video,
                        tools,
                        input_tokens,
                        ..RequestFacts::default()
                    };
                    let scope = Scope::of(&snapshot.config.policy, &facts);
                    for (i, row) in snapshot.plan_table(0).iter().enumerate() {
                        let backend = snapshot.backend(snapshot.resolved(0, i).backend);
                        let checked = scope.check(&model.deployments[i], backend);
                        if scope.admits(row) {
                            assert!(checked.is_ok(), "{facts:?} {i}: {checked:?}");
                        } else if scope.residency_bit != 0 || !scope.needs.covers(Offers::NEVER) {
                            assert!(checked.is_err(), "{facts:?} {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_admits_what_the_full_check_admits_and_no_more() {
        assert_rows_agree(&snapshot(2), &["eu", "r1", "us"]);
    }

    #[test]
    fn a_video_is_served_only_where_video_is_accepted() {
        let s = snapshot(1);
        let facts = RequestFacts {
            region: Some("us".into()),
            video: true,
            ..RequestFacts::default()
        };
        let scope = Scope::of(&s.config.policy, &facts);
        let deployments = &s.config.models[0].deployments;
        let admitted: Vec<&str> = s
            .plan_table(0)
            .iter()
            .zip(deployments)
            .filter(|(row, _)| scope.admits(row))
            .map(|(_, d)| d.name.as_str())
            .collect();
        assert_eq!(admitted, ["eu2", "us2", "unplaced2"]);
        let images = s.resolved(0, 0).backend;
        assert_eq!(
            scope.check(&deployments[0], s.backend(images)),
            Err((Rule::Modality, "does not accept video input".into()))
        );
        assert_eq!(
            Rule::Modality.explain(&s.config.policy, &facts),
            "no deployment accepts video input"
        );
    }

    #[test]
    fn past_the_rows_residency_rules_the_full_check_decides() {
        let s = snapshot(66);
        assert_rows_agree(&s, &["r63", "r64", "r65"]);
        let facts = RequestFacts {
            region: Some("r65".into()),
            ..RequestFacts::default()
        };
        let scope = Scope::of(&s.config.policy, &facts);
        assert!(s.plan_table(0).iter().all(|row| !scope.admits(row)));
    }
}
