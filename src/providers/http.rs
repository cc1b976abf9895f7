//! What the HTTP providers share: building the client and the bearer
//! credential, naming transport failures, reading an error response, and
//! reading an SSE body as its `data` payloads.

use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};

use crate::config::Backend;
use crate::error::GatewayError;

/// Error bodies larger than this are cut: they only feed a message.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub fn client(backend: &Backend) -> Result<Client, String> {
    Client::builder()
        .connect_timeout(backend.timeouts.connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| {
            format!(
                "cannot build the HTTP client for backend \"{}\": {e}",
                backend.name
            )
        })
}

/// `Authorization: Bearer <api_key_env>`, marked sensitive so it never
/// shows in a `Debug` print.
pub fn bearer(backend: &Backend) -> Result<Option<HeaderValue>, String> {
    backend
        .credential
        .as_ref()
        .map(|secret| {
            let mut value =
                HeaderValue::try_from(format!("Bearer {}", secret.expose())).map_err(|_| {
                    format!(
                        "the credential of backend \"{}\" is not a valid header value",
                        backend.name
                    )
                })?;
            value.set_sensitive(true);
            Ok(value)
        })
        .transpose()
}

pub fn transport_error(backend: &str, e: &reqwest::Error) -> GatewayError {
    if e.is_connect() {
        GatewayError::upstream_connect(backend)
    } else if e.is_body() || e.is_decode() {
        GatewayError::upstream_broken(backend)
    } else {
        let mut error = GatewayError::upstream_connect(backend);
        error.message = format!("request to backend \"{backend}\" failed before a response");
        error
    }
}

/// An error status as received: status, headers and (the start of) the body.
pub struct ErrorReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl ErrorReply {
    pub async fn read(response: Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())]);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        Self {
            status,
            headers,
            body,
        }
    }

    /// `retry-after` in seconds, when the upstream sent a usable one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
    }

    /// The error as the generic upstream mapping sees it.
    pub fn into_error(self, backend: &str) -> GatewayError {
        let retry_after = self.retry_after();
        GatewayError::upstream_status(backend, self.status, &self.body, retry_after)
    }
}

/// The `data` of each SSE event of a response body, parsed incrementally
/// (an event may be cut across reads). Events without data (comments,
/// keep-alives) are skipped.
pub fn sse_data(
    backend: &str,
    response: Response,
) -> BoxStream<'static, Result<String, GatewayError>> {
    let backend = backend.to_owned();
    response
        .bytes_stream()
        .eventsource()
        .map(move |event| match event {
            Ok(event) => Ok(event.data),
            Err(EventStreamError::Transport(_)) => Err(GatewayError::upstream_broken(&backend)),
            Err(e) => Err(GatewayError::upstream_protocol(&backend, e)),
        })
        .try_filter(|data| std::future::ready(!data.is_empty()))
        .boxed()
}
