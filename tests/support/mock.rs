//! A mock OpenAI-compatible upstream (vLLM, OpenAI, Together, Groq) on
//! 127.0.0.1, port 0, written directly on hyper so every byte it sends is
//! under the test's control.
//!
//! ```ignore
//! let upstream = MockUpstream::openai()
//!     .first_byte_after(Duration::from_millis(50))
//!     .stream("vllm_chat_usage.sse")
//!     .start()
//!     .await;
//! // base_url = "{upstream.base_url()}/v1" in the gateway's config
//! ```
//!
//! It answers `POST …/chat/completions` and `POST …/completions` under any
//! prefix (`/v1`, Groq's `/openai/v1`), records each request, and replies
//! with one configured behaviour: a JSON body (canned or given), an SSE
//! stream (canned, or a byte-exact `.sse` fixture from
//! `tests/fixtures/openai/`) when the request has `"stream": true`, or any
//! status with any body. Faults: a late response head, a late first body
//! byte, a pause between events, a connection dropped after N events or
//! in the middle of a whole body, a whole body sent chunked (its size
//! unknown until read), a stream held open until `MockServer::release`,
//! events cut across TCP writes, a stream that ends without a
//! `finish_reason`. Oversized answers are `body` and
//! `stream_bytes` with big bytes. It reports connections the peer closed.
//!
//! The protocol (`openai_mock`, `tgi_mock`, `bedrock_mock`) decides the
//! routes and the canned answers; the faults apply to every protocol.
//! Benches include the support folder with `#[path]`;
//! `MockUpstream::canned(n)` is the fast mode for them: no delays and no
//! request bodies kept.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::certs::ServerTls;
use super::vision::Vision;
use super::{bedrock_mock, openai_mock, tgi_mock};

/// The directory of the byte-exact upstream recordings.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openai");

/// The bytes of `tests/fixtures/openai/<name>`.
pub fn fixture(name: &str) -> Bytes {
    let path = format!("{FIXTURES}/{name}");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
        .into()
}

/// A chat stream, as an upstream that reports no usage sends it: the
/// role's chunk, a chunk of each of `texts`, one that ends it with
/// `finish`, and `[DONE]`.
pub fn stream_without_usage<'t>(texts: impl IntoIterator<Item = &'t str>, finish: &str) -> String {
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let mut sse = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    for text in texts {
        sse += &chunk(json!({"content": text}), Value::Null);
    }
    sse += &chunk(json!({}), json!(finish));
    sse + "data: [DONE]\n\n"
}

/// A vLLM mock whose stream of "Hello" ends, its body closed cleanly,
/// before any `finish_reason` or `[DONE]`: the answer was cut short.
pub fn unfinished_stream() -> MockUpstream {
    MockUpstream::openai()
        .stream_bytes(stream_without_usage(["Hel", "lo"], "stop"))
        .omit_finish()
        .omit_done()
}

/// Cuts an SSE byte stream after each blank line, so that the pieces,
/// concatenated, are the input again, byte for byte. A trailing partial
/// event is kept as a last piece.
pub fn split_events(sse: &[u8]) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < sse.len() {
        let end = if sse[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if sse[i..].starts_with(b"\n\n") || sse[i..].starts_with(b"\r\r") {
            Some(i + 2)
        } else {
            None
        };
        match end {
            Some(end) => {
                events.push(Bytes::copy_from_slice(&sse[start..end]));
                start = end;
                i = end;
            }
            None => i += 1,
        }
    }
    if start < sse.len() {
        events.push(Bytes::copy_from_slice(&sse[start..]));
    }
    events
}

/// The base URL of a port on 127.0.0.1 that nothing listens on, so
/// connecting to it is refused. The socket stays bound but never listens:
/// a dropped listener's port could be handed to a parallel test's mock.
/// It is leaked on purpose; each test runs in its own process.
pub async fn refused_base_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("bound address");
    std::mem::forget(socket);
    format!("http://{addr}")
}

/// How the mock answers every request. Build with `openai()` or
/// `canned(n)`, then `start()`.
#[derive(Clone)]
pub struct MockUpstream {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The non-streaming body; `None` for the canned one.
    body: Option<Bytes>,
    /// The SSE stream, one item per event; `None` for the canned one.
    events: Option<Vec<Bytes>>,
    canned_chunks: usize,
    /// Answers generated per request instead of canned ones.
    generate: Option<Generate>,
    /// The prompt is counted a token a byte of its text.
    token_a_byte: bool,
    /// How the served model counts an image.
    vision: Vision,
    omit_done: bool,
    omit_finish: bool,
    first_byte_after: Duration,
    body_after: Duration,
    event_delay: Duration,
    reset_after: Option<usize>,
    reset_mid_body: bool,
    chunked: bool,
    hold_after: Option<usize>,
    split_every: Option<usize>,
    record: bool,
    protocol: Protocol,
    idle_timeout: Option<Duration>,
    /// Serves HTTPS (HTTP/1.1) with this, instead of HTTP.
    tls: Option<TlsAcceptor>,
}

impl MockUpstream {
    /// A well-behaved OpenAI-compatible server with canned answers (a
    /// three-token stream), recording every request.
    pub fn openai() -> Self {
        Self {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: None,
            events: None,
            canned_chunks: 3,
            generate: None,
            token_a_byte: false,
            vision: Vision::Llama4,
            omit_done: false,
            omit_finish: false,
            first_byte_after: Duration::ZERO,
            body_after: Duration::ZERO,
            event_delay: Duration::ZERO,
            reset_after: None,
            reset_mid_body: false,
            chunked: false,
            hold_after: None,
            split_every: None,
            record: true,
            protocol: Protocol::OpenAi,
            idle_timeout: None,
            tls: None,
        }
    }

    /// A well-behaved TGI server (`support/tgi_mock.rs`).
    pub fn tgi() -> Self {
        Self {
            protocol: Protocol::Tgi,
            ..Self::openai()
        }
    }

    /// A well-behaved Bedrock Runtime that accepts only requests made
    /// with these credentials (`support/bedrock_mock.rs`).
    pub fn bedrock(expect: bedrock_mock::Expect) -> Self {
        Self {
            protocol: Protocol::Bedrock(Arc::new(expect)),
            ..Self::openai()
        }
    }

    /// The fast mode, for benches: a canned JSON answer, or a stream of
    /// `chunks` content chunks (plus role, finish and, when asked, usage
    /// chunks), with no delays; requests are counted, not kept.
    pub fn canned(chunks: usize) -> Self {
        Self {
            canned_chunks: chunks,
            record: false,
            ..Self::openai()
        }
    }

    /// Answer streaming requests with `tests/fixtures/openai/<name>`,
    /// byte for byte.
    pub fn stream(self, name: &str) -> Self {
        self.stream_bytes(fixture(name))
    }

    /// Answer streaming requests with these SSE bytes, byte for byte.
    pub fn stream_bytes(mut self, sse: impl AsRef<[u8]>) -> Self {
        self.events = Some(split_events(sse.as_ref()));
        self
    }

    /// Answer streaming requests with these events (SSE events, or
    /// event-stream frames), one item each.
    pub fn events(mut self, events: Vec<Bytes>) -> Self {
        self.events = Some(events);
        self
    }

    /// Answer with `tokens` tokens (one a stream chunk, usage exact), or
    /// as many as the request's `max_tokens` or `max_completion_tokens`
    /// allows when that is fewer, as a real server does; a request with
    /// tools, with a call whose arguments are as long.
    pub fn answers_of(mut self, tokens: usize) -> Self {
        self.generate = Some(Generate {
            tokens,
            honours_max_tokens: true,
            word: openai_mock::WORD,
        });
        self
    }

    /// `answers_of`, from a server that ignores the request's limit.
    pub fn answers_of_ignoring_max_tokens(mut self, tokens: usize) -> Self {
        self.generate = Some(Generate {
            tokens,
            honours_max_tokens: false,
            word: openai_mock::WORD,
        });
        self
    }

    /// Generated answers (`answers_of`) whose every token is `word`, as
    /// English words of more than the 4 bytes a token the gateway
    /// estimates are.
    pub fn token_text(mut self, word: &'static str) -> Self {
        let generate = self.generate.as_mut().expect("answers_of first");
        generate.word = word;
        self
    }

    /// Generated answers of `tokens` tokens of 2,400 bytes each: a stream
    /// far larger than the buffers and windows between a client that
    /// stops reading and the gateway hold.
    pub fn bulky_answers_of(self, tokens: usize) -> Self {
        static WORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let word = WORD.get_or_init(|| " lorem".repeat(400));
        self.answers_of(tokens).token_text(word)
    }

    /// Counts the prompt as Llama 3.1 counts text written to take a token
    /// a byte (digits between spaces): its messages' text a token a byte,
    /// and the chat template's 35 around a message.
    pub fn counts_a_token_a_byte(mut self) -> Self {
        self.token_a_byte = true;
        self
    }

    /// Counts images as `vision`'s processor does (Llama 4's by default).
    pub fn counts_images_as(mut self, vision: Vision) -> Self {
        self.vision = vision;
        self
    }

    /// Drop the `data: [DONE]` event from the stream, as some servers do.
    pub fn omit_done(mut self) -> Self {
        self.omit_done = true;
        self
    }

    /// Drop every event that says how an answer finished (a
    /// `finish_reason` that is not `null`), as a server that stops
    /// mid-answer would: the stream ends with `[DONE]`, or, with
    /// `omit_done`, its body closed cleanly, without saying.
    pub fn omit_finish(mut self) -> Self {
        self.omit_finish = true;
        self
    }

    /// Answer non-streaming requests (and error statuses) with this JSON.
    pub fn json(self, body: Value) -> Self {
        self.body(serde_json::to_vec(&body).expect("JSON serialises"))
    }

    /// Answer non-streaming requests (and error statuses) with these
    /// bytes, which need not be JSON.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Answer every request with this status. A status that is not 2xx is
    /// never streamed; its body is `body`/`json`, or an OpenAI error.
    pub fn status(mut self, status: u16) -> Self {
        self.status = StatusCode::from_u16(status).expect("a valid HTTP status");
        self
    }

    /// `status` with this JSON body.
    pub fn error(self, status: u16, body: Value) -> Self {
        self.status(status).json(body)
    }

    /// Add a response header (e.g. `retry-after`); it overrides the
    /// default `content-type`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(value).expect("a valid header value"),
        ));
        self
    }

    /// Wait this long before sending the response head.
    pub fn first_byte_after(mut self, delay: Duration) -> Self {
        self.first_byte_after = delay;
        self
    }

    /// Send the head at once but the first body byte this much later.
    pub fn body_after(mut self, delay: Duration) -> Self {
        self.body_after = delay;
        self
    }

    /// Pause this long before each SSE event after the first.
    pub fn event_delay(mut self, delay: Duration) -> Self {
        self.event_delay = delay;
        self
    }

    /// Send `events` SSE events, then close the connection without ending
    /// the chunked body, as a crashed server would.
    pub fn reset_after(mut self, events: usize) -> Self {
        self.reset_after = Some(events);
        self
    }

    /// Answer non-streaming requests with the head and the first half of
    /// the body, then close the connection, as a crashed server would.
    pub fn reset_mid_body(mut self) -> Self {
        self.reset_mid_body = true;
        self
    }

    /// Send non-streaming bodies chunked, with no `content-length`, so
    /// their size is known only once they are read.
    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    /// Send `events` SSE events, then keep the stream open, sending
    /// nothing, until `MockServer::release` (or forever).
    pub fn hold_after(mut self, events: usize) -> Self {
        self.hold_after = Some(events);
        self
    }

    /// Write the stream in pieces of `bytes` bytes, each flushed to the
    /// socket on its own, so events are cut across TCP writes (the
    /// receiver may still read several pieces at once).
    pub fn split_every(mut self, bytes: usize) -> Self {
        assert!(bytes > 0, "pieces need at least one byte");
        self.split_every = Some(bytes);
        self
    }

    /// Close a kept-alive connection that sends no request for `idle`,
    /// without a word, as a server's keep-alive timeout does (uvicorn's,
    /// vLLM's server, is 5 s).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Serve HTTPS (`base_url` says `https://`) as `tls` says.
    pub fn tls(mut self, tls: ServerTls<'_>) -> Self {
        let ca = tls.ca();
        let certificates = CertificateDer::pem_slice_iter(ca.server_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("the test CA's PEM");
        let key = PrivateKeyDer::from_pem_slice(ca.server_key.as_bytes()).expect("a PEM key");
        let builder = rustls::ServerConfig::builder();
        let builder = if tls.clients_certified() {
            let mut roots = rustls::RootCertStore::empty();
            let ca_pem = std::fs::read(ca.ca_file()).unwrap();
            for certificate in CertificateDer::pem_slice_iter(&ca_pem) {
                roots.add(certificate.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certificates, key)
            .expect("a server certificate and its key");
        self.tls = Some(TlsAcceptor::from(Arc::new(config)));
        self
    }

    /// Keep (or not) each request's headers and body for `requests()`.
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Binds 127.0.0.1:0 and serves until the returned server is dropped.
    pub async fn start(self) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let (release, _) = watch::channel(false);
        let (peer_closed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            status: Mutex::new(self.status),
            canned: openai_mock::Canned::new(
                self.canned_chunks,
                1,
                openai_mock::CANNED_PROMPT_TOKENS,
            ),
            reply: self,
            requests: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
            metrics: Mutex::new(IDLE_VLLM_METRICS.to_owned()),
            scrapes: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            peer_closed,
            release,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        MockServer {
            addr,
            shared,
            accept,
        }
    }
}

#[derive(Clone, Copy)]
struct Generate {
    tokens: usize,
    honours_max_tokens: bool,
    word: &'static str,
}

impl Generate {
    fn length(self, flags: &openai_mock::Flags) -> usize {
        match flags.max_tokens() {
            Some(limit) if self.honours_max_tokens => self.tokens.min(limit),
            _ => self.tokens,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub json: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A running mock; stops serving when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// `http://127.0.0.1:PORT`, with no path: add `/v1` (or `/openai/v1`).
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.reply.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far, on any path but `GET /metrics`.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Sets the page `GET /metrics` serves from now on (an idle vLLM's
    /// at first), as an engine reports its load.
    pub fn set_metrics(&self, page: impl Into<String>) {
        *self.shared.metrics.lock().expect("not poisoned") = page.into();
    }

    /// Answers later requests with this status instead of the configured
    /// one, as an upstream that starts (or stops) failing: not 2xx gives
    /// the configured error body, 200 the configured answers again.
    pub fn set_status(&self, status: u16) {
        *self.shared.status.lock().expect("not poisoned") =
            StatusCode::from_u16(status).expect("a valid HTTP status");
    }

    /// `GET /metrics` requests received so far.
    pub fn scrapes(&self) -> usize {
        self.shared.scrapes.load(Ordering::SeqCst)
    }

    /// The requests received so far, in order (empty with `record(false)`).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("not poisoned").clone()
    }

    /// The only request received; panics if there was not exactly one.
    pub fn single_request(&self) -> Recorded {
        let requests = self.requests();
        assert_eq!(requests.len(), 1, "expected exactly one upstream request");
        requests.into_iter().next().expect("one request")
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections the peer closed (not those the mock dropped itself).
    pub fn peer_closed(&self) -> usize {
        *self.shared.peer_closed.borrow()
    }

    /// Waits, at most `limit`, until the peer has closed `count`
    /// connections; returns whether it did.
    pub async fn wait_peer_closed(&self, count: usize, limit: Duration) -> bool {
        let mut seen = self.shared.peer_closed.subscribe();
        tokio::time::timeout(limit, seen.wait_for(|closed| *closed >= count))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Lets streams held by `hold_after` go on, now and from now on.
    pub fn release(&self) {
        self.shared.release.send_replace(true);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection (and with them the streams they feed).
        self.accept.abort();
    }
}

/// What an idle vLLM (v0.10 or later) reports.
pub const IDLE_VLLM_METRICS: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.0
";

struct Shared {
    reply: MockUpstream,
    canned: openai_mock::Canned,
    requests: Mutex<Vec<Recorded>>,
    hits: AtomicUsize,
    /// The status answered now: `reply.status` until `set_status`.
    status: Mutex<StatusCode>,
    metrics: Mutex<String>,
    scrapes: AtomicUsize,
    connections: AtomicUsize,
    peer_closed: watch::Sender<usize>,
    release: watch::Sender<bool>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(ConnState::default());
        let io = MockIo {
            inner: stream,
            conn: conn.clone(),
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = {
                let (shared, conn) = (shared.clone(), conn.clone());
                service_fn(move |request| respond(shared.clone(), conn.clone(), request))
            };
            // Ok: the peer closed an idle connection. Err: it closed (or
            // broke) the connection in the middle of an exchange, or the
            // mock reset it on purpose, which is not the peer's doing.
            let mut builder = http1::Builder::new();
            if let Some(idle) = shared.reply.idle_timeout {
                builder.timer(TokioTimer::new()).header_read_timeout(idle);
            }
            match &shared.reply.tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(io), service).await;
                }
                // A client that refuses the certificate ends the handshake.
                Some(tls) => match tls.accept(io).await {
                    Ok(io) => {
                        let _ = builder.serve_connection(TokioIo::new(io), service).await;
                    }
                    Err(_) => return,
                },
            }
            if !conn.reset.load(Ordering::SeqCst) {
                shared.peer_closed.send_modify(|closed| *closed += 1);
            }
        });
    }
}

async fn respond(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if parts.method == hyper::Method::GET && path == "/metrics" {
        shared.scrapes.fetch_add(1, Ordering::SeqCst);
        let page = shared.metrics.lock().expect("not poisoned").clone();
        return Ok(Response::new(MockBody::Full(Some(Bytes::from(page)))));
    }
    shared.hits.fetch_add(1, Ordering::SeqCst);
    let reply = &shared.reply;
    if reply.record {
        let recorded = Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts.headers.clone(),
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
            body: body.clone(),
        };
        shared.requests.lock().expect("not poisoned").push(recorded);
    }
    if !reply.first_byte_after.is_zero() {
        tokio::time::sleep(reply.first_byte_after).await;
    }
    let flags = openai_mock::Flags::parse(&body);
    // Images and audio count in the prompt: a request with either is
    // answered afresh.
    let prompt = if reply.token_a_byte {
        openai_mock::LLAMA3_TEMPLATE_TOKENS + flags.text_bytes()
    } else {
        openai_mock::CANNED_PROMPT_TOKENS
            + flags.image_tokens(reply.vision).unwrap_or(0)
            + flags.audio_tokens()
    };
    let generated;
    let canned = match reply.generate {
        Some(generate) => {
            let length = generate.length(&flags);
            generated = openai_mock::Canned::generated(
                length,
                flags.generations(),
                prompt,
                length < generate.tokens,
                generate.word,
            );
            &generated
        }
        None if prompt != openai_mock::CANNED_PROMPT_TOKENS => {
            generated = openai_mock::Canned::new(reply.canned_chunks, 1, prompt);
            &generated
        }
        None => &shared.canned,
    };
    let route = match &reply.protocol {
        Protocol::OpenAi => openai_mock::route(canned, &parts, &body, &flags),
        Protocol::Tgi => tgi_mock::route(canned, &parts, &body),
        Protocol::Bedrock(expect) => bedrock_mock::route(expect, &parts, &body),
    };
    let route = match route {
        Ok(route) => route,
        Err(rejection) => {
            return Ok(plain(rejection.status, &rejection.headers, rejection.body));
        }
    };
    let status = *shared.status.lock().expect("not poisoned");
    if !status.is_success() {
        let body = reply.body.clone().unwrap_or_else(|| {
            let message = format!("mock upstream answers {status}");
            Bytes::from(json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}).to_string())
        });
        return Ok(plain(status, &reply.headers, body));
    }
    if !route.streaming {
        let body = reply.body.clone().unwrap_or(route.json);
        if reply.reset_mid_body {
            let half = body.slice(..body.len() / 2);
            return Ok(streamed(
                &shared,
                conn,
                vec![half],
                "application/json",
                Some(1),
            ));
        }
        if reply.body_after.is_zero() && !reply.chunked {
            return Ok(plain(status, &route.headers, body).with(&reply.headers));
        }
        let reset = reply.reset_after;
        return Ok(streamed(
            &shared,
            conn,
            vec![body],
            "application/json",
            reset,
        ));
    }
    let mut events = reply.events.clone().unwrap_or(route.events);
    if reply.omit_done {
        events.retain(|e| !e.starts_with(b"data: [DONE]"));
    }
    if reply.omit_finish {
        let finish = memchr::memmem::Finder::new(br#""finish_reason":""#);
        events.retain(|e| finish.find(e).is_none());
    }
    let reset = reply.reset_after;
    Ok(streamed(&shared, conn, events, route.content_type, reset))
}

/// The upstream protocol a mock speaks.
#[derive(Clone)]
pub enum Protocol {
    OpenAi,
    Tgi,
    Bedrock(Arc<bedrock_mock::Expect>),
}

/// What the protocol makes of a request it accepts: its canned answer,
/// whole and streamed (the configured faults apply on top).
pub struct Route {
    pub streaming: bool,
    pub json: Bytes,
    /// Extra headers of the whole answer (e.g. TGI's `x-prompt-tokens`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The stream, one item per event or frame.
    pub events: Vec<Bytes>,
    pub content_type: &'static str,
}

/// A request the protocol refuses (unknown route, bad signature, a body
/// of the wrong shape), answered whatever the configured behaviour.
pub struct Rejection {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Rejection {
    pub fn new(status: u16, headers: &[(&'static str, &str)], body: Value) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("a valid status"),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_static(n),
                        HeaderValue::from_str(v).expect("a header value"),
                    )
                })
                .collect(),
            body: Bytes::from(body.to_string()),
        }
    }
}

trait WithHeaders {
    fn with(self, headers: &[(HeaderName, HeaderValue)]) -> Self;
}

impl WithHeaders for Response<MockBody> {
    fn with(mut self, headers: &[(HeaderName, HeaderValue)]) -> Self {
        for (name, value) in headers {
            self.headers_mut().insert(name.clone(), value.clone());
        }
        self
    }
}

/// A whole body, sent with a content-length.
fn plain(
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Full(Some(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// A chunked body fed, with the configured faults, by a task of its own;
/// the connection is dropped after `reset_after` events.
fn streamed(
    shared: &Shared,
    conn: Arc<ConnState>,
    events: Vec<Bytes>,
    content_type: &'static str,
    reset_after: Option<usize>,
) -> Response<MockBody> {
    let reply = &shared.reply;
    let (tx, rx) = mpsc::channel(1);
    if reply.split_every.is_some() {
        conn.watch_flush.store(true, Ordering::SeqCst);
    }
    let plan = StreamPlan {
        events,
        body_after: reply.body_after,
        event_delay: reply.event_delay,
        reset_after,
        hold_after: reply.hold_after,
        split_every: reply.split_every,
        release: shared.release.subscribe(),
    };
    tokio::spawn(plan.run(tx, conn.clone()));
    let mut response = Response::new(MockBody::Stream { rx, conn });
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in &reply.headers {
        headers.insert(name.clone(), value.clone());
    }
    response
}

struct StreamPlan {
    events: Vec<Bytes>,
    body_after: Duration,
    event_delay: Duration,
    reset_after: Option<usize>,
    hold_after: Option<usize>,
    split_every: Option<usize>,
    release: watch::Receiver<bool>,
}

enum Piece {
    Data(Bytes),
    /// Close the connection once everything before is on the wire.
    Reset,
}

impl StreamPlan {
    async fn run(mut self, tx: mpsc::Sender<Piece>, conn: Arc<ConnState>) {
        // Every wait also ends when the connection is gone (the receiver
        // dropped), so no task outlives its connection.
        macro_rules! or_gone {
            ($wait:expr) => {
                tokio::select! {
                    _ = $wait => {}
                    _ = tx.closed() => return,
                }
            };
        }
        if !self.body_after.is_zero() {
            or_gone!(tokio::time::sleep(self.body_after));
        }
        let events = std::mem::take(&mut self.events);
        let total = events.len();
        for (i, event) in events.into_iter().enumerate() {
            if self.reset_after == Some(i) {
                break;
            }
            if self.hold_after == Some(i) {
                or_gone!(self.release.wait_for(|released| *released));
            }
            if i > 0 && !self.event_delay.is_zero() {
                or_gone!(tokio::time::sleep(self.event_delay));
            }
            let pieces: Vec<Bytes> = match self.split_every {
                Some(size) => (0..event.len())
                    .step_by(size)
                    .map(|at| event.slice(at..(at + size).min(event.len())))
                    .collect(),
                None => vec![event],
            };
            for piece in pieces {
                if self.split_every.is_some() {
                    // Wait until hyper has written this piece and flushed,
                    // so the next one goes out in a write of its own.
                    let flushed = conn.flushed.notified();
                    tokio::pin!(flushed);
                    flushed.as_mut().enable();
                    if tx.send(Piece::Data(piece)).await.is_err() {
                        return;
                    }
                    or_gone!(flushed);
                } else if tx.send(Piece::Data(piece)).await.is_err() {
                    return;
                }
            }
        }
        if self.reset_after.is_some() {
            if tx.send(Piece::Reset).await.is_ok() {
                tx.closed().await;
            }
            return;
        }
        // `hold_after` at or past the last event holds the end of the body.
        if self.hold_after.is_some_and(|n| n >= total) {
            or_gone!(self.release.wait_for(|released| *released));
        }
    }
}

/// Per-connection state shared by the IO wrapper and the bodies it carries.
#[derive(Default)]
struct ConnState {
    /// The mock asked for this connection to be dropped mid-body.
    reset: AtomicBool,
    /// Someone waits on `flushed` (only then is it signalled).
    watch_flush: AtomicBool,
    flushed: Notify,
}

/// The socket, with two hooks: a flush can be awaited, and a flush after a
/// reset request fails, which makes hyper drop the connection right after
/// writing everything before it — without the chunked body's last chunk.
struct MockIo {
    inner: TcpStream,
    conn: Arc<ConnState>,
}

impl AsyncRead for MockIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        if self.conn.watch_flush.load(Ordering::SeqCst) {
            self.conn.flushed.notify_waiters();
        }
        if self.conn.reset.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

enum MockBody {
    Full(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<Piece>,
        conn: Arc<ConnState>,
    },
}

impl hyper::body::Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream { rx, conn } => match ready!(rx.poll_recv(cx)) {
                Some(Piece::Data(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(Piece::Reset) => {
                    // The next flush fails; until then, nothing more.
                    conn.reset.store(true, Ordering::SeqCst);
                    Poll::Pending
                }
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(body)) => SizeHint::with_exact(body.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Stream { .. } => SizeHint::default(),
        }
    }
}
