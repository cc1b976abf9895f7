//! Every response carries `x-request-id`: the client's own when it is a
//! sane token, else a new one. The front service assigns it for every
//! route, so handlers only read it (for logs and upstream calls).

use axum::http::{HeaderMap, HeaderValue};

use crate::id::REQUEST_ID_HEADER as HEADER;

/// The longest client id kept: room for the ids tracing systems and
/// load balancers make (a W3C trace id is 55), bounded for the logs.
const MAX_ID: usize = 256;

/// The request's id, in the extensions of a request served by the router.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The id of the request with `headers`, and the header value its
/// response carries.
pub fn for_request(headers: &HeaderMap) -> (String, HeaderValue) {
    let id = from_headers(headers);
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    (id, value)
}

fn from_headers(headers: &HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty() && id.len() <= MAX_ID && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(crate::id::random, str::to_owned)
}
