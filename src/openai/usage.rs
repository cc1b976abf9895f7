//! Token usage: the `Usage` the gateway meters and writes, and usage as
//! upstreams report it — read loosely enough that `10.0` and a missing
//! `total_tokens` pass, and strictly enough that a figure no count can be
//! (negative, fractional, a string) is refused rather than wrapped.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// How many prompt tokens the upstream served from its cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
    /// Prompt tokens written to the upstream's cache (Bedrock reports
    /// them; OpenAI's chat usage has no such field, so it is written only
    /// when there are some).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .map_or(0, |d| d.cached_tokens.min(self.prompt_tokens))
    }

    /// Prompt tokens written to the cache, never more than the prompt
    /// holds besides those read from it.
    pub fn cache_write_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| {
            d.cache_write_tokens
                .min(self.prompt_tokens - self.cached_tokens())
        })
    }

    /// Whether the counts are ones a deployment can have served: neither
    /// side larger than `bound` allows.
    pub fn fits(&self, bound: UsageBound) -> bool {
        self.prompt_tokens <= bound.prompt && self.completion_tokens <= bound.completion
    }
}

/// The most tokens each side of a believable usage report holds: a
/// context window for each prompt of the request, and for each answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBound {
    pub prompt: u64,
    pub completion: u64,
}

impl UsageBound {
    pub const NONE: Self = Self {
        prompt: u64::MAX,
        completion: u64::MAX,
    };

    pub fn new(context_window: u64, prompts: u64, answers: u64) -> Self {
        Self {
            prompt: context_window.saturating_mul(prompts),
            completion: context_window.saturating_mul(answers),
        }
    }
}

/// Why an upstream's usage is not used (the request's usage is then
/// estimated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFault {
    /// A count that is negative, fractional or not a number.
    NotACount,
    /// Neither the prompt nor the completion count, nor a total to derive
    /// one from.
    Missing,
    /// More tokens than the deployment's context window holds.
    OverContextWindow,
}

impl UsageFault {
    /// The `reason` label of `tollgate_usage_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotACount => "not_a_count",
            Self::Missing => "missing",
            Self::OverContextWindow => "over_context_window",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::NotACount => "a token count is negative, fractional or not a number",
            Self::Missing => "the prompt or completion token count is missing",
            Self::OverContextWindow => {
                "a token count is larger than the deployment's context window"
            }
        }
    }
}

/// `usage` as an upstream wrote it.
#[derive(Debug, Default, Deserialize)]
pub struct ReportedUsage {
    #[serde(default)]
    prompt_tokens: Option<Count>,
    #[serde(default)]
    completion_tokens: Option<Count>,
    #[serde(default)]
    total_tokens: Option<Count>,
    #[serde(default)]
    prompt_tokens_details: Option<ReportedDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct ReportedDetails {
    #[serde(default)]
    cached_tokens: Option<Count>,
    #[serde(default)]
    cache_write_tokens: Option<Count>,
}

impl ReportedUsage {
    /// The usage, with a missing count derived from `total_tokens`, and
    /// `total_tokens` always the sum of the two.
    pub fn read(&self) -> Result<Usage, UsageFault> {
        let prompt = Count::read(self.prompt_tokens)?;
        let completion = Count::read(self.completion_tokens)?;
        let total = Count::read(self.total_tokens)?;
        let (prompt, completion) = match (prompt, completion, total) {
            (Some(p), Some(c), _) => (p, c),
            (Some(p), None, Some(t)) if t >= p => (p, t - p),
            (None, Some(c), Some(t)) if t >= c => (t - c, c),
            _ => return Err(UsageFault::Missing),
        };
        let details = match &self.prompt_tokens_details {
            Some(details) => {
                let cached = Count::read(details.cached_tokens)?;
                let written = Count::read(details.cache_write_tokens)?;
                (cached.is_some() || written.is_some()).then(|| PromptTokensDetails {
                    cached_tokens: cached.unwrap_or(0),
                    cache_write_tokens: written.unwrap_or(0),
                })
            }
            None => None,
        };
        Ok(Usage {
            prompt_tokens_details: details,
            ..Usage::new(prompt, completion)
        })
    }
}

/// A token count as written: `Some` when it is a whole number from 0 to
/// 2^64 − 1, written as an integer or as a float (`10.0`).
#[derive(Debug, Clone, Copy)]
struct Count(Option<u64>);

impl Count {
    fn read(count: Option<Count>) -> Result<Option<u64>, UsageFault> {
        count
            .map(|Count(n)| n.ok_or(UsageFault::NotACount))
            .transpose()
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
        Ok(Count(Some(n)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(n).ok()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Count, E> {
        // 2^64 is the first float past u64::MAX.
        let whole = n >= 0.0 && n.fract() == 0.0 && n < 18_446_744_073_709_551_616.0;
        Ok(Count(whole.then_some(n as u64)))
    }

    fn visit_str<E>(self, _: &str) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Usage, UsageFault> {
        serde_json::from_str::<ReportedUsage>(json).unwrap().read()
    }

    #[test]
    fn integral_floats_and_a_missing_total_are_accepted() {
        assert_eq!(
            read(r#"{"prompt_tokens":10.0,"completion_tokens":5}"#),
            Ok(Usage::new(10, 5))
        );
        assert_eq!(
            read(r#"{"prompt_tokens":10,"total_tokens":15.0}"#),
            Ok(Usage::new(10, 5)),
            "the completion derived from the total"
        );
        assert_eq!(
            read(r#"{"prompt_tokens":1,"completion_tokens":2,"total_tokens":99}"#),
            Ok(Usage::new(1, 2)),
            "the total is the sum"
        );
        let cached = read(
            r#"{"prompt_tokens":8,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":4}}"#,
        );
        assert_eq!(cached.unwrap().cached_tokens(), 4);
    }

    #[test]
    fn figures_that_are_not_counts_are_refused_not_wrapped() {
        for bad in [
            r#"{"prompt_tokens":-1,"completion_tokens":5}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":5}"#,
            r#"{"prompt_tokens":"10","completion_tokens":5}"#,
            r#"{"prompt_tokens":1e300,"completion_tokens":5}"#,
            r#"{"prompt_tokens":{"n":1},"completion_tokens":[5]}"#,
            r#"{"prompt_tokens":1,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-2}}"#,
        ] {
            assert_eq!(read(bad), Err(UsageFault::NotACount), "{bad}");
        }
        for missing in [
            r#"{}"#,
            r#"{"prompt_tokens":1}"#,
            r#"{"completion_tokens":null,"prompt_tokens":9,"total_tokens":3}"#,
        ] {
            assert_eq!(read(missing), Err(UsageFault::Missing), "{missing}");
        }
        let huge = read(r#"{"prompt_tokens":1,"completion_tokens":18446744073709551615}"#).unwrap();
        assert_eq!(huge.total_tokens, u64::MAX, "saturates");
        assert!(!huge.fits(UsageBound::new(128_000, 1, 1)));
        // A batch of prompts, each answered twice, may count up to a
        // window for each.
        let batch = read(r#"{"prompt_tokens":300000,"completion_tokens":500000}"#).unwrap();
        assert!(!batch.fits(UsageBound::new(128_000, 2, 4)));
        assert!(batch.fits(UsageBound::new(128_000, 3, 4)));
    }
}
