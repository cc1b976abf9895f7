//! What the HTTP providers share: the client (kept-alive connections of
//! its own over plain TCP, hyper-util's pooled client over rustls), the
//! bearer credential, building and sending a request (and reading the
//! upstream's quota headers), naming transport failures, reading a body
//! whole, as bytes as they come, or as SSE `data` payloads — each bounded
//! by the backend's caps — and reading an error response.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::uri::Scheme;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyDataStream, Full};
use hyper::body::{Frame, SizeHint};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use super::UpstreamCall;
use super::exchange::{Answer, Fields, Outgoing};
use super::pool::{self, Pool, RequestError, UpstreamBody};
use crate::config::{Backend, ClientTls};
use crate::error::{self, GatewayError};
use crate::gather::gather;
use crate::limits::UpstreamQuota;

/// Error bodies larger than this are cut: they only feed a message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The client for a backend's URLs: kept-alive HTTP/1.1 connections of
/// its own over plain TCP, read on the request's task, for a backend at an
/// `http://` URL (a self-hosted engine on a private network, where the
/// gateway's own CPU is most of the time a request takes, and every open
/// stream holds a connection), and hyper-util's pooled client over rustls
/// for one at `https://`, with HTTP/2 where TLS negotiates it. Plain
/// connections carry no TLS session state (1.1 KB for as long as one is
/// open, and every open stream holds one). It follows no redirects:
/// upstream APIs do not redirect, and following one would resend the
/// request (and its credential) somewhere unconfigured.
#[derive(Clone)]
pub enum HttpClient {
    Plain(Pool),
    Tls(Box<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>),
}

impl HttpClient {
    pub async fn request(&self, request: Outgoing) -> Result<UpstreamResponse, RequestError> {
        match self {
            Self::Plain(pool) => pool.request(request).await,
            Self::Tls(client) => match client.request(request.into_request(Full::new)).await {
                Ok(response) => {
                    let (head, body) = response.into_parts();
                    Ok(Answer {
                        status: head.status,
                        fields: head.headers.into(),
                        body: body.into(),
                    })
                }
                Err(e) if e.is_connect() => Err(RequestError::Connect(error::chain(&e))),
                Err(e) => Err(
                    match std::error::Error::source(&e)
                        .and_then(|e| e.downcast_ref::<hyper::Error>())
                    {
                        Some(parse) if parse.is_parse() => RequestError::Invalid(parse.to_string()),
                        _ => RequestError::Exchange(e.to_string()),
                    },
                ),
            },
        }
    }
}

pub type UpstreamResponse = Answer<UpstreamBody>;

/// The client for a backend's URLs, which all share its `base_url`'s scheme.
pub fn client(backend: &Backend) -> Result<HttpClient, String> {
    let url = backend
        .base_url
        .as_ref()
        .ok_or_else(|| format!("backend \"{}\" has no base_url", backend.name))?;
    new_client(url, backend.timeouts.connect, &backend.tls).map_err(|e| {
        format!(
            "cannot build the HTTP client for backend \"{}\": {e}",
            backend.name
        )
    })
}

/// A client for URLs with `url`'s scheme, that gives up connecting after
/// `connect_timeout` and speaks TLS as `tls` says.
pub fn new_client(
    url: &Url,
    connect_timeout: Duration,
    tls: &ClientTls,
) -> Result<HttpClient, String> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_nodelay(true);
    if url.scheme() == "http" {
        return Ok(HttpClient::Plain(Pool::new(tcp)));
    }
    tcp.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls.config()?)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool::IDLE_TIMEOUT)
        .build(connector);
    Ok(HttpClient::Tls(Box::new(client)))
}

/// A URL the gateway posts to, parsed once, with the `Host` header sent
/// to it: made once here rather than formatted for every request by the
/// client (which sets only a missing one), and the one Bedrock signs.
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: Uri,
    pub host: HeaderValue,
}

/// The `Host` header for `uri`: its port only when it is not the
/// scheme's default, as HTTP clients write it.
fn host_header(uri: &Uri) -> Result<HeaderValue, String> {
    let name = uri.host().ok_or("it has no host")?;
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::try_from(format!("{name}:{port}")),
        _ => HeaderValue::try_from(name),
    }
    .map_err(|e| e.to_string())
}

/// Backend `backend`'s URL `url` as a [`Target`].
pub fn target(backend: &str, url: &str) -> Result<Target, String> {
    let bad = |e: &dyn std::fmt::Display| format!("backend \"{backend}\": bad URL {url}: {e}");
    let uri: Uri = url.parse().map_err(|e| bad(&e))?;
    let host = host_header(&uri).map_err(|e| bad(&e))?;
    Ok(Target { uri, host })
}

/// A `POST` of a JSON body to `target`.
pub fn post_json(target: &Target, body: Vec<u8>) -> Outgoing {
    let mut request = Outgoing::new(
        Method::POST,
        target.uri.clone(),
        target.host.clone(),
        Bytes::from(body),
    );
    let json = HeaderValue::from_static("application/json");
    request.fields.push((CONTENT_TYPE, json));
    request
}

/// A `GET` of `target`.
pub fn get(target: &Target) -> Outgoing {
    Outgoing::new(
        Method::GET,
        target.uri.clone(),
        target.host.clone(),
        Bytes::new(),
    )
}

/// Tags an upstream request with the gateway's request id, so the two
/// logs can be joined, and with the attempt's trace context when traces
/// are exported.
pub fn tag(request: &mut Outgoing, call: &UpstreamCall<'_>) {
    if let Ok(id) = HeaderValue::from_str(call.request_id) {
        request.fields.push((crate::id::REQUEST_ID_HEADER, id));
    }
    for (name, value) in call.trace {
        request.fields.push((name.clone(), value.clone()));
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
    request: Outgoing,
    quota: &OnceLock<UpstreamQuota>,
) -> Result<UpstreamResponse, GatewayError> {
    let response = client.request(request).await.map_err(|e| match e {
        RequestError::Connect(why) => {
            // The client is told only that it failed; the operator why
            // (refused, timed out, a certificate that does not verify).
            tracing::warn!(backend, error = why, "cannot connect to the backend");
            GatewayError::upstream_connect(backend)
        }
        RequestError::Exchange(_) => GatewayError::upstream_request_failed(backend),
        RequestError::Invalid(what) => GatewayError::upstream_protocol(backend, what),
    })?;
    if let Some(reported) = UpstreamQuota::from_fields(response.fields.iter()) {
        let _ = quota.set(reported);
    }
    Ok(response)
}

/// How much one response of a backend may hold: its whole body
/// (`max_response_bytes`), streamed or not, and one event in a stream
/// (`max_event_bytes`). Bytes are counted as they arrive, so no more than
/// a cap is ever held.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub body: u64,
    pub event: u64,
}

impl Caps {
    pub fn of(backend: &Backend) -> Self {
        Self {
            body: backend.max_response_bytes,
            event: backend.max_event_bytes,
        }
    }

    /// `what` (with its verb, e.g. "sent an SSE event") is over the event cap.
    pub fn event_too_large(self, backend: &str, what: impl std::fmt::Display) -> GatewayError {
        GatewayError::upstream_too_large(backend, what, "max_event_bytes", self.event)
    }

    fn body_too_large(self, backend: &str, what: impl std::fmt::Display) -> GatewayError {
        GatewayError::upstream_too_large(backend, what, "max_response_bytes", self.body)
    }
}

/// The whole body of a response, refused without a byte read when its
/// `content-length` is over the cap, and as soon as more than the cap
/// arrives when it has none.
pub async fn read_body(
    backend: &str,
    caps: Caps,
    response: UpstreamResponse,
) -> Result<Bytes, GatewayError> {
    let body = response.body;
    let declared = hyper::body::Body::size_hint(&body).lower();
    if declared > caps.body {
        return Err(caps.body_too_large(
            backend,
            format_args!("announced a response body of {declared} bytes,"),
        ));
    }
    gather(Capped::new(backend, caps, body, false), declared)
        .await
        .map_err(|BodyError(error)| error)
}

/// The body of a response as its bytes arrive, at most `caps.body` of them.
pub fn body_bytes(
    backend: &str,
    caps: Caps,
    response: UpstreamResponse,
) -> impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'static {
    BodyDataStream::new(Capped::new(backend, caps, response.body, false))
        .map_err(|BodyError(error)| error)
}

/// A body that fails once more than `caps.body` bytes have arrived, and,
/// for SSE, once an event runs past `caps.event`; a transport failure is
/// `upstream_broken`. Its error is the one to answer.
pub(super) struct Capped<B> {
    body: B,
    backend: String,
    caps: Caps,
    received: u64,
    /// SSE only: where events end, so the one the parser holds is bounded.
    events: Option<EventBounds>,
}

/// The error of a [`Capped`] body (a `std::error::Error`, as the SSE
/// parser requires of a body's).
#[derive(Debug)]
pub(super) struct BodyError(pub(super) GatewayError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

impl std::error::Error for BodyError {}

impl<B> Capped<B> {
    pub(super) fn new(backend: &str, caps: Caps, body: B, sse: bool) -> Self {
        Self {
            body,
            backend: backend.to_owned(),
            caps,
            received: 0,
            events: sse.then(EventBounds::default),
        }
    }

    /// Counts `data` in; the error when a cap is passed.
    fn count(&mut self, data: &[u8]) -> Result<(), GatewayError> {
        self.received += data.len() as u64;
        if self.received > self.caps.body {
            return Err(self
                .caps
                .body_too_large(&self.backend, "sent a response body"));
        }
        let cap = self.caps.event;
        let largest_event = self
            .events
            .as_mut()
            .map_or(0, |events| events.take(data, cap));
        if largest_event > cap {
            return Err(self
                .caps
                .event_too_large(&self.backend, "sent an SSE event"));
        }
        Ok(())
    }
}

impl<B> hyper::body::Body for Capped<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                let error = GatewayError::upstream_broken(&this.backend);
                return Poll::Ready(Some(Err(BodyError(error))));
            }
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            if let Err(error) = this.count(data) {
                return Poll::Ready(Some(Err(BodyError(error))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where SSE events end — at a blank line, that is two line ends in a
/// row, a line end being CRLF, LF or CR — to size the events of a byte
/// stream without keeping their bytes: one `memchr` pass over each read.
#[derive(Debug, Default)]
struct EventBounds {
    /// Bytes of the event not ended yet.
    open: u64,
    /// The last byte scanned ended a line: `b'\r'` or `b'\n'`.
    line_end: Option<u8>,
}

impl EventBounds {
    /// Takes the next bytes of the stream, as [`scan`](Self::scan) does;
    /// what it returns passes `cap` exactly when the largest event does.
    /// Upstreams mostly send whole events, so a read that ends one and
    /// cannot hold more than `cap` is taken without looking inside.
    fn take(&mut self, bytes: &[u8], cap: u64) -> u64 {
        let most = self.open + bytes.len() as u64;
        let ends_event = [&b"\n\n"[..], b"\r\r", b"\n\r\n"]
            .iter()
            .any(|end| bytes.ends_with(end));
        if most <= cap && ends_event {
            self.open = 0;
            self.line_end = bytes.last().copied();
            return most;
        }
        self.scan(bytes)
    }

    /// Takes the next bytes of the stream; returns the size of the largest
    /// event they end or leave open.
    fn scan(&mut self, bytes: &[u8]) -> u64 {
        let mut largest = 0;
        // Where the open event's bytes in `bytes` begin.
        let mut start = 0;
        let mut last = self.line_end;
        // Just past the last line-end byte; `last` is the byte before it.
        let mut next = 0;
        for at in memchr::memchr2_iter(b'\n', b'\r', bytes) {
            let byte = bytes[at];
            let blank_line = match (at == next).then_some(last).flatten() {
                // The LF of a CRLF ends the same line as its CR.
                Some(b'\r') => byte == b'\r',
                Some(_) => true,
                None => false,
            };
            if blank_line {
                largest = largest.max(self.open + (at + 1 - start) as u64);
                self.open = 0;
                start = at + 1;
            } else if at == start && self.open == 0 && byte == b'\n' {
                // The LF of the CRLF that ended the last event.
                start = at + 1;
            }
            last = Some(byte);
            next = at + 1;
        }
        self.line_end = if next == bytes.len() { last } else { None };
        self.open += (bytes.len() - start) as u64;
        largest.max(self.open)
    }
}

/// An error status as received: status, header fields and (the start of)
/// the body.
pub struct ErrorReply {
    pub status: StatusCode,
    pub fields: Fields,
    pub body: Vec<u8>,
}

impl ErrorReply {
    pub async fn read(response: UpstreamResponse) -> Self {
        let mut read = Vec::new();
        let mut chunks = BodyDataStream::new(response.body);
        while let Some(Ok(chunk)) = chunks.next().await {
            read.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - read.len())]);
            if read.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        Self {
            status: response.status,
            fields: response.fields,
            body: read,
        }
    }

    /// How long the upstream asks to be left alone, when it sent a usable
    /// hint: OpenAI's `retry-after-ms` (milliseconds, which its SDKs read
    /// first), else `retry-after` (seconds or an HTTP date). At most an
    /// hour, so a bad header cannot bench a deployment for longer.
    pub fn retry_after(&self) -> Option<Duration> {
        let seconds = |value: &str, per_second: f64| {
            let n = value.trim().parse::<f64>().ok()?;
            (n.is_finite() && n >= 0.0).then(|| Duration::from_secs_f64(n / per_second))
        };
        let ms = self.fields.get_str("retry-after-ms");
        let wait = if let Some(wait) = ms.and_then(|ms| seconds(ms, 1000.0)) {
            wait
        } else {
            let value = self.fields.get_str(RETRY_AFTER.as_str())?.trim();
            match seconds(value, 1.0) {
                Some(wait) => wait,
                None if value.parse::<f64>().is_ok() => return None,
                None => httpdate::parse_http_date(value)
                    .ok()?
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            }
        };
        Some(wait.min(MAX_RETRY_AFTER))
    }

    /// The error as the generic upstream mapping sees it.
    pub fn into_error(self, backend: &str) -> GatewayError {
        let retry_after = self.retry_after();
        GatewayError::upstream_status(backend, self.status, &self.body, retry_after)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;

    fn retry_after(value: &str) -> Option<Duration> {
        hinted(&[("retry-after", value)])
    }

    fn hinted(fields: &[(&'static str, &str)]) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for &(name, value) in fields {
            headers.insert(name, HeaderValue::from_str(value).unwrap());
        }
        ErrorReply {
            status: StatusCode::TOO_MANY_REQUESTS,
            fields: headers.into(),
            body: Vec::new(),
        }
        .retry_after()
    }

    #[tokio::test]
    async fn plain_http_urls_get_a_client_without_tls() {
        let client = |url: &str| {
            new_client(
                &Url::parse(url).unwrap(),
                Duration::from_secs(1),
                &ClientTls::default(),
            )
        };
        assert!(matches!(
            client("http://10.0.0.5:8000/v1"),
            Ok(HttpClient::Plain(_))
        ));
        assert!(matches!(
            client("https://api.together.xyz/v1"),
            Ok(HttpClient::Tls(_))
        ));
    }

    #[test]
    fn event_bounds_size_events_whatever_their_line_ends_and_cuts() {
        let sizes = |pieces: &[&[u8]]| {
            let mut bounds = EventBounds::default();
            pieces.iter().map(|p| bounds.scan(p)).collect::<Vec<_>>()
        };
        // Each ending closes an event: LF LF, CRLF CRLF, CR CR, mixed. An
        // event is sized up to its blank line's CR; a CRLF's LF after it
        // belongs to no event.
        for (ending, first, second) in [
            ("\n\n", 9, 10),
            ("\r\n\r\n", 10, 11),
            ("\r\r", 9, 10),
            ("\n\r\n", 9, 10),
            ("\r\n\n", 10, 11),
            ("\n\r", 9, 10),
        ] {
            let text = format!("data: a{ending}data: bb{ending}");
            let mut bounds = EventBounds::default();
            assert_eq!(bounds.scan(text.as_bytes()), second, "{ending:?}");
            assert_eq!(bounds.open, 0, "{ending:?}");
            // Cut inside the ending: the second part closes the event.
            let cut = 7 + ending.len() / 2;
            let (a, b) = text.as_bytes().split_at(cut);
            let mut bounds = EventBounds::default();
            assert_eq!(bounds.scan(a), cut as u64, "{ending:?}");
            assert_eq!(bounds.scan(b), first.max(second), "{ending:?}");
            assert_eq!(bounds.open, 0, "{ending:?}");
        }
        // A CRLF is one line end, not a blank line; an open event grows.
        assert_eq!(
            sizes(&[b"data: a\r\ndata: b\r", b"\n", b"data: c"]),
            [17, 18, 25]
        );
        assert_eq!(sizes(&[b"x\n\ny", b"yy", b"\n\nz"]), [3, 3, 5]);
    }

    #[test]
    fn reads_that_end_an_event_are_taken_as_a_full_scan_would() {
        let reads: &[&[u8]] = &[
            b"data: a\n\n",
            b"data: bb\r\n\r\n",
            b"data: cc",
            b"c\r\r",
            b"\n",
            b"data: dddd\n\r\n",
            b"data: e\n\ndata: ff",
            b"f\n\n",
        ];
        for cap in [0, 4, 9, 12, 1000] {
            let (mut fast, mut full) = (EventBounds::default(), EventBounds::default());
            for read in reads {
                let (taken, scanned) = (fast.take(read, cap), full.scan(read));
                assert_eq!(taken > cap, scanned > cap, "cap {cap}, {read:?}");
                assert_eq!(
                    (fast.open, fast.line_end),
                    (full.open, full.line_end),
                    "cap {cap}, {read:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_capped_body_is_read_up_to_its_cap_and_a_broken_one_is_upstream_broken() {
        let caps = Caps {
            body: 10,
            event: 10,
        };
        let read = |pieces: Vec<Result<&'static [u8], std::io::Error>>| async move {
            let frames = pieces
                .into_iter()
                .map(|p| p.map(|p| Frame::data(Bytes::from_static(p))));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            gather(Capped::new("b", caps, body, false), 0)
                .await
                .map_err(|BodyError(error)| error)
        };
        assert_eq!(
            read(vec![Ok(b"01234"), Ok(b"56789")]).await.unwrap(),
            "0123456789"
        );
        let error = read(vec![Ok(b"01234"), Ok(b"567890")]).await.unwrap_err();
        assert_eq!(error.code(), Some("upstream_response_too_large"));
        let error = read(vec![
            Ok(b"01234"),
            Err(std::io::ErrorKind::ConnectionReset.into()),
        ])
        .await
        .unwrap_err();
        assert_eq!(error.code(), Some("upstream_disconnected"));
        assert!(error.retriable(), "the client has seen nothing of it");
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
        let fields: Vec<_> = (request.fields.iter())
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                ("host", "10.0.0.5:8000"),
                ("content-type", "application/json")
            ]
        );
        assert_eq!(request.uri, "http://10.0.0.5:8000/v1/chat/completions");
        let hyper = request.into_request(Full::new);
        assert_eq!(hyper.headers()["host"], "10.0.0.5:8000");
        assert_eq!(hyper.method(), Method::POST);
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

    #[test]
    fn retry_after_ms_is_read_first() {
        let ms = Some(Duration::from_millis(1500));
        assert_eq!(hinted(&[("retry-after-ms", "1500")]), ms);
        assert_eq!(
            hinted(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            ms
        );
        assert_eq!(hinted(&[("retry-after-ms", "1e12")]), Some(MAX_RETRY_AFTER));
        assert_eq!(
            hinted(&[("retry-after-ms", "-1"), ("retry-after", "2")]),
            Some(Duration::from_secs(2))
        );
    }
}
