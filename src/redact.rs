//! The credentials the gateway sends upstreams (API keys, AWS keys),
//! remembered as a config is validated so that no text an upstream sends
//! back reaches a client or a log with one of them in it: some upstreams
//! and proxies quote the credential they were sent in their error
//! messages. Remembered for the life of the process, so a key replaced by
//! a reload stays redacted too. Client keys never go upstream, and are
//! not looked for: a config of 100,000 of them would make every upstream
//! error a scan of each.

use std::sync::{PoisonError, RwLock};

static SECRETS: RwLock<Vec<Box<str>>> = RwLock::new(Vec::new());

/// Shorter secrets are not looked for: they would turn up in ordinary
/// words, and `check` warns of short credentials.
const SHORTEST: usize = 8;

/// What a secret is written as instead.
pub const REDACTED: &str = "[redacted]";

/// Remembers `secret`, to redact from upstream text from now on.
pub fn remember(secret: &str) {
    if secret.len() < SHORTEST {
        return;
    }
    let known = SECRETS.read().unwrap_or_else(PoisonError::into_inner);
    if known.iter().any(|s| &**s == secret) {
        return;
    }
    drop(known);
    let mut known = SECRETS.write().unwrap_or_else(PoisonError::into_inner);
    if !known.iter().any(|s| &**s == secret) {
        known.push(secret.into());
    }
}

/// `text` with every remembered secret in it written as [`REDACTED`].
pub fn redacted(mut text: String) -> String {
    let known = SECRETS.read().unwrap_or_else(PoisonError::into_inner);
    for secret in known.iter() {
        if text.contains(&**secret) {
            text = text.replace(&**secret, REDACTED);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_secrets_are_redacted_and_short_ones_left() {
        remember("sk-redact-test-0123456789");
        remember("sk-redact-test-0123456789");
        remember("short");
        assert_eq!(
            redacted("Incorrect API key: Bearer sk-redact-test-0123456789 (short)".into()),
            "Incorrect API key: Bearer [redacted] (short)"
        );
        let known = SECRETS.read().unwrap();
        assert_eq!(
            known
                .iter()
                .filter(|s| s.starts_with("sk-redact-test"))
                .count(),
            1
        );
    }
}
