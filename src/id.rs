//! Random ids for requests and responses, and the header a request's id
//! travels in. They need to be unique, not secret: 128 bits from a fast
//! thread-local generator, as 32 hex digits (the shape of a simple UUID),
//! with no system call per id.

use axum::http::HeaderName;

/// The request id, on the client's request and response and on the
/// upstream call, so the logs can be joined.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

pub fn random() -> String {
    hex::encode(fastrand::u128(..).to_be_bytes())
}
