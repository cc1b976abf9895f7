//! Kept-alive HTTP/1.1 connections to a backend at a plain `http://` URL
//! ([`http1`]). A request takes the most recently used idle connection to
//! its origin that is still open, or opens one; a response's body gives
//! its connection back once read to its end, and a body dropped before
//! its end closes it. A task of the pool's closes the connections idle
//! for longer than [`IDLE_TIMEOUT`] and those the upstream closed.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::http::Uri;
use axum::http::uri::Authority;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use super::exchange::{Answer, Outgoing};
use super::http1::{self, Connection, Failure};

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most idle connections kept per backend: past a spike of streams,
/// the oldest are closed.
const MAX_IDLE: usize = 1024;

/// The idle connections of one backend's client.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpConnector,
    /// Oldest first.
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    /// Whether the task that closes expired connections runs: started by
    /// the first connection given back, so a pool built outside a runtime
    /// (`tollgate check`) or never used starts none.
    reaping: AtomicBool,
}

struct Idle {
    origin: Authority,
    connection: Connection,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum RequestError {
    /// No connection could be opened: nothing was sent.
    Connect(String),
    /// The connection failed during the exchange.
    Exchange(String),
    /// The upstream's answer broke HTTP/1.1: what it got wrong.
    Invalid(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "cannot connect: {error}"),
            Self::Exchange(error) => f.write_str(error),
            Self::Invalid(what) => write!(f, "invalid response: {what}"),
        }
    }
}

impl Pool {
    pub fn new(connector: HttpConnector) -> Self {
        Self::with_idle_timeout(connector, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(connector: HttpConnector, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::default(),
                idle_timeout,
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (its URI absolute, `http://`) on an idle connection
    /// to its origin, or on a new one. A request an idle connection refused
    /// before its first byte goes on another.
    pub async fn request(&self, request: Outgoing) -> Result<Answer<UpstreamBody>, RequestError> {
        let Some(origin) = request.uri.authority().cloned() else {
            return Err(RequestError::Connect(format!(
                "{} has no host",
                request.uri
            )));
        };
        loop {
            let (connection, reused) = match self.checkout(&origin) {
                Some(connection) => (connection, true),
                None => (self.connect(&request.uri).await?, false),
            };
            match connection.send(&request).await {
                Ok(response) => {
                    let lease = Lease {
                        origin,
                        pool: Arc::downgrade(&self.inner),
                    };
                    let mut response = response.map(|body| {
                        UpstreamBody(Kind::Pooled {
                            body,
                            lease: Some(lease),
                        })
                    });
                    // A body with nothing to read frees its connection now.
                    response.body.give_back_when_ended();
                    return Ok(response);
                }
                Err(Failure::Unsent(_)) if reused => {}
                Err(Failure::Unsent(error) | Failure::Broken(error)) => {
                    return Err(RequestError::Exchange(error));
                }
                Err(Failure::Invalid(what)) => return Err(RequestError::Invalid(what)),
            }
        }
    }

    /// The most recently used idle connection to `origin` that is still
    /// open.
    fn checkout(&self, origin: &Authority) -> Option<Connection> {
        let mut idle = self.inner.idle();
        loop {
            let at = idle.iter().rposition(|i| {
                i.origin == *origin && i.since.elapsed() < self.inner.idle_timeout
            })?;
            let connection = idle.remove(at)?.connection;
            if connection.is_open() {
                return Some(connection);
            }
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Connection, RequestError> {
        let io = self
            .inner
            .connector
            .clone()
            .oneshot(uri.clone())
            .await
            .map_err(|e| RequestError::Connect(crate::error::chain(&e)))?;
        Ok(Connection::new(io.into_inner()))
    }
}

impl Inner {
    fn idle(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(self: Arc<Self>, origin: Authority, connection: Connection) {
        {
            let mut idle = self.idle();
            if idle.len() >= MAX_IDLE {
                idle.pop_front();
            }
            idle.push_back(Idle {
                origin,
                connection,
                since: Instant::now(),
            });
        }
        // Read before the swap: a plain load on every return, the write once.
        if !self.reaping.load(Ordering::Relaxed) && !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(&self), self.idle_timeout));
        }
    }
}

/// Closes the pool's connections idle for `timeout`, and those their
/// upstream closed, until the pool is dropped.
async fn reap(pool: Weak<Inner>, timeout: Duration) {
    let mut ticks = tokio::time::interval(timeout / 4);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.idle()
            .retain(|i| i.since.elapsed() < timeout && i.connection.is_open());
    }
}

/// Where a pooled connection goes back when its exchange ends.
struct Lease {
    origin: Authority,
    pool: Weak<Inner>,
}

impl Lease {
    fn give_back(self, connection: Connection) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.origin, connection);
        }
    }
}

/// The body of an upstream response: on a connection of this pool, which
/// it gives back once read to its end (dropped before, it closes it), or
/// on one of hyper's (over TLS).
pub struct UpstreamBody(Kind);

enum Kind {
    Pooled {
        body: http1::Body,
        lease: Option<Lease>,
    },
    Hyper(Incoming),
}

impl UpstreamBody {
    /// Gives the connection back once the body has ended.
    fn give_back_when_ended(&mut self) {
        if let Kind::Pooled { body, lease } = &mut self.0
            && let Some(connection) = body.take_connection()
            && let Some(lease) = lease.take()
        {
            lease.give_back(connection);
        }
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(body: Incoming) -> Self {
        Self(Kind::Hyper(body))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let frame = match &mut self.0 {
            Kind::Pooled { body, .. } => ready!(Pin::new(body).poll_frame(cx)),
            Kind::Hyper(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|frame| frame.map_err(io::Error::other))
            }
        };
        self.give_back_when_ended();
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Pooled { body, .. } => body.is_end_stream(),
            Kind::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Pooled { body, .. } => body.size_hint(),
            Kind::Hyper(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{HeaderValue, Method};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    /// How the mock answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `ok`, and the connection is kept.
        Whole,
        /// `ok`, then the connection is closed without a word, as a
        /// server closes an idle connection.
        ThenClose,
        /// Half of a 10-byte body, then nothing more.
        Half,
    }

    /// A server on 127.0.0.1 that counts connections, and reports each
    /// request's head and each connection the client closed.
    async fn server(answer: Answer) -> (Uri, Arc<AtomicUsize>, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/v1/chat", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (heads, received) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, answer, heads.clone()));
            }
        });
        (uri, accepted, received)
    }

    async fn serve(mut stream: TcpStream, answer: Answer, heads: mpsc::UnboundedSender<String>) {
        let mut read = Vec::new();
        loop {
            let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                let mut buf = [0; 4096];
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = heads.send("closed".into());
                        return;
                    }
                    Ok(n) => read.extend_from_slice(&buf[..n]),
                }
                continue;
            };
            let head = String::from_utf8(read[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while read.len() < end + 4 + length {
                let mut buf = [0; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                read.extend_from_slice(&buf[..n]);
            }
            read.drain(..end + 4 + length);
            let _ = heads.send(head);
            let reply: &[u8] = match answer {
                Answer::Whole | Answer::ThenClose => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                }
                Answer::Half => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.",
            };
            stream.write_all(reply).await.unwrap();
            match answer {
                Answer::Whole => {}
                Answer::ThenClose => return,
                // Held open until the client closes it.
                Answer::Half => {
                    let mut buf = [0; 16];
                    while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    let _ = heads.send("closed".into());
                    return;
                }
            }
        }
    }

    fn post(uri: &Uri) -> Outgoing {
        let host = HeaderValue::try_from(uri.authority().unwrap().as_str()).unwrap();
        Outgoing::new(Method::POST, uri.clone(), host, Bytes::from_static(b"{}"))
    }

    async fn send(pool: &Pool, uri: &Uri) -> Bytes {
        let response = pool.request(post(uri)).await.expect("answered");
        response.body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_sent_in_origin_form() {
        let (uri, accepted, mut heads) = server(Answer::Whole).await;
        let pool = Pool::new(HttpConnector::new());
        for _ in 0..3 {
            assert_eq!(send(&pool, &uri).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let head = heads.recv().await.unwrap();
        assert!(head.starts_with("POST /v1/chat HTTP/1.1\r\n"), "{head}");
        let host = format!("host: {}", uri.authority().unwrap());
        assert!(head.to_ascii_lowercase().contains(&host), "{head}");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used_again() {
        let (uri, accepted, _heads) = server(Answer::ThenClose).await;
        let pool = Pool::new(HttpConnector::new());
        assert_eq!(send(&pool, &uri).await, "ok");
        // Whether the pool has seen the close yet or not, the request is
        // answered, on a new connection.
        assert_eq!(send(&pool, &uri).await, "ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(send(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (uri, accepted, mut heads) = server(Answer::Half).await;
        let pool = Pool::new(HttpConnector::new());
        let mut body = pool.request(post(&uri)).await.unwrap().body;
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "half.");
        drop(body);
        assert!(heads.recv().await.unwrap().starts_with("POST"));
        assert_eq!(heads.recv().await.unwrap(), "closed");
        // The next request cannot have it: it opens another.
        let _response = pool.request(post(&uri)).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_closed() {
        let (uri, accepted, mut heads) = server(Answer::Whole).await;
        let pool = Pool::with_idle_timeout(HttpConnector::new(), Duration::from_millis(100));
        assert_eq!(send(&pool, &uri).await, "ok");
        assert!(heads.recv().await.unwrap().starts_with("POST"));
        let closed = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await;
        assert_eq!(closed.expect("closed in time").unwrap(), "closed");
        assert_eq!(send(&pool, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let error = Pool::new(HttpConnector::new())
            .request(post(&uri))
            .await
            .err()
            .unwrap();
        assert!(matches!(error, RequestError::Connect(_)), "{error}");
    }
}
