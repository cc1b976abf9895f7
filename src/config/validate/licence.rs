//! Validation of `[licence]`: the Llama licence's bookkeeping.

use axum::http::HeaderName;

use super::super::schema::RawConfig;
use super::super::types::*;
use super::Validator;

impl Validator<'_> {
    pub(super) fn licence(&mut self, raw: &RawConfig) -> LicenceSettings {
        let l = &raw.licence;
        let defaults = LicenceSettings::default();
        let user_header = l.user_header.as_ref().and_then(|name| {
            let header = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok();
            if header.is_none() {
                self.problem(
                    "licence.user_header",
                    format!(
                        "\"{name}\" is not an HTTP header name; write one such as \"x-end-user\""
                    ),
                );
            }
            header
        });
        let mau_threshold = l.mau_threshold.unwrap_or(defaults.mau_threshold);
        if mau_threshold == 0 {
            self.problem(
                "licence.mau_threshold",
                "must be more than 0: the monthly active users at which the licence asks for one of its own (the Llama licence's is 700000000)",
            );
        }
        let mau_alert_fraction = l.mau_alert_fraction.unwrap_or(defaults.mau_alert_fraction);
        if !(mau_alert_fraction > 0.0 && mau_alert_fraction <= 1.0) {
            self.problem(
                "licence.mau_alert_fraction",
                "must be more than 0 and at most 1: the share of mau_threshold at which the alert fires, such as 0.8",
            );
        }
        LicenceSettings {
            user_header,
            attribution_header: l.attribution_header.unwrap_or(defaults.attribution_header),
            mau_threshold,
            mau_alert_fraction,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::{Config, Secrets, parse_with};

    fn load_str(licence: &str) -> Result<Config, crate::config::Problems> {
        parse_with(&format!("[licence]\n{licence}\n{MINIMAL}"), Secrets::Unread)
    }

    fn problems(licence: &str) -> Vec<String> {
        match load_str(licence) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_defaults_are_the_llama_licence_and_a_bad_field_says_what_to_write() {
        let config = load_str("").unwrap();
        assert_eq!(config.licence.mau_threshold, 700_000_000);
        assert_eq!(config.licence.alert_users(), 560_000_000);
        assert!(!config.licence.attribution_header);
        let config = load_str(
            "user_header = \"X-End-User\"\nattribution_header = true\nmau_threshold = 1000\nmau_alert_fraction = 0.5",
        )
        .unwrap();
        assert_eq!(
            config.licence.user_header.as_ref().unwrap().as_str(),
            "x-end-user"
        );
        assert_eq!(config.licence.alert_users(), 500);
        let found =
            problems("user_header = \"bad header\"\nmau_threshold = 0\nmau_alert_fraction = 1.5");
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("licence.user_header: \"bad header\" is not an HTTP header name"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("licence.mau_threshold: must be more than 0"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("licence.mau_alert_fraction: must be more than 0 and at most 1"),
            "{found:?}"
        );
    }
}
