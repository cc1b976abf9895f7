//! HTTP/1.1 connections from clients, each served on a task of its own
//! that reads a request, runs the handler and writes its answer, then
//! reads the next. It holds no buffer of its own while it waits: reads go
//! into a buffer on the stack and only the bytes not handed out are kept;
//! an answer's bytes are gathered as they come and let go once written.
//! So a client's open stream costs the socket, the handler's response
//! body and this task. hyper's server connection, which has no setting
//! for it, holds two 8 KB buffers and the response's header map for as
//! long as the stream is open.
//!
//! The head is parsed by httparse; bodies are framed as RFC 9112 says
//! (`crate::framing`). A head that cannot be read is answered with an
//! OpenAI error (400 or 431) and the connection closed.

mod request;
mod response;

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::http::{Method, Request, Version};
use axum::response::{IntoResponse, Response};
use hyper::body::Body as _;
use hyper::service::Service;
use rustix::net::{RecvFlags, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

pub use request::{Body, MAX_HEAD_BYTES};
use request::{Facts, HeadError, Socket};
use response::{Outgoing, Overrun};

/// A client that sends no complete request head for this long (from its
/// connection's start for the first, from its first byte for the next
/// ones) is dropped.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection reads and drops what the client still
/// sends (a body the handler did not read), so that the close does not
/// become a reset that could reach the client before the answer does.
const LINGER: Duration = Duration::from_secs(1);

/// Serves `tcp` until the client closes it, a head does not arrive in
/// time (the first by `first_head_by`, each next one within `keepalive` of
/// the last answer), it takes none of an answer for `send_timeout`, or
/// `stop` turns true and the connection has no request in flight.
pub async fn serve<S>(
    tcp: TcpStream,
    service: S,
    first_head_by: Instant,
    (keepalive, send_timeout): (Duration, Duration),
    mut stop: watch::Receiver<bool>,
) where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let socket = Arc::new(Socket::new(tcp));
    let mut wait = Wait::Head(first_head_by);
    // The client may have sent bytes no one will read.
    let mut unread = false;
    loop {
        let Some(next) = next_request(&socket, wait, &mut stop).await else {
            break;
        };
        let (request, facts) = match next {
            Ok(Some(next)) => next,
            Ok(None) | Err(HeadError::Gone) => break,
            Err(HeadError::Refused(error)) => {
                // Any method but HEAD: the refusal has a body.
                let facts = Facts {
                    method: Method::POST,
                    version: Version::HTTP_11,
                    keep_alive: false,
                };
                let _ = respond(&socket, error.into_response(), &facts, false, send_timeout).await;
                unread = true;
                break;
            }
        };
        let Some(Ok(response)) = unless_client_leaves(&socket, service.call(request)).await else {
            break;
        };
        unread = !socket.body_read();
        // A body the handler left unread is between this request and the
        // next: the connection closes after the answer.
        let keep_alive = facts.keep_alive && !unread && !*stop.borrow();
        match respond(&socket, response, &facts, keep_alive, send_timeout).await {
            Ok(true) => wait = Wait::Idle(Instant::now() + keepalive),
            _ => break,
        }
    }
    if unread {
        linger(&socket).await;
    }
}

/// What a connection's next request is due by.
#[derive(Clone, Copy)]
enum Wait {
    /// Its whole head.
    Head(Instant),
    /// Its first byte (a kept-alive connection's wait); its head is then
    /// due [`HEAD_TIMEOUT`] later.
    Idle(Instant),
}

/// The connection's next request, or `None` when the connection is to
/// close first: its wait ran out, or the gateway stops while no request
/// has begun to arrive (one that has is answered first).
async fn next_request(
    socket: &Arc<Socket>,
    mut wait: Wait,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<Option<(Request<Body>, Facts)>, HeadError>> {
    let (Wait::Head(by) | Wait::Idle(by)) = wait;
    let mut next = pin!(socket.next_request());
    let mut deadline = pin!(tokio::time::sleep_until(by));
    let mut stopping = pin!(stopped(stop));
    poll_fn(|cx| {
        if let Poll::Ready(next) = next.as_mut().poll(cx) {
            return Poll::Ready(Some(next));
        }
        let begun = socket.has_read_ahead();
        if begun && let Wait::Idle(_) = wait {
            let by = Instant::now() + HEAD_TIMEOUT;
            wait = Wait::Head(by);
            deadline.as_mut().reset(by);
        }
        if deadline.as_mut().poll(cx).is_ready()
            || (!begun && stopping.as_mut().poll(cx).is_ready())
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Resolves once `stop` is true (or its sender gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// `future`'s output, or `None` if the client leaves first (once its body
/// is read, when a close can be told from more of the request).
async fn unless_client_leaves<F: Future>(socket: &Socket, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut gone = pin!(client_gone(&socket.tcp));
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if socket.body_read() && gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Resolves when the client closes its side of the connection or resets
/// it. Bytes it sends meanwhile (its next request) are left where they
/// are, and the watch ends without resolving.
async fn client_gone(tcp: &TcpStream) {
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        let peeked = tcp.try_io(Interest::READABLE, || {
            Ok(rustix::net::recv(tcp, &mut [0u8; 1], RecvFlags::PEEK)?.0)
        });
        match peeked {
            Ok(0) => return,
            Ok(_) => std::future::pending::<()>().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Writes `response`: whether the connection can carry another request.
async fn respond(
    socket: &Socket,
    response: Response,
    facts: &Facts,
    keep_alive: bool,
    send_timeout: Duration,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let mut out = Outgoing::head(&parts, &body.size_hint(), facts, keep_alive);
    drop(parts);
    if out.has_body() {
        let mut gone = pin!(client_gone(&socket.tcp));
        loop {
            // What the body has ready goes out in one write with the head
            // or the frames before it.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    out.write(&socket.tcp, send_timeout).await?;
                    let next = poll_fn(|cx| {
                        if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                            return Poll::Ready(Some(frame));
                        }
                        match gone.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    });
                    match next.await {
                        Some(frame) => frame,
                        // Dropping the body stops what feeds it.
                        None => return Ok(false),
                    }
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    // The client has all the head promised; what follows
                    // could be taken for the next answer.
                    if let Err(Overrun) = out.data(data) {
                        out.write(&socket.tcp, send_timeout).await?;
                        return Ok(false);
                    }
                    if out.full() {
                        out.write(&socket.tcp, send_timeout).await?;
                    }
                }
                // The client sees the body cut short, as its framing
                // tells it.
                Some(Err(_)) => {
                    out.write(&socket.tcp, send_timeout).await?;
                    return Ok(false);
                }
                None => {
                    out.end();
                    break;
                }
            }
        }
    }
    out.write(&socket.tcp, send_timeout).await?;
    Ok(out.keep_alive)
}

/// Ends a connection the client may still be sending on (a body no
/// handler read, the rest of a refused head): it sees the end of what was
/// written, and what it sends is read and dropped until it closes too,
/// for a moment at most, so that the close does not reset the connection
/// under an answer the client has not read.
async fn linger(socket: &Socket) {
    if rustix::net::shutdown(&socket.tcp, Shutdown::Write).is_err() {
        return;
    }
    let drain = async {
        loop {
            if socket.tcp.readable().await.is_err() {
                return;
            }
            match socket
                .tcp
                .try_io(Interest::READABLE, || discard(&socket.tcp))
            {
                Ok(0) => return,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Reads and drops what the socket holds: how many bytes, 0 at its end.
fn discard(tcp: &TcpStream) -> io::Result<usize> {
    let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    Ok(rustix::net::recv(tcp, &mut sink[..], RecvFlags::empty())?
        .0
        .0
        .len())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::Body as AnswerBody;
    use bytes::{Bytes, BytesMut};
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::framing::{self, Chunked, Decoded, Framing};

    /// A connection served by `serve` with `service`, and the sender that
    /// stops it.
    async fn connect<S>(service: S) -> (TcpStream, watch::Sender<bool>, tokio::task::JoinHandle<()>)
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send,
    {
        connect_kept_alive(service, Duration::from_secs(600)).await
    }

    /// As [`connect`], the connection kept alive for `keepalive` between
    /// requests.
    async fn connect_kept_alive<S>(
        service: S,
        keepalive: Duration,
    ) -> (TcpStream, watch::Sender<bool>, tokio::task::JoinHandle<()>)
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        // As the listener sets up every connection it accepts.
        tcp.set_nodelay(true).unwrap();
        let (stopping, stop) = watch::channel(false);
        let first_head_by = Instant::now() + HEAD_TIMEOUT;
        let waits = (keepalive, Duration::from_secs(60));
        let served = tokio::spawn(serve(tcp, service, first_head_by, waits, stop));
        (client, stopping, served)
    }

    /// Answers with the method, the path and the body it read.
    async fn echo(request: Request<Body>) -> Result<Response, Infallible> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let text = format!(
            "{} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
        Ok(Response::new(AnswerBody::from(text)))
    }

    /// Reads one answer: its head, lower-cased, and its body as its
    /// framing gives it (until the end of the connection without one).
    async fn answer(client: &mut TcpStream, read: &mut BytesMut) -> (String, String) {
        let end = loop {
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                client.read_buf(read).await.unwrap() > 0,
                "closed before a head"
            );
        };
        let head = String::from_utf8(read.split_to(end).to_vec())
            .unwrap()
            .to_lowercase();
        let mut framing = if head.contains("transfer-encoding: chunked") {
            Framing::Chunked(Chunked::Size)
        } else if let Some(length) = head.split("content-length: ").nth(1) {
            Framing::Length(length.split("\r\n").next().unwrap().parse().unwrap())
        } else if head.starts_with("http/1.1 204") || head.starts_with("http/1.1 100") {
            Framing::Length(0)
        } else {
            Framing::Close
        };
        let mut body = Vec::new();
        loop {
            match framing::decode(&mut framing, read).unwrap() {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => break,
                Decoded::More => {
                    if client.read_buf(read).await.unwrap() == 0 {
                        assert_eq!(framing, Framing::Close, "cut short: {head}");
                        break;
                    }
                }
            }
        }
        (head, String::from_utf8(body).unwrap())
    }

    /// Whether the gateway has closed the connection (after any bytes
    /// still unread, which are returned).
    async fn closed(client: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        ) && rest.is_empty()
    }

    #[tokio::test]
    async fn requests_sent_together_or_apart_are_answered_in_order_on_one_connection() {
        let (mut client, _stop, _) = connect(service_fn(echo)).await;
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nhost: g\r\ncontent-length: 5\r\n\r\nhello\
                  POST /b HTTP/1.1\r\nhost: g\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nt: v\r\n\r\n\
                  GET /c HTTP/1.1\r\nhost: g\r\n\r\n",
            )
            .await
            .unwrap();
        let mut read = BytesMut::new();
        for expected in ["POST /a hello", "POST /b abcde", "GET /c "] {
            let (head, body) = answer(&mut client, &mut read).await;
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            assert!(head.contains("\r\ndate: "), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, expected);
        }
        // Apart, a body in pieces.
        client
            .write_all(b"POST /d HTTP/1.1\r\ncontent-length: 6\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"def").await.unwrap();
        assert_eq!(answer(&mut client, &mut read).await.1, "POST /d abcdef");
    }

    #[tokio::test]
    async fn a_client_that_expects_100_continue_gets_it_before_it_sends_its_body() {
        let (mut client, _stop, _) = connect(service_fn(echo)).await;
        client
            .write_all(b"POST /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
            .await
            .unwrap();
        let mut read = BytesMut::new();
        let (head, _) = answer(&mut client, &mut read).await;
        assert!(head.starts_with("http/1.1 100 continue\r\n"), "{head}");
        client.write_all(b"body").await.unwrap();
        assert_eq!(answer(&mut client, &mut read).await.1, "POST /e body");
    }

    /// Answers with a stream of `parts`, then ends it.
    fn streamed(parts: &'static [&'static str]) -> Response {
        let frames = parts.iter().map(|part| {
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(
                part.as_bytes(),
            )))
        });
        Response::new(AnswerBody::new(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
    }

    #[tokio::test]
    async fn an_answer_of_unknown_length_is_chunked_over_http_11_and_ends_the_connection_over_http_10()
     {
        let service = service_fn(|_: Request<Body>| async {
            Ok(streamed(&["data: 1\n\n", "", "data: 2\n\n"]))
        });
        let (mut client, _stop, _) = connect(service).await;
        client.write_all(b"GET /s HTTP/1.1\r\n\r\n").await.unwrap();
        let mut read = BytesMut::new();
        let (head, body) = answer(&mut client, &mut read).await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert_eq!(body, "data: 1\n\ndata: 2\n\n");

        client.write_all(b"GET /s HTTP/1.0\r\n\r\n").await.unwrap();
        let (head, body) = answer(&mut client, &mut read).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(
            head.contains("connection: close") && !head.contains("transfer-encoding"),
            "{head}"
        );
        assert_eq!(body, "data: 1\n\ndata: 2\n\n");
        assert!(closed(&mut client).await);
    }

    #[tokio::test]
    async fn a_head_request_gets_the_head_alone() {
        let (mut client, _stop, _) = connect(service_fn(echo)).await;
        client
            .write_all(b"HEAD /h HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut read = BytesMut::new();
        let mut end = 0;
        while end == 0 {
            client.read_buf(&mut read).await.unwrap();
            end = read
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |at| at + 4);
        }
        let head = String::from_utf8(read.split_to(end).to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(answer(&mut client, &mut read).await.1, "GET /after ");
    }

    #[tokio::test]
    async fn a_request_framed_twice_is_refused_with_an_openai_error_and_the_connection_closed() {
        let (mut client, _stop, _) = connect(service_fn(echo)).await;
        client
            .write_all(
                b"POST /x HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            )
            .await
            .unwrap();
        let (head, body) = answer(&mut client, &mut BytesMut::new()).await;
        assert!(head.starts_with("http/1.1 400 bad request\r\n"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("\"code\":\"malformed_http\""), "{body}");
        assert!(closed(&mut client).await);
    }

    #[tokio::test]
    async fn an_answer_given_before_its_body_is_read_reaches_the_client_whole_and_closes() {
        let service = service_fn(|_: Request<Body>| async {
            let mut refused = Response::new(AnswerBody::from("no"));
            *refused.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
            Ok(refused)
        });
        let (mut client, _stop, _) = connect(service).await;
        let body = vec![b'x'; 256 * 1024];
        let head = format!("POST /u HTTP/1.1\r\ncontent-length: {}\r\n\r\n", body.len());
        client.write_all(head.as_bytes()).await.unwrap();
        // The client goes on sending while the answer comes back.
        let (mut reader, mut writer) = client.into_split();
        let sender = tokio::spawn(async move { writer.write_all(&body).await });
        let mut answer = Vec::new();
        reader.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("connection: close") && answer.ends_with("\r\n\r\nno"),
            "{answer}"
        );
        let _ = sender.await;
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    async fn until(flag: &AtomicBool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !flag.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("not dropped");
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_the_work_for_it_before_or_during_its_answer() {
        // Before: the handler is still working.
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let service = service_fn(move |request: Request<Body>| {
            let guard = Dropped(flag.clone());
            async move {
                request.into_body().collect().await.unwrap();
                std::future::pending::<()>().await;
                drop(guard);
                Ok(Response::new(AnswerBody::empty()))
            }
        });
        let (mut client, _stop, served) = connect(service).await;
        client
            .write_all(b"POST /w HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(client);
        until(&dropped).await;
        served.await.unwrap();

        // During: the answer streams and its source waits.
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let service = service_fn(move |_: Request<Body>| {
            let guard = Dropped(flag.clone());
            let first = futures_util::stream::once(async {
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"data: 1\n\n")))
            });
            let rest = futures_util::stream::once(async move {
                std::future::pending::<()>().await;
                drop(guard);
                Ok(hyper::body::Frame::data(Bytes::new()))
            });
            let body = AnswerBody::new(http_body_util::StreamBody::new(first.chain(rest)));
            async move { Ok(Response::new(body)) }
        });
        let (mut client, _stop, served) = connect(service).await;
        client.write_all(b"GET /s HTTP/1.1\r\n\r\n").await.unwrap();
        let mut read = BytesMut::new();
        while !read.ends_with(b"data: 1\n\n\r\n") {
            client.read_buf(&mut read).await.unwrap();
        }
        assert!(!dropped.load(Ordering::SeqCst));
        drop(client);
        until(&dropped).await;
        served.await.unwrap();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_waits_its_keepalive_for_a_next_request_and_its_head_timeout_once_one_begins()
     {
        const REQUEST: &[u8] = b"GET /k HTTP/1.1\r\nhost: g\r\n\r\n";
        let keepalive = Duration::from_millis(300);
        let (mut client, _stop, served) = connect_kept_alive(service_fn(echo), keepalive).await;
        let mut read = BytesMut::new();
        client.write_all(REQUEST).await.unwrap();
        assert_eq!(answer(&mut client, &mut read).await.1, "GET /k ");
        // A head begun within the keep-alive is answered however long
        // past it the rest comes, within the head's own timeout.
        tokio::time::sleep(keepalive / 3).await;
        client.write_all(&REQUEST[..10]).await.unwrap();
        tokio::time::sleep(keepalive * 2).await;
        client.write_all(&REQUEST[10..]).await.unwrap();
        assert_eq!(answer(&mut client, &mut read).await.1, "GET /k ");
        // Silent for longer than the keep-alive: closed.
        let silent = Instant::now();
        assert!(closed(&mut client).await);
        assert!(silent.elapsed() >= keepalive, "{:?}", silent.elapsed());
        served.await.unwrap();
    }

    #[tokio::test]
    async fn stopping_closes_an_idle_connection_and_lets_a_request_in_flight_finish() {
        let (mut idle, stop, served) = connect(service_fn(echo)).await;
        stop.send_replace(true);
        assert!(closed(&mut idle).await);
        served.await.unwrap();

        let (mut client, stop, served) = connect(service_fn(echo)).await;
        client
            .write_all(b"POST /f HTTP/1.1\r\ncontent-length: 4\r\n\r\nst")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.send_replace(true);
        client.write_all(b"op").await.unwrap();
        let (head, body) = answer(&mut client, &mut BytesMut::new()).await;
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body, "POST /f stop");
        assert!(closed(&mut client).await);
        served.await.unwrap();
    }

    /// A request for [`echo`] on the wire, with what it must answer: a
    /// body (text that looks like requests, chunk sizes and line ends)
    /// framed at random ([`framing::random_framing`]).
    fn random_request(rng: &mut fastrand::Rng, n: usize) -> (Vec<u8>, String) {
        const PIECES: &[&str] = &[
            "a",
            "0\r\n\r\n",
            "\r\n",
            "GET /smuggled HTTP/1.1\r\n\r\n",
            "5\r\n",
            " ",
            "\n",
            "content-length: 9",
            ":",
            ";",
        ];
        let path = format!("/r{n}");
        if rng.u8(..5) == 0 {
            let wire = format!("GET {path} HTTP/1.1\r\nHost: g\r\n\r\n");
            return (wire.into_bytes(), format!("GET {path} "));
        }
        let body: String = (0..rng.usize(0..8))
            .map(|_| PIECES[rng.usize(..PIECES.len())])
            .collect();
        let mut wire = format!("POST {path} HTTP/1.1\r\nhost: g\r\n").into_bytes();
        wire.extend(framing::random_framing(rng, body.as_bytes()));
        (wire, format!("POST {path} {body}"))
    }

    #[tokio::test]
    async fn random_requests_sent_in_random_pieces_are_each_answered_with_their_own_body() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..200 {
            let (mut client, _stop, _) = connect(service_fn(echo)).await;
            client.set_nodelay(true).unwrap();
            let requests: Vec<(Vec<u8>, String)> =
                (0..8).map(|n| random_request(&mut rng, n)).collect();
            let wire: Vec<u8> = requests.iter().flat_map(|(w, _)| w.clone()).collect();
            let mut read = BytesMut::new();
            let mut answered = 0;
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let piece = rng.usize(1..=rest.len().min(64));
                client.write_all(&rest[..piece]).await.unwrap();
                rest = &rest[piece..];
                if rng.u8(..4) == 0 {
                    tokio::task::yield_now().await;
                }
                // Half the time, each answer is read as soon as its request
                // is whole; else all of them at the end.
                if rng.bool() {
                    let sent = wire.len() - rest.len();
                    let whole = requests
                        .iter()
                        .scan(0, |end, (w, _)| {
                            *end += w.len();
                            Some(*end)
                        })
                        .take_while(|&end| end <= sent)
                        .count();
                    while answered < whole {
                        let (head, body) = answer(&mut client, &mut read).await;
                        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
                        assert_eq!(body, requests[answered].1);
                        answered += 1;
                    }
                }
            }
            for (_, expected) in &requests[answered..] {
                let (head, body) = answer(&mut client, &mut read).await;
                assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
                assert_eq!(&body, expected);
            }
        }
    }
}
