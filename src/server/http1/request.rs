//! A request as it arrives: its head parsed by httparse, with header
//! values sliced out of the bytes read rather than copied, and its body
//! read from the socket as the handler polls it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use axum::http::header::TRANSFER_ENCODING;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use rustix::net::RecvFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::error::GatewayError;
use crate::framing::{self, Chunked, Decoded, Framing, HeadFacts};

/// The most a request head (request line and headers) may take: nginx's
/// default.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most headers a request may have.
const MAX_HEADERS: usize = 100;
/// The most bytes one read takes from the socket.
const READ_SIZE: usize = 16 * 1024;

/// A client's connection: the socket, and where its current request's
/// body is. The connection's task writes answers to the socket; the
/// request body, polled by the handler on that same task, reads from it.
pub struct Socket {
    pub tcp: TcpStream,
    reading: Mutex<Reading>,
}

/// The body being read, and the bytes read past it.
struct Reading {
    framing: Framing,
    /// Read and not handed out: the body's next bytes, then whatever the
    /// client sent after it (its next request).
    read: BytesMut,
    /// A `100 Continue` is owed before the body's first read.
    owes_continue: bool,
}

impl Reading {
    /// Lets go of the allocation the bytes handed out came in, when none
    /// are left: the head's and body's bytes are shared with the request,
    /// and a connection whose answer streams should not keep them.
    fn release_if_empty(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
    }
}

/// Why a head was not read.
pub enum HeadError {
    /// The client closed or failed; nothing can be answered.
    Gone,
    /// An answer is owed, and then the connection closes.
    Refused(GatewayError),
}

/// What the connection needs to know of a request to answer it.
pub struct Facts {
    pub method: Method,
    pub version: Version,
    /// The client asked to keep the connection open.
    pub keep_alive: bool,
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            reading: Mutex::new(Reading {
                framing: Framing::Length(0),
                read: BytesMut::new(),
                owes_continue: false,
            }),
        }
    }

    fn reading(&self) -> MutexGuard<'_, Reading> {
        // Only this connection's task takes it, never across a panic.
        self.reading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the current request's body has been read to its end, so
    /// that anything read next is the client's next request.
    pub fn body_read(&self) -> bool {
        self.reading().framing == Framing::Length(0)
    }

    /// Whether bytes of a next request have been read already.
    pub fn has_read_ahead(&self) -> bool {
        !self.reading().read.is_empty()
    }

    /// Reads the next request head; its body is read from the socket as
    /// the request's body is polled. `Ok(None)`: the client closed before
    /// sending another.
    pub async fn next_request(
        self: &Arc<Self>,
    ) -> Result<Option<(Request<Body>, Facts)>, HeadError> {
        loop {
            {
                let mut reading = self.reading();
                if !reading.read.is_empty()
                    && let Some(parsed) = parse(&mut reading, self)?
                {
                    return Ok(Some(parsed));
                }
                if reading.read.len() >= MAX_HEAD_BYTES {
                    return Err(HeadError::Refused(too_large()));
                }
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx, READ_SIZE)).await {
                Ok(0) if self.reading().read.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(HeadError::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Reads at most `most` bytes of what the socket holds into `read`:
    /// how many, 0 at its end.
    fn poll_fill(&self, cx: &mut Context<'_>, most: usize) -> Poll<io::Result<usize>> {
        // On the stack, so that a connection waiting for bytes holds no
        // buffer; a read shorter than this tells the runtime the socket is
        // drained.
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let buf = &mut stack[..most.min(READ_SIZE)];
        let room = buf.len();
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut drained = None;
            let received = self.tcp.try_io(Interest::READABLE, || {
                let ((filled, _), _) = rustix::net::recv(&self.tcp, &mut *buf, RecvFlags::empty())?;
                self.reading().read.extend_from_slice(filled);
                let n = filled.len();
                if n > 0 && n < room {
                    // A short read took all there was: reported as
                    // `WouldBlock`, the runtime forgets the readiness
                    // (unless bytes came since), so that the next wait
                    // for bytes, or for the client leaving, starts without
                    // a read that would find none.
                    drained = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (received, drained) {
                (Ok(n), _) | (Err(_), Some(n)) => return Poll::Ready(Ok(n)),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
                (Err(e), None) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `100 Continue` if the client waits for it before sending
    /// its body.
    fn poll_continue(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        if !self.reading().owes_continue {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(CONTINUE) {
                Ok(n) if n == CONTINUE.len() => {
                    self.reading().owes_continue = false;
                    return Poll::Ready(Ok(()));
                }
                // A fresh socket's buffer takes 25 bytes whole.
                Ok(_) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// What a request broke, said as what to send instead.
const BAD_LINE: &str =
    "the request line must be `METHOD /path HTTP/1.1`, and every line must end in CRLF";
const BAD_NAME: &str = "header names may hold only letters, digits and !#$%&'*+-.^_`|~";
const BAD_VALUE: &str = "header values may not hold control characters";
const BAD_TARGET: &str = "the request target must be a path, such as /v1/chat/completions";
const BAD_LENGTH: &str = "Content-Length must be one number, digits only (every copy the same)";
const FRAMED_TWICE: &str = "send Content-Length or Transfer-Encoding, not both";
const NOT_CHUNKED: &str =
    "Transfer-Encoding must end in chunked: no other coding frames a request body";
const CHUNKED_10: &str = "Transfer-Encoding is not HTTP/1.0: send Content-Length";

fn malformed(problem: &str) -> HeadError {
    HeadError::Refused(GatewayError::malformed_http(problem))
}

fn too_large() -> GatewayError {
    GatewayError::head_too_large(MAX_HEAD_BYTES)
}

/// What httparse found wrong, as what to send instead.
fn head_error(error: httparse::Error) -> HeadError {
    match error {
        httparse::Error::TooManyHeaders => {
            HeadError::Refused(GatewayError::too_many_headers(MAX_HEADERS))
        }
        httparse::Error::HeaderName => malformed(BAD_NAME),
        httparse::Error::HeaderValue => malformed(BAD_VALUE),
        _ => malformed(BAD_LINE),
    }
}

/// The request whose head starts `reading.read`, if all of it is there;
/// the rest of the bytes stay for its body.
fn parse(
    reading: &mut Reading,
    socket: &Arc<Socket>,
) -> Result<Option<(Request<Body>, Facts)>, HeadError> {
    // Left uninitialised: setting 100 headers up front cost more than
    // parsing a typical head.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match parsed.parse_with_uninit_headers(&reading.read, &mut headers) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(head_error(error)),
    };
    if length > MAX_HEAD_BYTES {
        return Err(HeadError::Refused(too_large()));
    }
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(malformed(BAD_LINE));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| malformed(BAD_LINE))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // Where the path and each header sit in the head, so that they can be
    // sliced from it once it is split off the bytes read.
    let base = reading.read.as_ptr() as usize;
    let span = |part: &[u8]| (part.as_ptr() as usize - base, part.len());
    let path = span(path.as_bytes());
    let spans: Vec<_> = parsed
        .headers
        .iter()
        .map(|header| (span(header.name.as_bytes()), span(header.value)))
        .collect();
    let head = reading.read.split_to(length).freeze();
    let slice = |(start, len): (usize, usize)| head.slice(start..start + len);
    let uri = Uri::from_maybe_shared(slice(path)).map_err(|_| malformed(BAD_TARGET))?;
    let mut map = HeaderMap::with_capacity(spans.len());
    let mut said = HeadFacts::default();
    for &(name, value) in &spans {
        let (start, len) = name;
        let name =
            HeaderName::from_bytes(&head[start..start + len]).map_err(|_| malformed(BAD_NAME))?;
        let value =
            HeaderValue::from_maybe_shared(slice(value)).map_err(|_| malformed(BAD_VALUE))?;
        said.read(name.as_str().as_bytes(), value.as_bytes());
        map.append(name, value);
    }
    let framing = request_framing(&said, version, &map)?;
    let keep_alive = match version {
        Version::HTTP_11 => !said.close,
        _ => said.keep_alive,
    };
    reading.release_if_empty();
    reading.owes_continue =
        version == Version::HTTP_11 && framing != Framing::Length(0) && said.expect_continue;
    reading.framing = framing;
    let body = Body {
        socket: socket.clone(),
        length: match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        },
    };
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    let facts = Facts {
        method,
        version,
        keep_alive,
    };
    Ok(Some((request, facts)))
}

/// Where a request body ends (RFC 9112 §6.3): by the chunked coding, by
/// its length, or at once. A request framed both ways is refused, as a
/// smuggling attempt would be: what follows it could not be trusted to be
/// the next request. A body in another coding as well (`gzip, chunked`)
/// is framed, but its bytes are not the request: refused as a compressed
/// body is.
fn request_framing(
    said: &HeadFacts,
    version: Version,
    headers: &HeaderMap,
) -> Result<Framing, HeadError> {
    let length = said.content_length().map_err(|_| malformed(BAD_LENGTH))?;
    if said.transfer_encoding {
        return Err(malformed(if length.is_some() {
            FRAMED_TWICE
        } else if version != Version::HTTP_11 {
            CHUNKED_10
        } else if !said.chunked_last {
            NOT_CHUNKED
        } else if said.other_coding {
            let codings: Vec<_> = headers
                .get_all(TRANSFER_ENCODING)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()))
                .collect();
            return Err(HeadError::Refused(
                GatewayError::unsupported_transfer_coding(&codings.join(", ")),
            ));
        } else {
            return Ok(Framing::Chunked(Chunked::Size));
        }));
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// A request's body, read from the client's socket as it is polled.
pub struct Body {
    socket: Arc<Socket>,
    /// Its length, when the client gave one.
    length: Option<u64>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let socket = &self.socket;
        loop {
            let (decoded, most) = {
                let mut reading = socket.reading();
                let Reading { framing, read, .. } = &mut *reading;
                let decoded = framing::decode(framing, read);
                let framing = *framing;
                if framing == Framing::Length(0) {
                    reading.release_if_empty();
                }
                // A sized body is read no further than its end, so that
                // the next request stays on the socket.
                let most = match framing {
                    Framing::Length(left) => usize::try_from(left).unwrap_or(usize::MAX),
                    _ => READ_SIZE,
                };
                (decoded, most)
            };
            match decoded {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {
                    ready!(socket.poll_continue(cx))?;
                    if ready!(socket.poll_fill(cx, most))? == 0 {
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed the connection before the body's end",
                        ))));
                    }
                }
                Err(error) => {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        error,
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.socket.body_read()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_request_read_to_its_end_leaves_no_buffer_held() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = Arc::new(Socket::new(listener.accept().await.unwrap().0));
        client
            .write_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nx-key: v\r\ncontent-length: 5\r\n\r\nhel",
            )
            .await
            .unwrap();
        let (request, facts) = socket.next_request().await.ok().unwrap().unwrap();
        assert!(facts.keep_alive && facts.version == Version::HTTP_11);
        assert_eq!(request.headers()["x-key"], "v");
        assert_eq!(request.uri().path(), "/v1/chat/completions");
        client.write_all(b"lo").await.unwrap();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert!(socket.body_read());
        let held = socket.reading().read.capacity();
        assert_eq!(held, 0, "{held} bytes held after the request");
    }

    #[tokio::test]
    async fn a_head_too_long_or_with_too_many_headers_is_refused() {
        for head in [
            format!(
                "GET / HTTP/1.1\r\nx: {}\r\n\r\n",
                "a".repeat(MAX_HEAD_BYTES)
            ),
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                "x: y\r\n".repeat(MAX_HEADERS + 1)
            ),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let socket = Arc::new(Socket::new(listener.accept().await.unwrap().0));
            client.write_all(head.as_bytes()).await.unwrap();
            match socket.next_request().await {
                Err(HeadError::Refused(error)) => {
                    assert_eq!(
                        error.status(),
                        axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                    );
                }
                _ => panic!("not refused"),
            }
        }
    }
}
