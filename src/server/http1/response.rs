//! A response as it goes out: its head, framed by what its body says of
//! its length, and then its body, with what the body has ready gathered
//! into one write. The body's data is written from where it is, between
//! the head and framing written here: never copied, and no buffer grows
//! to hold it.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use axum::http::response::Parts;
use axum::http::{Method, StatusCode, Version};
use bytes::Bytes;
use hyper::body::SizeHint;
use tokio::net::TcpStream;

use super::request::Facts;
use crate::framing::has_token;

/// What is gathered before it is written even though the body has more
/// ready.
const WRITE_AT: usize = 64 * 1024;
/// The most pieces of data gathered into one write: with the framing
/// around each, within what one `writev` takes.
const MAX_PIECES: usize = 31;
/// Room for a head with the gateway's own headers, and the framing of a
/// few pieces of data.
const HEAD_ROOM: usize = 512;

/// How a body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// No body: a `HEAD`, a 204 or a 304.
    Nothing,
    /// As many bytes as `content-length` says.
    Length,
    Chunked,
    /// Until the connection closes (HTTP/1.0, length unknown).
    UntilClose,
}

/// The bytes of a response not written yet.
pub struct Outgoing {
    /// The head and the body's framing.
    buf: Vec<u8>,
    /// The body's data, each piece written after `buf[..at]`.
    pieces: Vec<(usize, Bytes)>,
    /// Bytes in `pieces`.
    gathered: usize,
    sending: Sending,
    /// Bytes the `content-length` promised and the body has not given.
    left: u64,
    /// The connection stays open after this response.
    pub keep_alive: bool,
}

impl Outgoing {
    /// The response's head, framed for a body of `size`. `keep_alive`:
    /// whether the connection may stay open after it, as far as the
    /// connection knows; the response can still close it.
    pub fn head(parts: &Parts, size: &SizeHint, facts: &Facts, keep_alive: bool) -> Self {
        let status = parts.status;
        let bodiless = facts.method == Method::HEAD
            || status.is_informational()
            || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
        let sending = if bodiless {
            Sending::Nothing
        } else if size.exact().is_some() {
            Sending::Length
        } else if facts.version == Version::HTTP_11 {
            Sending::Chunked
        } else {
            Sending::UntilClose
        };
        let keep_alive = keep_alive
            && sending != Sending::UntilClose
            && !has_token(&parts.headers, &CONNECTION, "close");
        let mut buf = Vec::with_capacity(HEAD_ROOM);
        buf.extend_from_slice(b"HTTP/1.1 ");
        buf.extend_from_slice(status.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        buf.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            // Framed here; a `HEAD` answer keeps the length the handler gave.
            let framed_here = name == TRANSFER_ENCODING
                || name == CONNECTION
                || (name == CONTENT_LENGTH && sending != Sending::Nothing);
            if framed_here {
                continue;
            }
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(value.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        if !parts.headers.contains_key(DATE) {
            buf.extend_from_slice(b"date: ");
            buf.extend_from_slice(&date());
            buf.extend_from_slice(b"\r\n");
        }
        match (sending, size.exact()) {
            (Sending::Length, Some(length)) => {
                buf.extend_from_slice(b"content-length: ");
                buf.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            (Sending::Chunked, _) => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if !keep_alive {
            buf.extend_from_slice(b"connection: close\r\n");
        } else if facts.version == Version::HTTP_10 {
            buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
        buf.extend_from_slice(b"\r\n");
        Self {
            buf,
            pieces: Vec::new(),
            gathered: 0,
            sending,
            left: size.exact().unwrap_or(0),
            keep_alive,
        }
    }

    /// Whether the response has a body to send.
    pub fn has_body(&self) -> bool {
        self.sending != Sending::Nothing
    }

    /// Adds `data` to what goes out. `Err`: more than the length the head
    /// gave.
    pub fn data(&mut self, data: Bytes) -> Result<(), Overrun> {
        // An empty chunk would end a chunked body.
        if data.is_empty() {
            return Ok(());
        }
        if self.sending == Sending::Length {
            self.left = self.left.checked_sub(data.len() as u64).ok_or(Overrun)?;
        }
        let chunked = self.sending == Sending::Chunked;
        if chunked {
            let mut size = [0u8; 18];
            let hex = hex(data.len(), &mut size);
            self.buf.extend_from_slice(hex);
            self.buf.extend_from_slice(b"\r\n");
        }
        self.gathered += data.len();
        self.pieces.push((self.buf.len(), data));
        if chunked {
            self.buf.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// Ends the body. A body shorter than its `content-length` leaves the
    /// client waiting for the rest: the connection closes to end it.
    pub fn end(&mut self) {
        if self.sending == Sending::Chunked {
            self.buf.extend_from_slice(b"0\r\n\r\n");
        }
        if self.sending == Sending::Length && self.left > 0 {
            self.keep_alive = false;
        }
    }

    /// Whether enough is gathered to write it now.
    pub fn full(&self) -> bool {
        self.gathered >= WRITE_AT || self.pieces.len() >= MAX_PIECES
    }

    /// Writes what is gathered; the buffers are let go, so a stream
    /// waiting for its next event holds none. A client that takes none of
    /// it for `send_timeout` has stopped reading: the write fails.
    pub async fn write(&mut self, tcp: &TcpStream, send_timeout: Duration) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let pieces = std::mem::take(&mut self.pieces);
        let total = buf.len() + std::mem::take(&mut self.gathered);
        let mut written = 0;
        while written < total {
            // Made anew after each wait, so the future holds no slices.
            let blocked = {
                let mut slices = [IoSlice::new(&[]); 2 * MAX_PIECES + 1];
                let count = unwritten(&buf, &pieces, written, &mut slices);
                match tcp.try_write_vectored(&slices[..count]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        written += n;
                        false
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    Err(e) => return Err(e),
                }
            };
            if blocked {
                tokio::time::timeout(send_timeout, tcp.writable())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            }
        }
        Ok(())
    }
}

/// Puts in `slices` what is gathered past its first `written` bytes, in
/// order: the head and framing in `buf`, with `pieces` put in where they
/// go. Returns how many slices it used.
fn unwritten<'a>(
    buf: &'a [u8],
    pieces: &'a [(usize, Bytes)],
    mut written: usize,
    slices: &mut [IoSlice<'a>],
) -> usize {
    let last = pieces.last().map_or(0, |(at, _)| *at);
    let mut from = 0;
    let parts = pieces
        .iter()
        .flat_map(|(at, data)| {
            let framing = &buf[from..*at];
            from = *at;
            [framing, &data[..]]
        })
        .chain(std::iter::once(&buf[last..]));
    let mut count = 0;
    for part in parts {
        let skipped = written.min(part.len());
        written -= skipped;
        if part.len() > skipped {
            slices[count] = IoSlice::new(&part[skipped..]);
            count += 1;
        }
    }
    count
}

/// A body gave more bytes than its length.
pub struct Overrun;

/// `n` in hexadecimal, as a chunk size is written.
fn hex(n: usize, out: &mut [u8; 18]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut at = out.len();
    let mut n = n;
    loop {
        at -= 1;
        out[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[at..];
        }
    }
}

/// The time as a `date` header gives it, formatted once a second on each
/// thread.
fn date() -> [u8; 29] {
    thread_local! {
        static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cached| {
        let (at, text) = cached.get();
        if at == second {
            return text;
        }
        let mut text = [0; 29];
        text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
        cached.set((second, text));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        let mut out = [0; 18];
        assert_eq!(hex(0, &mut out), b"0");
        assert_eq!(hex(255, &mut out), b"ff");
        assert_eq!(hex(16 * 1024, &mut out), b"4000");
        assert_eq!(hex(usize::MAX, &mut out), b"ffffffffffffffff");
    }

    #[test]
    fn what_is_left_to_write_is_the_rest_of_the_bytes_in_order_wherever_a_write_stopped() {
        let buf = b"HEAD\r\n\r\n3\r\n\r\n2\r\n\r\n0\r\n\r\n";
        let pieces = [
            (11, Bytes::from_static(b"abc")),
            (16, Bytes::from_static(b"de")),
        ];
        let whole = b"HEAD\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        for written in 0..=whole.len() {
            let mut slices = [IoSlice::new(&[]); 2 * MAX_PIECES + 1];
            let count = unwritten(buf, &pieces, written, &mut slices);
            let rest: Vec<u8> = slices[..count].iter().flat_map(|s| s.to_vec()).collect();
            assert_eq!(rest, whole[written..], "after {written} bytes");
            assert!(slices[..count].iter().all(|s| !s.is_empty()));
        }
        // Nothing gathered but the head.
        let mut slices = [IoSlice::new(&[]); 2 * MAX_PIECES + 1];
        assert_eq!(unwritten(b"HEAD", &[], 1, &mut slices), 1);
        assert_eq!(&*slices[0], b"EAD");
    }

    #[test]
    fn the_date_is_as_http_writes_it() {
        let date = date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
