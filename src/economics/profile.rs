//! The traffic profile `tollgate simulate` prices: requests per day and
//! their mean size per alias, how peaked the day is, and the fixed costs
//! of self-hosted backends. Read from TOML (`--profile`) or built from the
//! ledger (`--from-ledger`), then checked against the config.

use serde::Deserialize;

use crate::config::{Config, is_region};

/// The busiest hour's traffic over the mean hour's, in thousandths, so
/// the arithmetic on it stays in integers.
pub const MILLI: u64 = 1000;

const DEFAULT_DAYS: u32 = 30;
const DEFAULT_MAX_UTILISATION: f64 = 0.7;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    days: Option<u32>,
    max_utilisation: Option<f64>,
    #[serde(default)]
    traffic: Vec<RawTraffic>,
    #[serde(default)]
    fixed: Vec<RawFixed>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    alias: String,
    requests_per_day: u64,
    input_tokens: u64,
    output_tokens: u64,
    peak_to_mean: Option<f64>,
    region: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFixed {
    backend: String,
    monthly_usd: f64,
    label: String,
}

/// A checked profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The length of the month the monthly figures cover.
    pub days: u32,
    /// The share of a self-hosted pool's throughput its busiest hour may
    /// use: `gpus_needed` sizes the pool to serve the peak within it.
    pub max_utilisation: f64,
    pub traffic: Vec<Traffic>,
    pub fixed: Vec<Fixed>,
}

/// One alias's traffic: means per request, and the busiest hour against
/// the mean hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    pub alias: String,
    pub requests_per_day: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Thousandths: 2500 is a busiest hour 2.5 times the mean.
    pub peak_to_mean_milli: u64,
    /// Policy applies as for a request from here (default: the config's
    /// `policy.default_region`).
    pub region: Option<String>,
}

impl Traffic {
    /// Tokens, input and output, of one request.
    pub fn tokens_per_request(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    pub fn tokens_per_day(&self) -> u128 {
        u128::from(self.requests_per_day) * u128::from(self.tokens_per_request())
    }
}

/// A cost that does not scale with tokens, charged to a self-hosted
/// backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    pub backend: String,
    pub monthly_micro_usd: u64,
    pub label: String,
}

/// Bounds that catch typos: far above any real fleet.
const MAX_REQUESTS_PER_DAY: u64 = 100_000_000_000;
const MAX_TOKENS: u64 = 10_000_000;
const MAX_PEAK_TO_MEAN: f64 = 24.0;

impl Profile {
    /// Reads and checks a profile against `config`; every problem is
    /// reported, each with the path of the value at fault.
    pub fn parse(text: &str, config: &Config) -> Result<Self, Vec<String>> {
        let parsed = toml::de::DeTable::parse(text).map_err(|e| vec![e.to_string()])?;
        // Named by its path, as a config's problems are.
        let raw: RawProfile = serde_path_to_error::deserialize(toml::Deserializer::from(parsed))
            .map_err(|e| {
                let path = e.path().to_string();
                vec![format!("{path}: {}", e.into_inner().message())]
            })?;
        let mut problems = Vec::new();
        let days = raw.days.unwrap_or(DEFAULT_DAYS);
        if !(1..=366).contains(&days) {
            problems.push(
                "days: must be between 1 and 366 (the days a month of figures covers)".into(),
            );
        }
        let max_utilisation = raw.max_utilisation.unwrap_or(DEFAULT_MAX_UTILISATION);
        if !(max_utilisation > 0.0 && max_utilisation <= 1.0) {
            problems.push(
                "max_utilisation: must be more than 0 and at most 1 (the share of a pool's throughput its busiest hour may use)".into(),
            );
        }
        let traffic = raw
            .traffic
            .iter()
            .enumerate()
            .map(|(i, t)| traffic(i, t, config, &mut problems))
            .collect();
        let fixed = raw
            .fixed
            .iter()
            .enumerate()
            .map(|(i, f)| fixed(i, f, config, &mut problems))
            .collect();
        let profile = Self {
            days,
            max_utilisation,
            traffic,
            fixed,
        };
        if problems.is_empty() {
            Ok(profile)
        } else {
            Err(problems)
        }
    }
}

fn traffic(i: usize, t: &RawTraffic, config: &Config, problems: &mut Vec<String>) -> Traffic {
    let at = |field: &str| format!("traffic[{i}].{field}");
    if !config.models.iter().any(|m| m.alias == t.alias) {
        let aliases: Vec<&str> = config.models.iter().map(|m| m.alias.as_str()).collect();
        problems.push(format!(
            "{}: no model \"{}\" in the config (models: {})",
            at("alias"),
            t.alias,
            aliases.join(", ")
        ));
    }
    if t.requests_per_day > MAX_REQUESTS_PER_DAY {
        problems.push(format!(
            "{}: must be at most {MAX_REQUESTS_PER_DAY}",
            at("requests_per_day")
        ));
    }
    for (field, value) in [
        ("input_tokens", t.input_tokens),
        ("output_tokens", t.output_tokens),
    ] {
        if value > MAX_TOKENS {
            problems.push(format!(
                "{}: must be at most {MAX_TOKENS} (a mean per request)",
                at(field)
            ));
        }
    }
    let peak = t.peak_to_mean.unwrap_or(1.0);
    let milli = peak * MILLI as f64;
    if !(1.0..=MAX_PEAK_TO_MEAN).contains(&peak) {
        problems.push(format!(
            "{}: must be between 1 (a flat day) and 24 (all of a day's traffic in one hour)",
            at("peak_to_mean")
        ));
    } else if (milli - milli.round()).abs() > 1e-6 {
        problems.push(format!(
            "{}: use at most 3 decimal places",
            at("peak_to_mean")
        ));
    }
    let region = t.region.as_ref().map(|r| {
        let region = r.to_ascii_lowercase();
        if !is_region(&region) {
            problems.push(format!(
                "{}: \"{r}\" is not a region name (letters, digits, - and _)",
                at("region")
            ));
        }
        region
    });
    Traffic {
        alias: t.alias.clone(),
        requests_per_day: t.requests_per_day,
        input_tokens: t.input_tokens,
        output_tokens: t.output_tokens,
        peak_to_mean_milli: milli.round().clamp(0.0, u64::MAX as f64) as u64,
        region,
    }
}

fn fixed(i: usize, f: &RawFixed, config: &Config, problems: &mut Vec<String>) -> Fixed {
    let at = |field: &str| format!("fixed[{i}].{field}");
    match config.backends.iter().find(|b| b.name == f.backend) {
        None => problems.push(format!(
            "{}: no backend named \"{}\" in the config",
            at("backend"),
            f.backend
        )),
        Some(b) if b.self_hosted.is_none() => problems.push(format!(
            "{}: backend \"{}\" is priced per token; fixed costs belong to self-hosted backends (with gpu_hour_usd)",
            at("backend"),
            f.backend
        )),
        Some(_) => {}
    }
    let micro = f.monthly_usd * 1e6;
    if !f.monthly_usd.is_finite() || !(0.0..=1e12).contains(&f.monthly_usd) {
        problems.push(format!(
            "{}: must be USD between 0 and 1000000000000",
            at("monthly_usd")
        ));
    } else if (micro - micro.round()).abs() > 1e-3 {
        problems.push(format!(
            "{}: use at most 6 decimal places",
            at("monthly_usd")
        ));
    }
    if f.label.trim().is_empty() {
        problems.push(format!(
            "{}: say what the cost is, such as \"MLOps engineering, 1 FTE\"",
            at("label")
        ));
    }
    Fixed {
        backend: f.backend.clone(),
        monthly_micro_usd: micro.round().clamp(0.0, u64::MAX as f64) as u64,
        label: f.label.clone(),
    }
}

/// The traffic the ledger recorded over the `days` UTC days up to today
/// (today included), per model the config still has: requests a day and
/// tokens per request as means, the busiest hour against the mean hour.
pub async fn from_ledger(config: &Config, days: u32) -> Result<Vec<Traffic>, String> {
    if !(1..=366).contains(&days) {
        return Err("--from-ledger: DAYS must be between 1 and 366".into());
    }
    let today = time::OffsetDateTime::now_utc().date();
    let from = today
        .checked_sub(time::Duration::days(i64::from(days) - 1))
        .unwrap_or(today);
    let mut reader = crate::ledger::Reader::open(&config.ledger).await?;
    let recorded = reader.traffic(from).await?;
    Ok(recorded
        .into_iter()
        .filter(|t| t.requests > 0 && config.models.iter().any(|m| m.alias == t.model))
        .map(|t| {
            let days = u64::from(days);
            // Peak hour over mean hour, in thousandths: peak × 24 × days / requests.
            let milli =
                u128::from(t.peak_hour_requests) * 24 * u128::from(days) * u128::from(MILLI)
                    / u128::from(t.requests);
            Traffic {
                alias: t.model,
                requests_per_day: t.requests / days,
                input_tokens: t.input_tokens / t.requests,
                output_tokens: t.output_tokens / t.requests,
                peak_to_mean_milli: u64::try_from(milli)
                    .unwrap_or(u64::MAX)
                    .clamp(MILLI, 24 * MILLI),
                region: None,
            }
        })
        .collect())
}
