//! Who is calling: the request id to answer with, and the API key.

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

use crate::config::Key;
use crate::error::GatewayError;
use crate::snapshot::Snapshot;

const REQUEST_ID: &str = "x-request-id";

/// The client's own `x-request-id` when it is a sane token, else a new one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

pub fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

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
