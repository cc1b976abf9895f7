//! hyper's HTTP/1 server refuses a request head it cannot read (bad
//! framing, bad header bytes, a head over the size or header-count limit)
//! itself, before any route runs, with a bare 400 or 431. [`Refusing`]
//! sits between hyper and the socket, recognises those answers as they
//! are written, and writes the same status with an OpenAI error body.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::GatewayError;

/// The most a request head (request line and headers) may take: nginx's
/// default, and hyper's smallest read buffer.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most headers a request may have: hyper's fixed limit.
const MAX_HEADERS: usize = 100;

/// hyper's own answers, up to the `content-length: 0` line it ends them
/// with (the `date` line follows). No answer of ours starts so: ours carry
/// a body, and a content type, before `connection: close`.
const MALFORMED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n";
const NO_BODY: &[u8] = b"content-length: 0\r\n";
/// Longer than any head hyper writes on its own: most writes are judged
/// by their length alone.
const MAX_OWN_HEAD: usize = 160;

/// An HTTP/1 connection's socket, with hyper's bare refusals given a body.
pub struct Refusing<T> {
    io: T,
    state: State,
}

enum State {
    Serving,
    /// Writing the answer that replaces hyper's; `usize` bytes are out.
    Answering(Box<[u8]>, usize),
    /// The answer is out; hyper closes the connection after it.
    Answered,
}

impl<T> Refusing<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            state: State::Serving,
        }
    }
}

/// The answer to write in place of `head`, when `head` is hyper's own.
fn answer_for(head: &[u8]) -> Option<Box<[u8]>> {
    if head.len() > MAX_OWN_HEAD {
        return None;
    }
    let (status_line, error) = if head.starts_with(MALFORMED) {
        (MALFORMED, GatewayError::malformed_http())
    } else if head.starts_with(TOO_LARGE) {
        (
            TOO_LARGE,
            GatewayError::head_too_large(MAX_HEAD_BYTES, MAX_HEADERS),
        )
    } else {
        return None;
    };
    let rest = head[status_line.len()..].strip_prefix(NO_BODY)?;
    let body = error.body_json();
    let mut answer = Vec::with_capacity(head.len() + body.len() + 64);
    answer.extend_from_slice(status_line);
    answer.extend_from_slice(b"content-type: application/json\r\n");
    if error.kind().client_should_not_retry() {
        answer.extend_from_slice(b"x-should-retry: false\r\n");
    }
    answer.extend_from_slice(b"content-length: ");
    answer.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    answer.extend_from_slice(b"\r\n");
    answer.extend_from_slice(rest);
    answer.extend_from_slice(&body);
    Some(answer.into_boxed_slice())
}

impl<T: AsyncWrite + Unpin> Refusing<T> {
    /// Writes `buf`, or the answer that replaces it when it is hyper's own
    /// refusal; either way `buf` counts as written.
    fn write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let State::Serving = self.state {
            match answer_for(buf) {
                Some(answer) => self.state = State::Answering(answer, 0),
                None => return Pin::new(&mut self.io).poll_write(cx, buf),
            }
        }
        ready!(self.finish_answer(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn finish_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let State::Answering(answer, out) = &mut self.state {
            if *out == answer.len() {
                self.state = State::Answered;
                break;
            }
            match ready!(Pin::new(&mut self.io).poll_write(cx, &answer[*out..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => *out += n,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Refusing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Refusing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper writes its refusal alone: no body follows it.
        match (&self.state, bufs) {
            (State::Serving, [head]) if head.len() <= MAX_OWN_HEAD => self.write(cx, head),
            (State::Serving, _) => Pin::new(&mut self.io).poll_write_vectored(cx, bufs),
            (_, bufs) => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                self.write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.finish_answer(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.finish_answer(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &[u8] = b"date: Fri, 04 Dec 2026 12:49:17 GMT\r\n\r\n";

    fn own(status_line: &[u8]) -> Vec<u8> {
        [status_line, NO_BODY, DATE].concat()
    }

    #[test]
    fn only_hypers_own_refusals_are_answered_again() {
        let answer = answer_for(&own(TOO_LARGE)).unwrap();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.ends_with("GMT"), "{head}");
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"]["code"], "headers_too_large");
        assert!(answer_for(&own(MALFORMED)).is_some());

        // Ours: a body, or a header before hyper's.
        let with_body = [MALFORMED, b"content-length: 2\r\n", DATE].concat();
        assert!(answer_for(&with_body).is_none());
        let ours =
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n";
        assert!(answer_for(ours).is_none());
        assert!(answer_for(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
    }
}
