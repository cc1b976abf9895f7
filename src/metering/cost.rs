//! What tokens cost. Prices are integer micro-dollars per million tokens,
//! which is pico-dollars per token, so costs are exact integers.

use crate::config::{Backend, Deployment};
use crate::openai::Usage;

/// Pico-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    /// Priced per token by its provider (an API), not by GPU-hour.
    pub per_token: bool,
}

impl Rate {
    /// An API deployment costs its list prices. A self-hosted one is
    /// charged the amortised price its pool has at full load: the share of
    /// the GPU-hours its tokens would use on a fully busy pool.
    pub fn of(deployment: &Deployment, backend: &Backend) -> Self {
        match backend.self_hosted {
            Some(pool) => {
                let per_token = (pool.full_load_usd_per_mtok() * 1e6).round() as u64;
                Self {
                    input: per_token,
                    cached_input: per_token,
                    output: per_token,
                    per_token: false,
                }
            }
            None => {
                let p = deployment.price;
                Self {
                    input: p.input_micro_usd_per_mtok,
                    cached_input: p.cached_input_micro_usd_per_mtok,
                    output: p.output_micro_usd_per_mtok,
                    per_token: true,
                }
            }
        }
    }

    pub fn cost_pico_usd(&self, usage: &Usage) -> u128 {
        let cached = usage.cached_tokens();
        let fresh = usage.prompt_tokens - cached;
        u128::from(fresh) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
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
}
