//! CORS for browser clients, for the origins `server.cors_origins` names
//! (none by default). The origins are read from the running config at
//! each request, so a reload changes them. Only requests that carry an
//! `Origin` (browsers) go through the CORS service (see `front.rs`): for
//! every other client it would only add `vary` headers and work to each
//! response.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderName, HeaderValue, Method, request::Parts};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::error::{LIMIT_HEADERS, RETRY_AFTER_MS};
use crate::id::REQUEST_ID_HEADER;
use crate::pipeline::CONFIG_VERSION_HEADER;
use crate::pipeline::respond::{ATTEMPTS_HEADER, BACKEND_HEADER};
use crate::state::AppState;

/// What a preflight answer may be cached for.
const MAX_AGE: Duration = Duration::from_secs(600);

/// Response headers a page's script may read: ids and what to wait for
/// (beside a refusing limit's own, [`LIMIT_HEADERS`]).
const EXPOSED: [HeaderName; 7] = [
    REQUEST_ID_HEADER,
    BACKEND_HEADER,
    ATTEMPTS_HEADER,
    CONFIG_VERSION_HEADER,
    RETRY_AFTER,
    RETRY_AFTER_MS,
    HeaderName::from_static("x-should-retry"),
];

/// The CORS layer for the origins the running config allows.
pub fn layer(app: Arc<AppState>) -> CorsLayer {
    let allowed = move |origin: &HeaderValue, _: &Parts| {
        app.snapshot
            .load()
            .config
            .server
            .allows_origin(origin.as_bytes())
    };
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(allowed))
        .allow_methods([Method::GET, Method::POST])
        // The SDKs send headers of their own (`x-stainless-…`): whatever a
        // preflight asks for is allowed; the API key still decides.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(
            EXPOSED
                .into_iter()
                .chain(LIMIT_HEADERS.into_iter().flatten())
                .collect::<Vec<_>>(),
        )
        .max_age(MAX_AGE)
}
