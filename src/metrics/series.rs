//! Handles to the series a deployment's requests record to, resolved on
//! first use and kept with the snapshot's deployment: a request then
//! records without hashing its label values (a lookup costs about 260
//! instructions, and a request made about ten). Series of other label
//! values (a status other than 200, a key with series of its own) are
//! looked up as before.

use std::sync::OnceLock;

use prometheus::{Counter, Histogram, IntCounter};

/// The inbound APIs (`Api::name`), in the order of their slots.
const APIS: [&str; 5] = ["chat", "completions", "embeddings", "messages", "responses"];
/// Token series per API: input and output, each reported and estimated.
const TOKEN_KINDS: usize = 4;

/// One deployment's series: each labelled with its alias, backend or
/// name, as the metric takes them.
#[derive(Default)]
pub struct DeploymentSeries {
    pub time_to_first_token: OnceLock<Histogram>,
    pub time_between_tokens: OnceLock<Histogram>,
    pub request_duration: OnceLock<Histogram>,
    pub gateway_overhead: OnceLock<Histogram>,
    /// Upstream attempts that answered (`outcome="ok"`).
    pub upstream_ok: OnceLock<IntCounter>,
    /// Cost of keys without series of their own (`key="(other)"`).
    pub cost_other_keys: OnceLock<Counter>,
    /// `routing_decisions` of the plans this deployment heads, for the
    /// reason it first headed one for (its strategy's, most often the
    /// same every time).
    routing_decision: OnceLock<(&'static str, IntCounter)>,
    tokens: [OnceLock<IntCounter>; APIS.len() * TOKEN_KINDS],
    /// Requests answered 200.
    answered: [OnceLock<IntCounter>; APIS.len()],
}

impl DeploymentSeries {
    /// The slot of `tokens{api, direction, estimated}`.
    pub fn tokens(
        &self,
        api: &str,
        output: bool,
        estimated: bool,
    ) -> Option<&OnceLock<IntCounter>> {
        let kind = usize::from(output) * 2 + usize::from(estimated);
        self.tokens.get(api_slot(api)? * TOKEN_KINDS + kind)
    }

    /// The slot of `requests{api, status}`, for a request answered 200.
    pub fn requests(&self, api: &str, status: u16) -> Option<&OnceLock<IntCounter>> {
        if status != 200 {
            return None;
        }
        self.answered.get(api_slot(api)?)
    }

    /// Counts a plan this deployment heads for `reason`: through its slot
    /// when the reason is the one it holds, else looked up now.
    pub fn routing_decision(&self, reason: &'static str, lookup: impl Fn() -> IntCounter) {
        let (held, counter) = self.routing_decision.get_or_init(|| (reason, lookup()));
        if *held == reason {
            counter.inc();
        } else {
            lookup().inc();
        }
    }
}

fn api_slot(api: &str) -> Option<usize> {
    APIS.iter().position(|name| *name == api)
}

/// Records to a series through its slot, which `lookup` fills the first
/// time; without a slot, through a handle looked up now.
pub fn record<T>(slot: Option<&OnceLock<T>>, lookup: impl FnOnce() -> T, record: impl FnOnce(&T)) {
    match slot {
        Some(slot) => record(slot.get_or_init(lookup)),
        None => record(&lookup()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_and_token_kind_has_a_slot_of_its_own() {
        let series = DeploymentSeries::default();
        let mut slots = Vec::new();
        for api in APIS {
            for (output, estimated) in [(false, false), (false, true), (true, false), (true, true)]
            {
                slots.push(std::ptr::from_ref(
                    series.tokens(api, output, estimated).unwrap(),
                ));
            }
        }
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), APIS.len() * TOKEN_KINDS);
        assert!(series.tokens("batch", false, false).is_none());
        assert!(series.requests("chat", 200).is_some());
        assert!(series.requests("chat", 429).is_none());
    }

    #[test]
    fn routing_decisions_count_under_their_own_reason_whichever_the_slot_holds() {
        let vec =
            prometheus::IntCounterVec::new(prometheus::Opts::new("decisions", "help"), &["reason"])
                .unwrap();
        let series = DeploymentSeries::default();
        for reason in ["cheapest", "cheapest", "affinity", "cheapest", "exploring"] {
            series.routing_decision(reason, || vec.with_label_values(&[reason]));
        }
        let count = |reason: &str| vec.with_label_values(&[reason]).get();
        assert_eq!(
            (count("cheapest"), count("affinity"), count("exploring")),
            (3, 1, 1)
        );
    }
}
