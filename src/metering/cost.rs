//! What tokens cost. Prices are integer micro-dollars per million tokens,
//! which is pico-dollars per token, so costs are exact integers.

use std::sync::OnceLock;

use prometheus::Counter;

use crate::config::{Backend, Deployment};
use crate::openai::Usage;

/// A per-token deployment of an alias, where every request to the alias
/// is priced for what it would have cost there.
pub struct Counterfactual {
    pub deployment: String,
    pub rate: Rate,
    /// Its `counterfactual_cost` series, resolved as the first request
    /// records to it.
    pub series: OnceLock<Counter>,
}

/// Pico-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    /// Priced per token by its provider (an API), not by GPU-hour.
    pub per_token: bool,
}

impl Rate {
    /// An API deployment costs its list prices. A self-hosted one is
    /// charged the amortised price its pool has at full load: the share of
    /// the GPU-hours its tokens would use on a fully busy pool. A prompt
    /// token its engine read from the prefix cache was not computed, so it
    /// uses none of the pool's throughput and costs nothing.
    pub fn of(deployment: &Deployment, backend: &Backend) -> Self {
        match backend.self_hosted {
            Some(pool) => {
                let per_token = (pool.full_load_usd_per_mtok() * 1e6).round() as u64;
                Self {
                    input: per_token,
                    cached_input: 0,
                    cache_write: per_token,
                    output: per_token,
                    per_token: false,
                }
            }
            None => {
                let p = deployment.price;
                Self {
                    input: p.input_micro_usd_per_mtok,
                    cached_input: p.cached_input_micro_usd_per_mtok,
                    cache_write: p.cache_write_micro_usd_per_mtok,
                    output: p.output_micro_usd_per_mtok,
                    per_token: true,
                }
            }
        }
    }

    /// Prompt tokens read from the upstream's cache and written to it are
    /// part of `prompt_tokens`, each priced at its own rate.
    pub fn cost_pico_usd(&self, usage: &Usage) -> u128 {
        let cached = usage.cached_tokens();
        let written = usage.cache_write_tokens();
        let fresh = usage.prompt_tokens - cached - written;
        u128::from(fresh) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(written) * u128::from(self.cache_write)
            + u128::from(usage.completion_tokens) * u128::from(self.output)
    }

    /// The cost in nano-dollars, rounded up so spend is never under-counted.
    pub fn cost_nano_usd(&self, usage: &Usage) -> u64 {
        u64::try_from(self.cost_pico_usd(usage).div_ceil(1000)).unwrap_or(u64::MAX)
    }

    /// The most a request of `input` tokens and up to `output` generated
    /// tokens can cost, in nano-dollars.
    pub fn estimate_nano_usd(&self, input: u64, output: u64) -> u64 {
        self.cost_nano_usd(&Usage::new(input, output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::PromptTokensDetails;

    #[test]
    fn cached_input_is_charged_at_its_own_price() {
        let rate = Rate {
            input: 880_000,
            cached_input: 440_000,
            cache_write: 1_100_000,
            output: 1_000_000,
            per_token: true,
        };
        let mut usage = Usage::new(1_000, 100);
        assert_eq!(rate.cost_pico_usd(&usage), 880_000_000 + 100_000_000);
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: 400,
            cache_write_tokens: 0,
        });
        assert_eq!(
            rate.cost_pico_usd(&usage),
            600 * 880_000 + 400 * 440_000 + 100_000_000
        );
        assert_eq!(rate.cost_nano_usd(&Usage::new(1, 0)), 880);
    }

    #[test]
    fn cache_writes_are_charged_at_their_own_price_and_never_twice() {
        let rate = Rate {
            input: 3_000_000,
            cached_input: 300_000,
            cache_write: 3_750_000,
            output: 15_000_000,
            per_token: true,
        };
        let mut usage = Usage::new(10_000, 200);
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: 6_000,
            cache_write_tokens: 3_000,
        });
        assert_eq!(
            rate.cost_pico_usd(&usage),
            1_000 * 3_000_000 + 6_000 * 300_000 + 3_000 * 3_750_000 + 200 * 15_000_000
        );
        // A report of more writes than the prompt has left counts only
        // what is left, at the write price.
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: 6_000,
            cache_write_tokens: 9_000,
        });
        assert_eq!(
            rate.cost_pico_usd(&usage),
            6_000 * 300_000 + 4_000 * 3_750_000 + 200 * 15_000_000
        );
    }
}
