//! Every response carries `x-request-id`: the client's own when it is a
//! sane token, else a new one. One middleware sets it for every route, so
//! handlers only read it (for logs and upstream calls).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::id::REQUEST_ID_HEADER as HEADER;

/// The longest client id kept: room for the ids tracing systems and
/// load balancers make (a W3C trace id is 55), bounded for the logs.
const MAX_ID: usize = 256;

/// The request's id, put in the request's extensions by [`tag`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub async fn tag(mut request: Request, next: Next) -> Response {
    let id = from_headers(request.headers());
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    response.headers_mut().insert(HEADER, value);
    response
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
