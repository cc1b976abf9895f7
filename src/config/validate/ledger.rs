//! Validation of `[ledger]`: where spend is kept and, for PostgreSQL, how
//! the database is reached.

use std::path::PathBuf;
use std::time::Duration;

use super::super::postgres_url;
use super::super::schema::{RawConfig, RawLedger};
use super::super::types::*;
use super::Validator;

const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1_000;
const EXAMPLE_URL: &str = "postgres://tollgate@db.internal:5432/tollgate";

impl Validator<'_> {
    pub(super) fn ledger(&mut self, raw: &RawConfig) -> LedgerSettings {
        let l = &raw.ledger;
        let flush_ms = l.flush_interval_ms.unwrap_or(DEFAULT_FLUSH_INTERVAL_MS);
        if !(10..=60_000).contains(&flush_ms) {
            self.problem(
                "ledger.flush_interval_ms",
                "must be between 10 and 60000: a crash loses up to this much spend",
            );
        }
        if l.data_dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            self.problem(
                "ledger.data_dir",
                "must name a directory; leave it out to keep spend in memory only",
            );
        }
        let backend = match l.backend.as_deref() {
            None | Some("sqlite") => {
                for (field, set) in [("url", l.url.is_some()), ("url_env", l.url_env.is_some())] {
                    if set {
                        self.problem(
                            format!("ledger.{field}"),
                            "only backend = \"postgres\" reads it; set that, or remove it",
                        );
                    }
                }
                LedgerBackend::Sqlite
            }
            Some("postgres") => self.postgres_ledger(l),
            Some(other) => {
                self.problem(
                    "ledger.backend",
                    format!(
                        "unknown backend \"{other}\"; use \"sqlite\" (the default) or \"postgres\""
                    ),
                );
                LedgerBackend::Sqlite
            }
        };
        LedgerSettings {
            backend,
            data_dir: l.data_dir.as_deref().map(PathBuf::from),
            flush_interval: Duration::from_millis(flush_ms),
        }
    }

    fn postgres_ledger(&mut self, l: &RawLedger) -> LedgerBackend {
        if l.data_dir.is_none() {
            self.problem(
                "ledger.data_dir",
                "backend = \"postgres\" needs a directory for its local spool, where spend waits \
                 while PostgreSQL cannot be reached; set data_dir",
            );
        }
        let url = self.service_url(
            "ledger",
            l.url.as_ref(),
            l.url_env.as_ref(),
            "backend = \"postgres\" needs the name of the environment variable holding the \
             database's URL, such as url_env = \"TOLLGATE_POSTGRES_URL\"",
            Self::postgres_url,
        );
        LedgerBackend::Postgres { url }
    }

    /// Whether `text` is a URL the ledger can connect with, reporting at
    /// `path` why not. The URL itself is never echoed: it may hold a
    /// password. `var` names the environment variable it came from; a URL
    /// written in the config may not hold a password.
    fn postgres_url(&mut self, path: &str, text: &str, var: Option<&str>) -> bool {
        let subject = match var {
            Some(var) => format!("environment variable {var} holds a URL that"),
            None => "the URL".to_owned(),
        };
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            let what = match var {
                Some(var) => format!("environment variable {var} must hold"),
                None => "must be".to_owned(),
            };
            self.problem(path, format!("{what} a URL such as \"{EXAMPLE_URL}\""));
            return false;
        }
        let target = match postgres_url::read(text) {
            Ok(target) => target,
            Err(e) => {
                self.problem(path, format!("{subject} {e}"));
                return false;
            }
        };
        let parsed = &target.config;
        let fault = if var.is_none() && parsed.get_password().is_some() {
            "holds a password, and config files hold no secrets: put the URL in an environment \
             variable and name it with url_env instead"
                .to_owned()
        } else if parsed.get_hosts().is_empty() {
            format!("{subject} names no host; write one such as \"{EXAMPLE_URL}\"")
        } else {
            return true;
        };
        self.problem(path, fault);
        false
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::{LedgerBackend, Secrets, parse, parse_with};

    fn with_ledger(fields: &str) -> String {
        format!("[ledger]\n{fields}\n{MINIMAL}")
    }

    /// The problems of a config with these `[ledger]` fields, with
    /// `PG_URL` holding `pg_url`.
    fn problems_with(fields: &str, pg_url: Option<&str>) -> Vec<String> {
        let env = |name: &str| pg_url.filter(|_| name == "PG_URL").map(str::to_owned);
        match parse(&with_ledger(fields), &env) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(ToString::to_string).collect(),
        }
    }

    const SPOOL: &str = "data_dir = \"/var/lib/tollgate\"";

    #[test]
    fn sqlite_is_the_default_and_postgres_reads_its_url_from_the_environment() {
        let config = parse(MINIMAL, &|_| None).expect("valid");
        assert_eq!(config.ledger.backend, LedgerBackend::Sqlite);
        let fields = format!("backend = \"postgres\"\nurl_env = \"PG_URL\"\n{SPOOL}");
        let env = |_: &str| Some("postgres://tollgate:s3cret@db.internal:5432/tollgate".to_owned());
        let config = parse(&with_ledger(&fields), &env).expect("valid");
        let LedgerBackend::Postgres { url: Some(url) } = &config.ledger.backend else {
            panic!(
                "a postgres ledger with its URL: {:?}",
                config.ledger.backend
            );
        };
        assert_eq!(
            url.expose(),
            "postgres://tollgate:s3cret@db.internal:5432/tollgate"
        );
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "no password in Debug"
        );
        // Offline, the variable is not read and need not be set.
        let offline = parse_with(&with_ledger(&fields), Secrets::Unread).expect("valid offline");
        assert_eq!(
            offline.ledger.backend,
            LedgerBackend::Postgres { url: None }
        );
        // TLS, verified against the system's roots.
        let env = |_: &str| {
            Some("postgres://tollgate:s3cret@db.internal/t?sslmode=verify-full".to_owned())
        };
        parse(&with_ledger(&fields), &env).expect("valid with TLS");
        // A URL without a password may be written in the config.
        let fields =
            format!("backend = \"postgres\"\nurl = \"postgres://tollgate@127.0.0.1/t\"\n{SPOOL}");
        assert!(problems_with(&fields, None).is_empty());
    }

    #[test]
    fn a_postgres_ledger_is_refused_with_what_to_change_and_never_echoes_its_url() {
        let cases = [
            (
                "backend = \"postgres\"\nurl = \"postgres://tollgate:hunter2@db/t\"",
                None,
                "ledger.url: holds a password, and config files hold no secrets: put the URL in an \
                 environment variable and name it with url_env instead",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://tollgate@db/t?password=hunter2\"",
                None,
                "ledger.url: holds a password, and config files hold no secrets: put the URL in an \
                 environment variable and name it with url_env instead",
            ),
            (
                "backend = \"postgres\"",
                None,
                "ledger.url_env: backend = \"postgres\" needs the name of the environment variable",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                None,
                "ledger.url_env: environment variable PG_URL is not set (or is empty)",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"\nurl = \"postgres://db/t\"",
                None,
                "ledger.url: set url or url_env, not both",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                Some("host=db password=hunter2"),
                "ledger.url_env: environment variable PG_URL holds spaces or control characters",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                Some("mysql://u:hunter2@db/t"),
                "ledger.url_env: environment variable PG_URL must hold a URL such as \
                 \"postgres://tollgate@db.internal:5432/tollgate\"",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                Some("postgres://u:hunter2@db:port/t"),
                "ledger.url_env: environment variable PG_URL holds a URL that is not a valid \
                 PostgreSQL URL: invalid value for option `port`",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                Some("postgres://u:hunter2@db/t?sslmode=verify-everything"),
                "ledger.url_env: environment variable PG_URL holds a URL that has \
                 sslmode=verify-everything; use verify-full",
            ),
            (
                "backend = \"postgres\"\nurl_env = \"PG_URL\"",
                Some("postgres:///t?password=hunter2"),
                "ledger.url_env: environment variable PG_URL holds a URL that names no host",
            ),
            (
                "url_env = \"PG_URL\"",
                None,
                "ledger.url_env: only backend = \"postgres\" reads it; set that, or remove it",
            ),
            (
                "backend = \"mysql\"",
                None,
                "ledger.backend: unknown backend \"mysql\"; use \"sqlite\" (the default) or \"postgres\"",
            ),
        ];
        for (fields, pg_url, expected) in cases {
            let got = problems_with(&format!("{fields}\n{SPOOL}"), pg_url);
            assert!(
                got.len() == 1 && got[0].starts_with(expected),
                "{fields}: expected {expected:?}, got {got:#?}"
            );
            assert!(!got[0].contains("hunter2"), "{got:?}");
        }
        let got = problems_with("backend = \"postgres\"\nurl = \"postgres://db/t\"", None);
        assert_eq!(
            got,
            [
                "ledger.data_dir: backend = \"postgres\" needs a directory for its local spool, where \
              spend waits while PostgreSQL cannot be reached; set data_dir (not written: it goes \
              under line 1, column 2)"
            ]
        );
    }
}
