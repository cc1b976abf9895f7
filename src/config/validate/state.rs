//! Validation of `[state]`: where budgets, rate limits and upstream
//! pressure live.

use std::time::Duration;

use url::Url;

use super::super::schema::RawConfig;
use super::super::secret_query::secret_in_query;
use super::super::types::*;
use super::{TlsFiles, Validator};

const DEFAULT_PREFIX: &str = "tollgate:";
const DEFAULT_TIMEOUT_MS: u64 = 50;
const DEFAULT_LEASE_MS: u64 = 30_000;

impl Validator<'_> {
    pub(super) fn state(&mut self, raw: &RawConfig) -> StateSettings {
        let s = &raw.state;
        match s.backend.as_deref().unwrap_or("memory") {
            "memory" => {
                for (field, set) in [
                    ("url", s.url.is_some()),
                    ("url_env", s.url_env.is_some()),
                    ("prefix", s.prefix.is_some()),
                    ("timeout_ms", s.timeout_ms.is_some()),
                    ("on_unavailable", s.on_unavailable.is_some()),
                    ("lease_ms", s.lease_ms.is_some()),
                    ("ca_file", s.ca_file.is_some()),
                    ("cert_file", s.cert_file.is_some()),
                    ("key_file", s.key_file.is_some()),
                ] {
                    if set {
                        self.problem(
                            format!("state.{field}"),
                            "applies only with backend = \"redis\"; set that, or remove this field",
                        );
                    }
                }
                StateSettings::Memory
            }
            "redis" => self
                .redis_state(raw)
                .map_or(StateSettings::Memory, StateSettings::Redis),
            other => {
                self.problem(
                    "state.backend",
                    format!("\"{other}\" is not a state backend; use \"memory\" (one process) or \"redis\" (shared by replicas)"),
                );
                StateSettings::Memory
            }
        }
    }

    fn redis_state(&mut self, raw: &RawConfig) -> Option<RedisState> {
        let s = &raw.state;
        let url = self.service_url(
            "state",
            s.url.as_ref(),
            s.url_env.as_ref(),
            "backend = \"redis\" needs the server's address: url_env names the environment variable holding it (or url, without a password)",
            Self::redis_url,
        );
        let prefix = s
            .prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if prefix.is_empty() || prefix.len() > 64 || prefix.bytes().any(|b| !b.is_ascii_graphic()) {
            self.problem(
                "state.prefix",
                "must be 1 to 64 printable characters without spaces, such as \"tollgate:\"",
            );
        }
        let timeout_ms = s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if !(1..=5_000).contains(&timeout_ms) {
            self.problem(
                "state.timeout_ms",
                "must be between 1 and 5000: every admission waits on Redis up to this long",
            );
        }
        let lease_ms = s.lease_ms.unwrap_or(DEFAULT_LEASE_MS);
        if !(1_000..=600_000).contains(&lease_ms) {
            self.problem(
                "state.lease_ms",
                "must be between 1000 and 600000: a dead replica's budget reservations are freed after this long",
            );
        }
        let on_unavailable = match s.on_unavailable.as_deref().unwrap_or("local") {
            "local" => Some(OnUnavailable::Local),
            "refuse" => Some(OnUnavailable::Refuse),
            other => {
                self.problem(
                    "state.on_unavailable",
                    format!("\"{other}\" is not a choice; use \"local\" (serve with this replica's own state) or \"refuse\" (answer 503)"),
                );
                None
            }
        };
        let files = TlsFiles {
            ca_file: s.ca_file.as_deref(),
            cert_file: s.cert_file.as_deref(),
            key_file: s.key_file.as_deref(),
        };
        let tls = url
            .as_ref()
            .map(|url| Url::parse(url.expose()).is_ok_and(|u| u.scheme() == "rediss"));
        let tls = self.client_tls(
            "state",
            files,
            tls,
            "applies only to a rediss:// URL (TLS); use rediss://, or remove it",
        );
        Some(RedisState {
            tls,
            url,
            prefix,
            timeout: Duration::from_millis(timeout_ms),
            on_unavailable: on_unavailable?,
            lease: Duration::from_millis(lease_ms),
        })
    }

    /// A `redis://` or `rediss://` URL; one written in the config file
    /// holds no password.
    fn redis_url(&mut self, path: &str, text: &str, var: Option<&str>) -> bool {
        let shown = match var {
            Some(var) => format!("the URL in environment variable {var}"),
            None => "the URL".to_owned(),
        };
        let Ok(url) = Url::parse(text) else {
            self.problem(
                path,
                format!("{shown} is not a URL; write redis://HOST:PORT/DB"),
            );
            return false;
        };
        if !matches!(url.scheme(), "redis" | "rediss") {
            self.problem(
                path,
                format!("{shown} must start with redis://, or rediss:// for TLS"),
            );
            return false;
        }
        if url.fragment().is_some() {
            self.problem(
                path,
                format!("{shown} has a #fragment, such as #insecure: the server's certificate is always verified; name its CA with ca_file instead"),
            );
            return false;
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.problem(
                path,
                format!("{shown} names no host; write redis://HOST:PORT/DB"),
            );
            return false;
        }
        // The client reads a password only from the URL's user info: one
        // in the query would be a secret in the file, and never sent.
        if let Some(name) = secret_in_query(&url) {
            self.problem(
                path,
                format!("{shown} has a secret in its query ({name}=), which the Redis client does not send: write redis://:PASSWORD@HOST:PORT/DB, in an environment variable named by url_env"),
            );
            return false;
        }
        if var.is_none() && url.password().is_some() {
            self.problem(
                path,
                "holds a password, and config files hold no secrets: put the URL in an environment variable and name it in url_env",
            );
            return false;
        }
        true
    }
}
