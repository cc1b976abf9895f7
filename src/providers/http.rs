//! What the HTTP providers share: the client (hyper's pooled client, over
//! plain TCP or rustls), the bearer credential, building and sending a
//! request (and reading the upstream's quota headers), naming transport
//! failures, reading a body whole, as bytes as they come, or as SSE `data`
//! payloads, and reading an error response.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, HOST, RETRY_AFTER};
use axum::http::uri::Scheme;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sse_stream::SseStream;
use url::Url;

use crate::config::Backend;
use crate::error::GatewayError;
use crate::limits::UpstreamQuota;

/// Error bodies larger than this are cut: they only feed a message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// hyper's pooled client, over plain TCP for a backend at an `http://`
/// URL (a self-hosted engine on a private network) and over rustls for one
/// at `https://`, with HTTP/2 where TLS negotiates it. Two clients, not one
/// that does both: a connection that might be TLS carries a TLS session's
/// state (1.1 KB) for as long as it is open, used or not, and every open
/// stream holds an upstream connection. It follows no redirects: upstream
/// APIs do not redirect, and following one would resend the request (and
/// its credential) somewhere unconfigured.
#[derive(Clone)]
pub enum HttpClient {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl HttpClient {
    pub fn request(&self, request: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            Self::Plain(client) => client.request(request),
            Self::Tls(client) => client.request(request),
        }
    }
}

pub type UpstreamResponse = Response<Incoming>;

/// The client for a backend's URLs, which all share its `base_url`'s scheme.
pub fn client(backend: &Backend) -> Result<HttpClient, String> {
    let url = backend
        .base_url
        .as_ref()
        .ok_or_else(|| format!("backend \"{}\" has no base_url", backend.name))?;
    new_client(url, backend.timeouts.connect).map_err(|e| {
        format!(
            "cannot build the HTTP client for backend \"{}\": {e}",
            backend.name
        )
    })
}

/// A client for URLs with `url`'s scheme, that gives up connecting after
/// `connect_timeout`.
pub fn new_client(url: &Url, connect_timeout: Duration) -> Result<HttpClient, String> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE);
    if url.scheme() == "http" {
        return Ok(HttpClient::Plain(builder.build(tcp)));
    }
    tcp.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .try_with_platform_verifier()
        .map_err(|e| e.to_string())?
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    Ok(HttpClient::Tls(builder.build(connector)))
}

/// A URL the gateway posts to, parsed once, with the `Host` header sent
/// to it: made once here rather than formatted for every request by the
/// client (which sets only a missing one), and the one Bedrock signs.
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: Uri,
    pub host: HeaderValue,
}

/// Backend `backend`'s URL `url` as a [`Target`]. The port is in `Host`
/// only when it is not the scheme's default, as HTTP clients write it.
pub fn target(backend: &str, url: &str) -> Result<Target, String> {
    let bad = |e: &dyn std::fmt::Display| format!("backend \"{backend}\": bad URL {url}: {e}");
    let uri: Uri = url.parse().map_err(|e| bad(&e))?;
    let name = uri.host().ok_or_else(|| bad(&"it has no host"))?;
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let host = match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::try_from(format!("{name}:{port}")),
        _ => HeaderValue::try_from(name),
    }
    .map_err(|e| bad(&e))?;
    Ok(Target { uri, host })
}

/// A `POST` of a JSON body to `target`.
pub fn post_json(target: &Target, body: Vec<u8>) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = target.uri.clone();
    let headers = request.headers_mut();
    headers.insert(HOST, target.host.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}

/// Tags an upstream request with the gateway's request id, so the two
/// logs can be joined.
pub fn tag(request: &mut Request<Full<Bytes>>, request_id: &str) {
    if let Ok(id) = HeaderValue::from_str(request_id) {
        request
            .headers_mut()
            .insert(crate::id::REQUEST_ID_HEADER, id);
    }
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
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    quota: &OnceLock<UpstreamQuota>,
) -> Result<UpstreamResponse, GatewayError> {
    let response = client.request(request).await.map_err(|e| {
        if e.is_connect() {
            GatewayError::upstream_connect(backend)
        } else {
            GatewayError::upstream_request_failed(backend)
        }
    })?;
    if let Some(reported) = UpstreamQuota::from_headers(response.headers()) {
        let _ = quota.set(reported);
    }
    Ok(response)
}

/// The whole body of a response.
pub async fn read_body(backend: &str, response: UpstreamResponse) -> Result<Bytes, GatewayError> {
    match response.into_body().collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(_) => Err(GatewayError::upstream_broken(backend)),
    }
}

/// The body of a response as its bytes arrive.
pub fn body_bytes(
    response: UpstreamResponse,
) -> impl Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static {
    BodyDataStream::new(response.into_body())
}

/// An error status as received: status, headers and (the start of) the body.
pub struct ErrorReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl ErrorReply {
    pub async fn read(response: UpstreamResponse) -> Self {
        let (parts, body) = response.into_parts();
        let mut read = Vec::new();
        let mut chunks = BodyDataStream::new(body);
        while let Some(Ok(chunk)) = chunks.next().await {
            read.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - read.len())]);
            if read.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        Self {
            status: parts.status,
            headers: parts.headers,
            body: read,
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
pub fn sse_data<B>(
    backend: &str,
    body: B,
) -> impl Stream<Item = Result<String, GatewayError>> + Send + 'static
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let backend = backend.to_owned();
    SseStream::new(body)
        .map(move |event| match event {
            Ok(event) => Ok(event.data.unwrap_or_default()),
            Err(sse_stream::Error::Body(_)) => Err(GatewayError::upstream_broken(&backend)),
            Err(e) => Err(GatewayError::upstream_protocol(&backend, e)),
        })
        .try_filter(|data| std::future::ready(!data.is_empty()))
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;
    use hyper::body::Frame;

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
    async fn plain_http_urls_get_a_client_without_tls() {
        let client = |url: &str| new_client(&Url::parse(url).unwrap(), Duration::from_secs(1));
        assert!(matches!(
            client("http://10.0.0.5:8000/v1"),
            Ok(HttpClient::Plain(_))
        ));
        assert!(matches!(
            client("https://api.together.xyz/v1"),
            Ok(HttpClient::Tls(_))
        ));
    }

    #[tokio::test]
    async fn sse_data_skips_comments_and_empty_events_and_joins_cut_ones() {
        let pieces = [
            ": keep-alive\n\ndata: {\"a\":1}\n\nda",
            "ta: {\"b\":2}\r\n\r\nevent: ping\n\n",
            "data: line one\ndata: line two\n\ndata: cut at the end",
        ]
        .map(|piece| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(piece.as_bytes()))));
        let body = StreamBody::new(futures_util::stream::iter(pieces));
        let data: Vec<String> = sse_data("b", body).map(Result::unwrap).collect().await;
        assert_eq!(data, [r#"{"a":1}"#, r#"{"b":2}"#, "line one\nline two"]);
    }

    #[test]
    fn a_target_carries_the_host_header_clients_write() {
        let host = |url: &str| target("b", url).unwrap().host;
        assert_eq!(
            host("http://127.0.0.1:8000/v1/chat/completions"),
            "127.0.0.1:8000"
        );
        assert_eq!(host("http://vllm.internal/v1/completions"), "vllm.internal");
        assert_eq!(host("http://vllm.internal:80/v1"), "vllm.internal");
        assert_eq!(host("https://api.groq.com:443/openai/v1"), "api.groq.com");
        assert_eq!(
            host("https://api.groq.com:8443/openai/v1"),
            "api.groq.com:8443"
        );
        assert_eq!(host("http://[::1]:9000/generate"), "[::1]:9000");
        let request = post_json(
            &target("b", "http://10.0.0.5:8000/v1/chat/completions").unwrap(),
            Vec::new(),
        );
        assert_eq!(request.headers()[HOST], "10.0.0.5:8000");
        assert_eq!(request.uri(), "http://10.0.0.5:8000/v1/chat/completions");
        let error = target("b", "/v1/chat/completions").unwrap_err();
        assert!(
            error.contains("backend \"b\": bad URL /v1/chat/completions"),
            "{error}"
        );
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
