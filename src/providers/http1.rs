//! One kept-alive HTTP/1.1 connection to an upstream at a plain `http://`
//! URL, driven by the task of the request it carries: the request is
//! written and the response read where the handler awaits them, with no
//! task, channel or buffer of the connection's own. An open stream whose
//! upstream is quiet holds the socket and nothing else: bytes are read on
//! the stack and kept only until they are handed out. httparse reads the
//! response head and chunk sizes; the framing is RFC 9112's (§6.3).

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use axum::http::header::CONTENT_LENGTH;
use axum::http::{Method, StatusCode};
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::exchange::{Answer, FieldAt, Fields, Outgoing};
use crate::framing::{self, Chunked, Decoded, Framing, HeadFacts, InvalidLength};

/// The most headers a response head may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// The longest response head read before the response is refused.
const MAX_HEAD: usize = 64 * 1024;
/// The most bytes one read takes from the socket.
const READ_SIZE: usize = 16 * 1024;

/// A connection between exchanges.
pub struct Connection {
    io: TcpStream,
    /// Bytes read and not handed out yet: empty, and without an
    /// allocation, between exchanges and while a stream waits.
    read: BytesMut,
}

/// Why an exchange got no response.
pub enum Failure {
    /// The connection refused the request's first byte: the upstream saw
    /// nothing of it, so it may go on another connection.
    Unsent(String),
    /// The connection failed.
    Broken(String),
    /// The upstream's answer is not HTTP/1.1 as RFC 9112 frames it.
    Invalid(String),
}

impl Connection {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            read: BytesMut::new(),
        }
    }

    /// Whether the upstream has neither closed the connection nor sent
    /// anything since its last response ended. Without a system call
    /// unless the socket has become readable since.
    pub fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: at its end, or with bytes no request asked for,
            // unless the readiness is stale.
            Poll::Ready(Ok(())) => {
                matches!(self.io.try_read(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `request` and reads the response's head; the body reads the
    /// rest.
    pub async fn send(mut self, request: &Outgoing) -> Result<Answer<Body>, Failure> {
        // Head and body in one write, the body from where it is: not
        // copied after the head.
        let wire_head = encode_head(request);
        let first = (self.io)
            .write_vectored(&[IoSlice::new(&wire_head), IoSlice::new(&request.body)])
            .await;
        let written = match first {
            Ok(0) => return Err(Failure::Unsent("the connection is closed".into())),
            Err(e) => return Err(Failure::Unsent(e.to_string())),
            Ok(n) => n,
        };
        let broken = |e: io::Error| Failure::Broken(e.to_string());
        let body = &request.body;
        if let Some(rest) = wire_head.get(written..).filter(|rest| !rest.is_empty()) {
            self.io.write_all(rest).await.map_err(broken)?;
            self.io.write_all(body).await.map_err(broken)?;
        } else {
            let sent = written - wire_head.len();
            self.io.write_all(&body[sent..]).await.map_err(broken)?;
        }
        drop(wire_head);
        let head = loop {
            if self.fill().await.map_err(broken)? == 0 {
                return Err(Failure::Broken(
                    "the upstream closed the connection before it answered".into(),
                ));
            }
            if let Some(head) = self.parse_head().map_err(Failure::Invalid)? {
                break head;
            }
        };
        let framing = framing_of(request, &head).map_err(Failure::Invalid)?;
        // A response framed both ways may be a smuggling attempt: what
        // follows it is not trusted to be the next response.
        let keep_alive = head.http11
            && !head.said.close
            && framing != Framing::Close
            && !head.said.framed_twice();
        let mut body = Body {
            connection: Some(self),
            framing,
            keep_alive,
            reusable: None,
        };
        if framing == Framing::Length(0) {
            body.finish();
        }
        Ok(Answer {
            status: head.status,
            fields: head.fields,
            body,
        })
    }

    /// The next final response head in the bytes read, past any interim
    /// (1xx) one; `None` until it is all there.
    fn parse_head(&mut self) -> Result<Option<Head>, String> {
        loop {
            // Left uninitialised: setting 100 headers up front cost more
            // than parsing a typical head.
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let config = httparse::ParserConfig::default();
            let length = match config.parse_response_with_uninit_headers(
                &mut parsed,
                &self.read,
                &mut headers,
            ) {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) if self.read.len() > MAX_HEAD => {
                    return Err(format!("a response head longer than {MAX_HEAD} bytes"));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(format!("an invalid response head: {e}")),
            };
            let code = parsed.code.unwrap_or_default();
            let status = StatusCode::from_u16(code)
                .map_err(|_| format!("an invalid response status {code}"))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err("a protocol switch no request asked for".into());
            }
            if status.is_informational() {
                self.read.advance(length);
                continue;
            }
            // The fields stay slices of the head as read: they are looked
            // up by name when needed (`Fields`).
            let start = self.read.as_ptr() as usize;
            let at_of = |part: &[u8]| match part {
                // An empty value need not point into the head.
                [] => 0..0,
                part => {
                    let at = part.as_ptr() as usize - start;
                    at..at + part.len()
                }
            };
            let mut at = Vec::with_capacity(parsed.headers.len());
            let mut said = HeadFacts::default();
            for header in parsed.headers.iter() {
                said.read(header.name.as_bytes(), header.value);
                at.push(FieldAt {
                    name: at_of(header.name.as_bytes()),
                    value: at_of(header.value),
                });
            }
            let http11 = parsed.version == Some(1);
            let head = self.read.split_to(length).freeze();
            return Ok(Some(Head {
                status,
                fields: Fields::read(head, at),
                said,
                http11,
            }));
        }
    }

    /// Reads what the socket holds into `read`: how many bytes, 0 at its end.
    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // On the stack, so that a quiet stream holds no buffer; a read
        // shorter than this tells the runtime the socket is drained.
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut buf = ReadBuf::uninit(&mut stack);
        let Poll::Ready(read) = Pin::new(&mut self.io).poll_read(cx, &mut buf) else {
            // While it waits, the connection holds only the bytes not
            // handed out, not the rest of the allocation they came in.
            if self.read.capacity() > self.read.len() {
                self.read = BytesMut::from(&self.read[..]);
            }
            return Poll::Pending;
        };
        read?;
        self.read.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }
}

/// A request's head as it goes on the wire, in origin form, its body to
/// follow.
fn encode_head(request: &Outgoing) -> Vec<u8> {
    let body = &request.body;
    let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut wire = Vec::with_capacity(256);
    for part in [request.method.as_str(), " ", path, " HTTP/1.1\r\n"] {
        wire.extend_from_slice(part.as_bytes());
    }
    let mut length_given = false;
    for (name, value) in &request.fields {
        length_given |= name == CONTENT_LENGTH;
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(request.method, Method::GET | Method::HEAD) && body.is_empty();
    if !bodiless && !length_given {
        wire.extend_from_slice(b"content-length: ");
        wire.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

/// A final response head.
struct Head {
    status: StatusCode,
    fields: Fields,
    /// What its headers say of its framing and connection.
    said: HeadFacts,
    http11: bool,
}

/// Where a response body ends.
fn framing_of(request: &Outgoing, head: &Head) -> Result<Framing, String> {
    let bodiless = request.method == Method::HEAD
        || matches!(
            head.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    if bodiless {
        return Ok(Framing::Length(0));
    }
    if head.said.other_coding {
        // The gateway asks for none (it sends no `TE`), and decodes none.
        return Err(
            "a transfer coding other than chunked, which the gateway did not ask for".into(),
        );
    }
    if head.said.transfer_encoding {
        return Ok(if head.said.chunked_last {
            Framing::Chunked(Chunked::Size)
        } else {
            Framing::Close
        });
    }
    match head.said.content_length() {
        Ok(length) => Ok(length.map_or(Framing::Close, Framing::Length)),
        Err(InvalidLength) => Err("an invalid content-length".into()),
    }
}

/// The body of a response, read from its connection as it is polled.
pub struct Body {
    /// `None` once the body has ended or failed.
    connection: Option<Connection>,
    framing: Framing,
    keep_alive: bool,
    /// The connection, once the body has ended and it can carry another
    /// exchange.
    reusable: Option<Connection>,
}

impl Body {
    /// The connection, free for the next exchange, once the body has
    /// been read to its end.
    pub fn take_connection(&mut self) -> Option<Connection> {
        self.reusable.take()
    }

    /// Ends the body; its connection is kept for another exchange when
    /// the response allows it and nothing was sent past its end.
    fn finish(&mut self) {
        if let Some(mut connection) = self.connection.take()
            && self.keep_alive
            && connection.read.is_empty()
        {
            connection.read = BytesMut::new();
            self.reusable = Some(connection);
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            let read = &mut connection.read;
            let error = match framing::decode(&mut this.framing, read) {
                Ok(Decoded::Data(data)) => {
                    if this.framing == Framing::Length(0) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => match ready!(connection.poll_fill(cx)) {
                    Ok(0) if this.framing == Framing::Close => {
                        this.connection = None;
                        return Poll::Ready(None);
                    }
                    Ok(0) => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the body's end",
                    ),
                    Ok(_) => continue,
                    Err(error) => error,
                },
                Err(error) => io::Error::new(io::ErrorKind::InvalidData, error),
            };
            this.connection = None;
            return Poll::Ready(Some(Err(error)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            _ if self.connection.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{HeaderName, HeaderValue};
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A server on 127.0.0.1 that answers the requests on its first
    /// connection with `replies`, in order, each written as it is (split
    /// where the reply has a `|`, with a pause between the parts), and
    /// then keeps the connection open until the client closes it.
    async fn upstream(replies: &'static [&'static str]) -> Connection {
        let replies = replies
            .iter()
            .map(|reply| {
                reply
                    .split('|')
                    .map(|part| part.as_bytes().to_vec())
                    .collect()
            })
            .collect();
        upstream_in_parts(replies, Duration::from_millis(50)).await
    }

    /// As [`upstream`], each reply given as the parts it is written in,
    /// with `pause` after each (none: the server's task only yields).
    async fn upstream_in_parts(replies: Vec<Vec<Vec<u8>>>, pause: Duration) -> Connection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut read = Vec::new();
            for reply in replies {
                // The request: its head, then its content-length's bytes;
                // none once the client has closed.
                let mut buf = [0; 4096];
                let end = loop {
                    if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match stream.read(&mut buf).await.unwrap() {
                        0 => return,
                        n => read.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&read[..end]).to_lowercase();
                let length: usize = head
                    .split("content-length: ")
                    .nth(1)
                    .map_or(0, |v| v.split("\r\n").next().unwrap().parse().unwrap());
                while read.len() < end + length {
                    match stream.read(&mut buf).await.unwrap() {
                        0 => return,
                        n => read.extend_from_slice(&buf[..n]),
                    }
                }
                read.drain(..end + length);
                for part in reply {
                    stream.write_all(&part).await.unwrap();
                    if pause.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            let mut buf = [0; 16];
            while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        Connection::new(TcpStream::connect(address).await.unwrap())
    }

    /// A server on 127.0.0.1 that answers its first request with `reply`
    /// and closes the connection.
    async fn answered_then_closed(reply: &'static [u8]) -> Connection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0; 4096];
            let _ = stream.read(&mut buf).await.unwrap();
            stream.write_all(reply).await.unwrap();
        });
        Connection::new(TcpStream::connect(address).await.unwrap())
    }

    fn post(body: &'static str) -> Outgoing {
        Outgoing::new(
            Method::POST,
            "http://engine:8000/v1/chat/completions".parse().unwrap(),
            HeaderValue::from_static("engine:8000"),
            Bytes::from_static(body.as_bytes()),
        )
    }

    /// The response's status, its body whole (or the body's error), and
    /// its connection if it can carry another exchange.
    async fn exchange(
        connection: Connection,
        request: Outgoing,
    ) -> (StatusCode, Result<Bytes, String>, Option<Connection>) {
        let response = match connection.send(&request).await {
            Ok(response) => response,
            Err(Failure::Broken(error) | Failure::Invalid(error)) => panic!("no response: {error}"),
            Err(Failure::Unsent(..)) => panic!("not sent"),
        };
        let status = response.status;
        let mut body = response.body;
        let mut data = Vec::new();
        let result = loop {
            match body.frame().await {
                None => break Ok(Bytes::from(data)),
                Some(Ok(frame)) => data.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(error)) => break Err(error.to_string()),
            }
        };
        (status, result, body.take_connection())
    }

    async fn refused(connection: Connection) -> String {
        match connection.send(&post("{}")).await {
            Err(Failure::Invalid(error)) => error,
            Err(Failure::Broken(error)) => panic!("failed, not refused: {error}"),
            Err(Failure::Unsent(..)) => panic!("not sent"),
            Ok(response) => panic!("answered {}", response.status),
        }
    }

    #[test]
    fn a_request_is_written_in_origin_form_with_its_length() {
        let mut request = post("{\"a\":1}");
        request.fields.push((
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("r1"),
        ));
        assert_eq!(
            encode_head(&request),
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: engine:8000\r\nx-request-id: r1\r\ncontent-length: 7\r\n\r\n"
        );
        let get = Outgoing::new(
            Method::GET,
            "http://engine:8000/metrics?name=a".parse().unwrap(),
            HeaderValue::from_static("engine:8000"),
            Bytes::new(),
        );
        assert_eq!(
            encode_head(&get),
            b"GET /metrics?name=a HTTP/1.1\r\nhost: engine:8000\r\n\r\n"
        );
        let mut sized = post("{}");
        sized
            .fields
            .push((CONTENT_LENGTH, HeaderValue::from_static("2")));
        let head = String::from_utf8(encode_head(&sized)).unwrap();
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_then_a_sized_one_share_the_connection() {
        let connection = upstream(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n|7\r\n, worl|d\r\n0\r\nx-trailer: t\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n|ok",
        ])
        .await;
        let (status, body, connection) = exchange(connection, post("{}")).await;
        assert_eq!(
            (status, body.unwrap()),
            (StatusCode::OK, "hello, world".into())
        );
        let (_, body, connection) = exchange(connection.expect("kept"), post("{}")).await;
        assert_eq!(body.unwrap(), "ok");
        assert!(connection.is_some());
    }

    /// A response on the wire, cut into random parts; its body: text that
    /// looks like heads, chunk sizes and line ends, framed at random
    /// ([`framing::random_framing`]), maybe after an interim response;
    /// and whether a second response follows it unasked, in its last
    /// part.
    fn random_response(rng: &mut fastrand::Rng) -> (Vec<Vec<u8>>, String, bool) {
        const PIECES: &[&str] = &[
            "a",
            "0\r\n\r\n",
            "\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n",
            "5\r\n",
            " ",
            "data: {}\n\n",
        ];
        let body: String = (0..rng.usize(0..8))
            .map(|_| PIECES[rng.usize(..PIECES.len())])
            .collect();
        let mut wire = Vec::new();
        if rng.u8(..5) == 0 {
            wire.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        wire.extend(framing::random_framing(rng, body.as_bytes()));
        let mut parts = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let part = rng.usize(1..=rest.len().min(48));
            parts.push(rest[..part].to_vec());
            rest = &rest[part..];
        }
        let unasked = rng.u8(..8) == 0;
        if unasked && let Some(last) = parts.last_mut() {
            last.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx");
        }
        (parts, body, unasked)
    }

    #[tokio::test]
    async fn random_responses_in_random_parts_each_give_their_own_body_on_one_connection() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..60 {
            let responses: Vec<_> = (0..6).map(|_| random_response(&mut rng)).collect();
            let replies = responses.iter().map(|(parts, ..)| parts.clone()).collect();
            let mut connection = upstream_in_parts(replies, Duration::ZERO).await;
            for (_, expected, unasked) in responses {
                let (status, body, kept) = exchange(connection, post("{}")).await;
                assert_eq!((status, body.unwrap()), (StatusCode::OK, expected.into()));
                if unasked {
                    // What follows the body is no answer to any request:
                    // the connection carries no other.
                    assert!(kept.is_none());
                    break;
                }
                connection = kept.expect("kept for the next exchange");
            }
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let connection = upstream(&[
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n|HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nnew",
        ])
        .await;
        let (status, body, connection) = exchange(connection, post("{}")).await;
        assert_eq!((status, body.unwrap()), (StatusCode::CREATED, "new".into()));
        assert!(connection.is_some());
    }

    #[tokio::test]
    async fn response_headers_are_read_as_sent_however_their_values_are_written() {
        let connection = upstream(&[
            "HTTP/1.1 200 OK\r\nX-Empty:\r\nset-cookie: a=1\r\nX-Spaced:  \tpadded value\t \r\nSet-Cookie: b=2\r\nx-obs: café\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let response = connection.send(&post("{}")).await.ok().unwrap();
        let fields = response.fields;
        assert_eq!(fields.get_str("x-empty"), Some(""));
        assert_eq!(fields.get_str("X-SPACED"), Some("padded value"));
        assert_eq!(fields.get("x-obs"), Some("café".as_bytes()));
        let cookies: Vec<_> = (fields.iter())
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"set-cookie"))
            .map(|(_, value)| value)
            .collect();
        assert_eq!(cookies, [b"a=1", b"b=2"]);
        assert_eq!(fields.iter().count(), 6);
    }

    #[tokio::test]
    async fn a_body_without_a_length_ends_with_the_connection_which_is_not_reused() {
        let connection = answered_then_closed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        let (_, body, connection) = exchange(connection, post("{}")).await;
        assert_eq!(body.unwrap(), "until the end");
        assert!(connection.is_none());
    }

    #[tokio::test]
    async fn a_response_that_forbids_reuse_is_not_reused() {
        for reply in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            // Framed twice: chunked wins, and what follows is not trusted.
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            // More than the length promised.
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ] {
            let replies: &'static [&'static str] = Box::leak(Box::new([reply]));
            let (_, body, connection) = exchange(upstream(replies).await, post("{}")).await;
            assert_eq!(body.unwrap(), "ok", "{reply:?}");
            assert!(connection.is_none(), "{reply:?}");
        }
    }

    #[tokio::test]
    async fn an_empty_body_frees_its_connection_at_once() {
        let connection = upstream(&[
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let mut response = connection.send(&post("{}")).await.ok().unwrap();
        assert!(response.body.is_end_stream());
        let connection = response.body.take_connection().expect("free");
        let mut response = connection.send(&post("{}")).await.ok().unwrap();
        assert!(response.body.take_connection().is_some());
    }

    #[tokio::test]
    async fn a_broken_response_head_or_length_is_refused_saying_what_is_wrong() {
        for (reply, says) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "invalid response head",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "protocol switch",
            ),
            ("SMTP ready\r\n\r\n", "invalid response head"),
        ] {
            let replies: &'static [&'static str] = Box::leak(Box::new([reply]));
            let error = refused(upstream(replies).await).await;
            assert!(error.contains(says), "{reply:?}: {error}");
        }
        let huge: &'static str = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "a".repeat(MAX_HEAD)).into_boxed_str(),
        );
        let replies: &'static [&'static str] = Box::leak(Box::new([huge]));
        let error = refused(upstream(replies).await).await;
        assert!(error.contains("longer than"), "{error}");
    }

    #[tokio::test]
    async fn a_body_cut_short_or_a_chunk_overrunning_its_size_is_an_error() {
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.";
        let (_, body, connection) = exchange(answered_then_closed(reply).await, post("{}")).await;
        assert!(body.unwrap_err().contains("before the body's end"));
        assert!(connection.is_none());

        let overrun = upstream(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokay\r\n0\r\n\r\n",
        ]);
        let (_, body, connection) = exchange(overrun.await, post("{}")).await;
        assert!(body.unwrap_err().contains("longer than its size"));
        assert!(connection.is_none());
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_next_bytes_holds_no_buffer() {
        let connection = upstream(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n|6\r\nfirst\n\r\n|7\r\nsecond\n\r\n|0\r\n\r\n",
        ])
        .await;
        let mut body = connection.send(&post("{}")).await.ok().unwrap().body;
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first\n");
        // The next bytes come 50 ms later: the body waits for them.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        let held = body.connection.as_ref().unwrap().read.capacity();
        assert_eq!(held, 0, "a buffer of {held} bytes held between reads");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "second\n");
        assert!(body.frame().await.is_none());
        assert!(body.take_connection().is_some());
    }

    #[tokio::test]
    async fn a_connection_its_upstream_closed_is_not_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connection = Connection::new(TcpStream::connect(address).await.unwrap());
        assert!(connection.is_open());
        let (stream, _) = listener.accept().await.unwrap();
        drop(stream);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!connection.is_open());
    }
}
