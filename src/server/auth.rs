//! Who is calling: the API key.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use crate::config::Key;
use crate::error::GatewayError;
use crate::snapshot::Snapshot;

/// The key the caller presented, `None` when the gateway has no keys.
pub fn authenticate<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
) -> Result<Option<&'s Key>, GatewayError> {
    if !snapshot.auth_required() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            GatewayError::unauthorized(
                "no API key: send it as the header `Authorization: Bearer YOUR_KEY` (the OpenAI SDKs' api_key)",
            )
        })?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    snapshot.key(&digest).map(Some).ok_or_else(|| {
        GatewayError::unauthorized(
            "the API key is not valid for this gateway; check it with your gateway operator",
        )
    })
}
