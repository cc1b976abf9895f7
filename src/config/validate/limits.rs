//! Validation of rate limits: `rpm` and `tpm` of keys and deployments.

use std::num::NonZeroU32;

use super::super::types::PerMinute;
use super::Validator;

impl Validator<'_> {
    /// `rpm` and `tpm` of the key or deployment at `at`.
    pub(super) fn per_minute(&mut self, at: &str, rpm: Option<u32>, tpm: Option<u32>) -> PerMinute {
        let mut limit = |field: &str, value: Option<u32>| {
            let value = value?;
            let limit = NonZeroU32::new(value);
            if limit.is_none() {
                self.problem(
                    format!("{at}.{field}"),
                    "must be greater than 0; leave it out for no limit",
                );
            }
            limit
        };
        PerMinute {
            requests: limit("rpm", rpm),
            tokens: limit("tpm", tpm),
        }
    }
}
