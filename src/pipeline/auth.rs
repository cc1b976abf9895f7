//! Who is calling: the API key, as `Authorization: Bearer KEY` or, as
//! Anthropic's SDKs send it, `x-api-key: KEY`.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use crate::config::Key;
use crate::error::GatewayError;
use crate::state::Snapshot;

/// The key the caller presented, `None` when the gateway has no keys.
pub fn authenticate<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
) -> Result<Option<&'s Key>, GatewayError> {
    if !snapshot.auth_required() {
        return Ok(None);
    }
    let presented = bearer(headers).or_else(|| api_key(headers)).ok_or_else(|| {
            GatewayError::unauthorized(
                "no API key: send it as the header `Authorization: Bearer YOUR_KEY` (the OpenAI SDKs' api_key) or `x-api-key: YOUR_KEY`",
            )
        })?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    snapshot.key(&digest).map(Some).ok_or_else(|| {
        GatewayError::unauthorized(
            "the API key is not valid for this gateway; check it with your gateway operator",
        )
    })
}

/// Admin endpoints need the admin token; without one configured they do
/// not exist (404, naming `target`, `METHOD PATH`, as for a path that
/// never existed), so a gateway never has an open admin API.
pub fn authenticate_admin(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    target: &str,
) -> Result<(), GatewayError> {
    let Some(expected) = snapshot.config.admin.token_sha256 else {
        return Err(GatewayError::not_found(target));
    };
    token(expected, headers, "admin endpoints need the admin token")
}

/// `/metrics` needs the metrics token when one is configured.
pub fn authenticate_metrics(snapshot: &Snapshot, headers: &HeaderMap) -> Result<(), GatewayError> {
    match snapshot.config.metrics.token_sha256 {
        Some(expected) => token(expected, headers, "/metrics needs the metrics token"),
        None => Ok(()),
    }
}

/// The bearer token must have digest `expected`; `needs` says which.
fn token(expected: [u8; 32], headers: &HeaderMap, needs: &str) -> Result<(), GatewayError> {
    let presented = bearer(headers).ok_or_else(|| {
        GatewayError::unauthorized(&format!("{needs}: `Authorization: Bearer TOKEN`"))
    })?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    // Comparing digests, not secrets, leaks nothing useful through timing.
    if digest == expected {
        Ok(())
    } else {
        Err(GatewayError::unauthorized(&format!(
            "{needs}, and this one is not valid"
        )))
    }
}

fn api_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The token of `Authorization: Bearer TOKEN`; the scheme's name is
/// case-insensitive (RFC 9110 §11.1), so `BEARER` is one too.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    const SCHEME: &str = "bearer ";
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let scheme = v.get(..SCHEME.len())?;
            scheme
                .eq_ignore_ascii_case(SCHEME)
                .then(|| &v[SCHEME.len()..])
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
}
