//! What the HTTP providers share: building the client and the bearer
//! credential, sending (and reading the upstream's quota headers), naming
//! transport failures, reading an error response, and reading an SSE body
//! as its `data` payloads.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use sse_stream::SseByteStream;

use crate::config::Backend;
use crate::error::GatewayError;
use crate::limits::UpstreamQuota;

/// Error bodies larger than this are cut: they only feed a message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub fn client(backend: &Backend) -> Result<Client, String> {
    Client::builder()
        .connect_timeout(backend.timeouts.connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        // Upstream APIs do not redirect; following one would resend the
        // request (and its credential) somewhere unconfigured.
        .redirect(reqwest::redirect::Policy::none())
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

/// Sends a request to backend `backend`, and keeps the quota the
/// response's headers report in `quota`, whatever its status.
pub async fn send(
    backend: &str,
    request: RequestBuilder,
    quota: &OnceLock<UpstreamQuota>,
) -> Result<Response, GatewayError> {
    let response = request
        .send()
        .await
        .map_err(|e| transport_error(backend, &e))?;
    if let Some(reported) = UpstreamQuota::from_headers(response.headers()) {
        let _ = quota.set(reported);
    }
    Ok(response)
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

    /// `retry-after`, as seconds or an HTTP date, when the upstream sent a
    /// usable one; at most an hour, so a bad header cannot bench a
    /// deployment for longer.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
        let wait = match value.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
            Ok(_) => return None,
            Err(_) => httpdate::parse_http_date(value)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        };
        Some(wait.min(MAX_RETRY_AFTER))
    }

    /// The error as the generic upstream mapping sees it.
    pub fn into_error(self, backend: &str) -> GatewayError {
        let retry_after = self.retry_after();
        GatewayError::upstream_status(backend, self.status, &self.body, retry_after)
    }
}

/// The `data` of each SSE event of a response body, parsed incrementally
/// (an event may be cut across reads; the parser's work is linear in the
/// bytes, however many events a read holds). Events without data
/// (comments, keep-alives) are skipped.
pub fn sse_data(
    backend: &str,
    response: Response,
) -> BoxStream<'static, Result<String, GatewayError>> {
    let backend = backend.to_owned();
    SseByteStream::new(response.bytes_stream())
        .map(move |event| match event {
            Ok(event) => Ok(event.data.unwrap_or_default()),
            Err(sse_stream::Error::Body(_)) => Err(GatewayError::upstream_broken(&backend)),
            Err(e) => Err(GatewayError::upstream_protocol(&backend, e)),
        })
        .try_filter(|data| std::future::ready(!data.is_empty()))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        ErrorReply {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers,
            body: Vec::new(),
        }
        .retry_after()
    }

    #[tokio::test]
    async fn sse_data_skips_comments_and_empty_events_and_joins_cut_ones() {
        let pieces: Vec<Result<&'static str, std::io::Error>> = vec![
            Ok(": keep-alive\n\ndata: {\"a\":1}\n\nda"),
            Ok("ta: {\"b\":2}\r\n\r\nevent: ping\n\n"),
            Ok("data: line one\ndata: line two\n\ndata: cut at the end"),
        ];
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
        let response = Response::from(axum::http::Response::new(body));
        let data: Vec<String> = sse_data("b", response).map(Result::unwrap).collect().await;
        assert_eq!(data, [r#"{"a":1}"#, r#"{"b":2}"#, "line one\nline two"]);
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_at_most_an_hour() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("999999"), Some(MAX_RETRY_AFTER));
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        let wait = retry_after(&httpdate::fmt_http_date(in_a_minute)).unwrap();
        assert!(
            (Duration::from_secs(58)..=Duration::from_secs(60)).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("-3"), None);
    }
}
