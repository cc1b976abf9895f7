//! The licence report: per calendar month, the Llama end-user estimate
//! against the licence's threshold, what each licence served, and the EU
//! multimodal refusals. `tollgate licence-report` prints it and
//! `GET /admin/licence` answers it, in the same JSON.

use serde::Serialize;
use time::Date;
use time::macros::format_description;

use super::hll;
use crate::config::LicenceSettings;
use crate::error::echo;
use crate::ledger::{LicenceMonth, YEARS};

#[derive(Debug, Serialize)]
pub struct Report {
    pub mau_threshold: u64,
    pub mau_alert_users: u64,
    pub months: Vec<MonthReport>,
}

#[derive(Debug, Serialize)]
pub struct MonthReport {
    /// `YYYY-MM`, UTC.
    pub month: String,
    /// Distinct end users served by `llama` deployments: a HyperLogLog
    /// estimate (standard error 0.81%).
    pub monthly_active_users: u64,
    /// By licence name, those that served any request.
    pub served: Vec<Served>,
    /// Requests refused by the EU multimodal Llama rule.
    pub eu_multimodal_refusals: u64,
}

#[derive(Debug, Serialize)]
pub struct Served {
    pub licence: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl Report {
    pub fn new(months: Vec<LicenceMonth>, settings: &LicenceSettings) -> Self {
        Self {
            mau_threshold: settings.mau_threshold,
            mau_alert_users: settings.alert_users(),
            months: months
                .into_iter()
                .map(|m| MonthReport {
                    monthly_active_users: hll::estimate(&m.registers),
                    served: m
                        .served
                        .into_iter()
                        .map(|(licence, t)| Served {
                            licence,
                            requests: t.requests,
                            input_tokens: t.input_tokens,
                            output_tokens: t.output_tokens,
                            cost_usd: t.cost_nano_usd as f64 / 1e9,
                        })
                        .collect(),
                    eu_multimodal_refusals: m.eu_refusals,
                    month: m.month,
                })
                .collect(),
        }
    }
}

/// A month as `YYYY-MM`, checked; the error says how to write one.
pub fn parse_month(text: &str) -> Result<String, String> {
    const FIRST: &[time::format_description::BorrowedFormatItem<'_>] =
        format_description!("[year]-[month]-[day]");
    Date::parse(&format!("{text}-01"), FIRST)
        .ok()
        .filter(|_| text.len() == 7)
        .ok_or_else(|| {
            format!(
                "\"{}\" is not a month; write YYYY-MM, such as 2026-12",
                echo(text)
            )
        })
        .and_then(|first| {
            if YEARS.contains(&first.year()) {
                Ok(super::month_name(first))
            } else {
                Err(format!(
                    "\"{text}\" is in the year {}; ask for a month from {}-01 to {}-12",
                    first.year(),
                    YEARS.start(),
                    YEARS.end()
                ))
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_is_written_yyyy_mm() {
        assert_eq!(parse_month("2026-12").unwrap(), "2026-12");
        assert!(
            parse_month("2026-13")
                .unwrap_err()
                .contains("write YYYY-MM")
        );
        assert!(parse_month("2026-1").is_err());
        assert!(parse_month("2026-12-01").is_err());
        assert_eq!(
            parse_month("0000-12").unwrap_err(),
            "\"0000-12\" is in the year 0; ask for a month from 1970-01 to 9999-12"
        );
        assert!(parse_month("1969-12").is_err());
        assert!(parse_month("1970-01").is_ok());
    }
}
