//! What `simulate` reports: the JSON it prints with `--json` (field names
//! are stable, documented in docs/economics.md) and the table it prints
//! without.

use std::fmt::{self, Write as _};

use serde::{Serialize, Serializer};

use super::model::{cents, daily_cents, micro_usd_per_mtok};
use super::profile::{Fixed, Profile, Traffic};
use crate::config::{Backend, Deployment};

#[derive(Debug, Serialize)]
pub struct Simulation {
    pub days: u32,
    pub max_utilisation: f64,
    pub deployments: Vec<DeploymentCost>,
    pub aliases: Vec<AliasCost>,
}

/// USD, exact to the cent: an integer number of cents, shown as dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Usd(pub u128);

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A JSON number with two decimals at most: cents / 100 is the
        // nearest double to the exact amount, and prints as it.
        s.serialize_f64(self.0 as f64 / 100.0)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dollars = (self.0 / 100).to_string();
        let mut grouped = String::new();
        for (i, digit) in dollars.chars().enumerate() {
            if i > 0 && (dollars.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        write!(f, "${grouped}.{:02}", self.0 % 100)
    }
}

/// A month's cost and the mean day's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    pub daily_usd: Usd,
    pub monthly_usd: Usd,
}

impl Usd {
    /// A month of `days` costing `pico` pico-dollars, and its mean day.
    pub fn period(pico: u128, days: u32) -> Period {
        Period {
            daily_usd: Usd(daily_cents(pico, days)),
            monthly_usd: Usd(cents(pico)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    PerToken,
    SelfHosted,
}

/// One deployment policy allows, carrying all of its alias's traffic.
#[derive(Debug, Serialize)]
pub struct DeploymentCost {
    pub alias: String,
    pub deployment: String,
    pub backend: String,
    pub kind: Kind,
    #[serde(flatten)]
    pub cost: Period,
    /// USD per million tokens (input and output), to six places; `null`
    /// without traffic.
    #[serde(serialize_with = "micro_usd")]
    pub effective_usd_per_mtok: Option<u128>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolFacts>,
}

/// What a self-hosted deployment adds.
#[derive(Debug, Serialize)]
pub struct PoolFacts {
    /// GPUs configured (and paid for).
    pub gpus: u32,
    /// GPUs that serve the busiest hour within `max_utilisation`.
    pub gpus_needed: u64,
    /// Mean tokens a second over what the configured GPUs process flat
    /// out.
    #[serde(serialize_with = "ratio")]
    pub utilisation: f64,
    #[serde(serialize_with = "fixed_costs")]
    pub fixed: Vec<Fixed>,
}

impl DeploymentCost {
    pub(super) fn new(
        traffic: &Traffic,
        deployment: &Deployment,
        backend: &Backend,
        month_pico: u128,
        month_tokens: u128,
        pool: Option<PoolFacts>,
        profile: &Profile,
    ) -> Self {
        Self {
            alias: traffic.alias.clone(),
            deployment: deployment.name.clone(),
            backend: backend.name.clone(),
            kind: if pool.is_some() {
                Kind::SelfHosted
            } else {
                Kind::PerToken
            },
            cost: Usd::period(month_pico, profile.days),
            effective_usd_per_mtok: micro_usd_per_mtok(month_pico, month_tokens),
            pool,
        }
    }
}

/// An alias's traffic and what it costs each way.
#[derive(Debug, Serialize)]
pub struct AliasCost {
    pub alias: String,
    pub region: Option<String>,
    pub requests_per_day: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub peak_to_mean: f64,
    pub strategy: &'static str,
    /// Under the alias's strategy.
    pub configured: StrategyCost,
    /// All of it on the cheapest per-token deployment policy allows.
    pub all_api: Option<Choice>,
    /// All of it on the cheapest self-hosted deployment, its pool sized
    /// to the peak (never below the GPUs configured).
    pub all_self_hosted: Option<Choice>,
    pub break_even: Vec<BreakEven>,
    /// Deployments policy refuses this traffic, and why.
    pub refused: Vec<Refused>,
}

#[derive(Debug, Serialize)]
pub struct StrategyCost {
    /// `null` where the strategy cannot be priced from a profile.
    #[serde(serialize_with = "period_or_nulls", flatten)]
    pub cost: Option<Period>,
    /// Tokens a day the peak puts above self-hosted capacity, sent to
    /// `spilled_to`.
    pub spilled_tokens_per_day: u128,
    pub spilled_to: Option<String>,
    /// Tokens a day above self-hosted capacity with no API to take them.
    pub unserved_tokens_per_day: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

impl StrategyCost {
    pub fn unmodelled(note: &'static str) -> Self {
        Self {
            cost: None,
            spilled_tokens_per_day: 0,
            spilled_to: None,
            unserved_tokens_per_day: 0,
            note: Some(note),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub deployment: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u64>,
    #[serde(flatten)]
    pub cost: Period,
}

/// Where the self-hosted pool costs less than `deployment`, in requests a
/// day of the profile's size and peak.
#[derive(Debug, Serialize)]
pub struct BreakEven {
    pub deployment: String,
    /// The fewest from which it costs less at every larger load; `null`:
    /// no such load.
    pub requests_per_day: Option<u64>,
    /// The first range of loads below that where it costs less, and more
    /// again at the next: the pool grows a GPU at a time.
    pub cheaper_between: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub deployment: String,
    pub rule: &'static str,
    pub reason: String,
}

/// A period's two fields, both `null` without one.
fn period_or_nulls<S: Serializer>(cost: &Option<Period>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Fields {
        daily_usd: Option<Usd>,
        monthly_usd: Option<Usd>,
    }
    Fields {
        daily_usd: cost.map(|p| p.daily_usd),
        monthly_usd: cost.map(|p| p.monthly_usd),
    }
    .serialize(s)
}

fn micro_usd<S: Serializer>(value: &Option<u128>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(micro) => s.serialize_f64(*micro as f64 / 1e6),
        None => s.serialize_none(),
    }
}

/// A ratio to four places.
fn ratio<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((value * 1e4).round() / 1e4)
}

fn fixed_costs<S: Serializer>(fixed: &[Fixed], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Shown<'a> {
        label: &'a str,
        monthly_usd: Usd,
    }
    s.collect_seq(fixed.iter().map(|f| Shown {
        label: &f.label,
        monthly_usd: Usd(cents(
            u128::from(f.monthly_micro_usd) * super::model::PICO_PER_MICRO,
        )),
    }))
}

fn per_mtok(micro: Option<u128>) -> String {
    micro.map_or_else(
        || "-".into(),
        |m| format!("${}.{:06}", m / 1_000_000, m % 1_000_000),
    )
}

fn period(cost: Option<Period>) -> (String, String) {
    cost.map_or_else(
        || ("-".into(), "-".into()),
        |p| (p.daily_usd.to_string(), p.monthly_usd.to_string()),
    )
}

impl fmt::Display for Simulation {
    /// The table `simulate` prints without `--json`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "months of {} days; self-hosted pools sized to serve the busiest hour at {}% of flat out",
            self.days,
            (self.max_utilisation * 100.0).round()
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<28} {:<12} {:>14} {:>16} {:>12}  pool",
            "deployment", "kind", "per day", "per month", "per Mtok"
        )?;
        for d in &self.deployments {
            let mut pool = String::new();
            if let Some(p) = &d.pool {
                write!(
                    pool,
                    "{} GPUs, {} needed, {:.1}% used",
                    p.gpus,
                    p.gpus_needed,
                    p.utilisation * 100.0
                )?;
                for fixed in &p.fixed {
                    let month = Usd(cents(
                        u128::from(fixed.monthly_micro_usd) * super::model::PICO_PER_MICRO,
                    ));
                    write!(pool, "; {month}/month {}", fixed.label)?;
                }
            }
            let row = format!(
                "{:<28} {:<12} {:>14} {:>16} {:>12}  {pool}",
                d.deployment,
                match d.kind {
                    Kind::PerToken => "per-token",
                    Kind::SelfHosted => "self-hosted",
                },
                d.cost.daily_usd.to_string(),
                d.cost.monthly_usd.to_string(),
                per_mtok(d.effective_usd_per_mtok),
            );
            writeln!(f, "{}", row.trim_end())?;
        }
        for a in &self.aliases {
            writeln!(f)?;
            writeln!(
                f,
                "{}: {} requests a day of {} input and {} output tokens, peak {}x the mean, from {}",
                a.alias,
                a.requests_per_day,
                a.input_tokens,
                a.output_tokens,
                a.peak_to_mean,
                a.region.as_deref().unwrap_or("no region")
            )?;
            let (day, month) = period(a.configured.cost);
            write!(
                f,
                "  {:<26} {day:>14} {month:>16}",
                format!("as configured ({})", a.strategy)
            )?;
            if let Some(to) = &a.configured.spilled_to {
                write!(
                    f,
                    "  {} tokens a day spill to {to}",
                    a.configured.spilled_tokens_per_day
                )?;
            }
            if a.configured.unserved_tokens_per_day > 0 {
                write!(
                    f,
                    "  {} tokens a day above capacity unserved",
                    a.configured.unserved_tokens_per_day
                )?;
            }
            if let Some(note) = a.configured.note {
                write!(f, "  {note}")?;
            }
            writeln!(f)?;
            for (name, choice) in [
                ("all API", &a.all_api),
                ("all self-hosted", &a.all_self_hosted),
            ] {
                let (day, month) = period(choice.as_ref().map(|c| c.cost));
                write!(f, "  {name:<26} {day:>14} {month:>16}")?;
                if let Some(c) = choice {
                    write!(f, "  {}", c.deployment)?;
                    if let Some(gpus) = c.gpus {
                        write!(f, " on {gpus} GPUs")?;
                    }
                }
                writeln!(f)?;
            }
            for b in &a.break_even {
                let d = &b.deployment;
                match (b.requests_per_day, b.cheaper_between) {
                    (Some(n), None) => writeln!(
                        f,
                        "  self-hosting breaks even with {d} at {n} requests a day"
                    )?,
                    (Some(n), Some((lo, hi))) => writeln!(
                        f,
                        "  self-hosting breaks even with {d} at {n} requests a day (and costs less from {lo} to {hi}, until its next GPU)"
                    )?,
                    (None, Some((lo, hi))) => writeln!(
                        f,
                        "  self-hosting costs less than {d} only from {lo} to {hi} requests a day"
                    )?,
                    (None, None) => writeln!(f, "  self-hosting never breaks even with {d}")?,
                }
            }
            for r in &a.refused {
                writeln!(
                    f,
                    "  refused by policy {}: {} ({})",
                    r.rule, r.deployment, r.reason
                )?;
            }
        }
        Ok(())
    }
}
