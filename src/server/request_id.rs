//! Every response carries `x-request-id`: the client's own when it is a
//! sane token, else a new one. The server's one middleware assigns it for
//! every route, so handlers only read it (for logs and upstream calls).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};

use crate::id::REQUEST_ID_HEADER as HEADER;

/// The longest client id kept: room for the ids tracing systems and
/// load balancers make (a W3C trace id is 55), bounded for the logs.
const MAX_ID: usize = 256;

/// The request's id, put in the request's extensions by [`tag`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives `request` its id, in its extensions, and returns the header
/// value its response carries.
pub fn assign(request: &mut Request) -> HeaderValue {
    let id = from_headers(request.headers());
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    request.extensions_mut().insert(RequestId(id));
    value
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
