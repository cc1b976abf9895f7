//! A PostgreSQL URL as libpq reads it, for tokio-postgres: the TLS
//! settings libpq takes and tokio-postgres does not (`sslmode=verify-ca`,
//! `verify-full`, `sslrootcert`, `sslcert`, `sslkey`) are taken out and
//! settled here, so the URL an operator uses with `psql` works unchanged.
//! Errors never echo the URL: it may hold a password.

use std::path::Path;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode;

use crate::tls::{CaFile, ClientTls, Identity, Roots};

/// How the ledger reaches its database.
pub struct PostgresTarget {
    /// `sslmode` is `disable` or `require` here, nothing in between.
    pub config: tokio_postgres::Config,
    /// Under `require`: what the server's certificate must chain to, and
    /// the certificate shown to a server that asks for one.
    pub tls: ClientTls,
}

/// Reads a `postgres://` URL. Under `sslmode=require`, `verify-ca` or
/// `verify-full` the connection is TLS, and the server's certificate is
/// verified and its host name checked against `sslrootcert` (a PEM file,
/// or `system`), else the system's roots: libpq's `require` alone does not
/// verify, but the ledger's records are spend, so it always does. A server
/// that asks for a client certificate gets `sslcert`'s, signed with
/// `sslkey`'s key. `prefer` (the default), `allow` and `disable` connect
/// without TLS.
pub fn read(text: &str) -> Result<PostgresTarget, String> {
    let (base, query) = text.split_once('?').unwrap_or((text, ""));
    let (mut mode, mut root_cert, mut cert, mut key) = (None, None, None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("has an {name} that is not UTF-8 once percent-decoded"))
        };
        match name {
            "sslmode" => mode = Some(value()?),
            "sslrootcert" => root_cert = Some(value()?),
            "sslcert" => cert = Some(value()?),
            "sslkey" => key = Some(value()?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = rest.parse::<tokio_postgres::Config>().map_err(|e| {
        // The cause names the part at fault (`invalid value for option
        // `port``), never its value.
        let cause = std::error::Error::source(&e).map_or(e.to_string(), ToString::to_string);
        format!("is not a valid PostgreSQL URL: {cause}")
    })?;
    let tls = match mode.as_deref().unwrap_or("prefer") {
        "disable" | "allow" | "prefer" => false,
        "require" | "verify-ca" | "verify-full" => true,
        other => {
            return Err(format!(
                "has sslmode={other}; use verify-full (TLS, the server's certificate verified), \
                 require (the same here) or disable"
            ));
        }
    };
    let roots = match (tls, root_cert.as_deref()) {
        (_, None | Some("system")) => Roots::System,
        (true, Some(path)) => Roots::File(
            CaFile::read(Path::new(path))
                .map_err(|e| format!("has an sslrootcert the gateway cannot use: {e}"))?,
        ),
        (false, Some(_)) => return Err(without_tls("sslrootcert")),
    };
    let identity = match (tls, cert.as_deref(), key.as_deref()) {
        (_, None, None) => None,
        (false, _, _) => return Err(without_tls("sslcert and sslkey")),
        (true, Some(cert), Some(key)) => Some(Box::new(
            Identity::read(Path::new(cert), Path::new(key))
                .map_err(|e| format!("has an sslcert or sslkey the gateway cannot use: {e}"))?,
        )),
        (true, _, _) => {
            return Err("has one of sslcert and sslkey: give both, or neither".into());
        }
    };
    config.ssl_mode(if tls {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    Ok(PostgresTarget {
        config,
        tls: ClientTls { roots, identity },
    })
}

fn without_tls(what: &str) -> String {
    format!(
        "has {what}, which only sslmode=verify-full (or require, verify-ca) reads; \
         without one of those the ledger connects without TLS"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpqs_tls_settings_are_read_and_the_rest_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca bundle.pem");
        crate::tls::write_test_ca(&ca);
        let encoded = ca.display().to_string().replace(' ', "%20");

        let target = read(&format!(
            "postgres://u:hunter2@db.internal:6432/t?application_name=x&sslmode=verify-full&sslrootcert={encoded}"
        ))
        .unwrap();
        assert_eq!(target.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(target.config.get_application_name(), Some("x"));
        assert_eq!(target.config.get_ports(), [6432]);
        assert!(matches!(&target.tls.roots, Roots::File(file) if file.path == ca));

        for (url, tls) in [
            ("postgres://db/t", false),
            ("postgres://db/t?sslmode=prefer", false),
            ("postgres://db/t?sslmode=allow", false),
            ("postgres://db/t?sslmode=disable", false),
            ("postgres://db/t?sslmode=require", true),
            ("postgres://db/t?sslmode=verify-ca&sslrootcert=system", true),
        ] {
            let target = read(url).unwrap();
            let expected = if tls {
                SslMode::Require
            } else {
                SslMode::Disable
            };
            assert_eq!(target.config.get_ssl_mode(), expected, "{url}");
            assert_eq!(target.tls, ClientTls::default(), "{url}");
        }
    }

    #[test]
    fn a_tls_setting_it_cannot_honour_is_refused_without_echoing_the_url() {
        for (url, expected) in [
            (
                "postgres://u:hunter2@db/t?sslmode=verify-everything",
                "has sslmode=verify-everything; use verify-full",
            ),
            (
                "postgres://u:hunter2@db/t?sslrootcert=/etc/ca.pem",
                "has sslrootcert, which only sslmode=verify-full",
            ),
            (
                "postgres://u:hunter2@db/t?sslcert=/c.pem&sslkey=/k.pem",
                "has sslcert and sslkey, which only sslmode=verify-full",
            ),
            (
                "postgres://u:hunter2@db/t?sslmode=require&sslcert=/c.pem",
                "has one of sslcert and sslkey: give both, or neither",
            ),
            (
                "postgres://u:hunter2@db/t?sslmode=require&sslcert=/none/c.pem&sslkey=/none/k.pem",
                "has an sslcert or sslkey the gateway cannot use: cannot read certificate file /none/c.pem",
            ),
            (
                "postgres://u:hunter2@db/t?sslmode=require&sslrootcert=/nonexistent/ca.pem",
                "has an sslrootcert the gateway cannot use: cannot read CA file /nonexistent/ca.pem",
            ),
            (
                "postgres://u:hunter2@db/t?sslmode=require&sslrootcert=%FF",
                "has an sslrootcert that is not UTF-8",
            ),
        ] {
            let error = read(url).err().unwrap();
            assert!(error.starts_with(expected), "{url}: {error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}
