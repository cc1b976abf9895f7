//! HTTP/1.1 message framing (RFC 9112 §6–7), shared by the server and the
//! upstream client: where a body ends, and the chunked coding decoded as
//! its bytes arrive, however they are cut.

use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderName};
use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk-size line, or trailer section, read before the body
/// is refused.
pub const MAX_LINES: usize = 64 * 1024;

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After this many more bytes.
    Length(u64),
    Chunked(Chunked),
    /// When the sender closes the connection (responses only).
    Close,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size,
    /// In a chunk's data, with this many bytes to come.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// Past the last chunk, at the trailer section.
    Trailers,
}

/// What the bytes read so far give.
pub enum Decoded {
    Data(Bytes),
    End,
    More,
}

/// What the bytes read so far give, as far as they go: `read` keeps what
/// follows them.
pub fn decode(framing: &mut Framing, read: &mut BytesMut) -> Result<Decoded, String> {
    loop {
        match framing {
            Framing::Length(0) => return Ok(Decoded::End),
            Framing::Length(left) | Framing::Chunked(Chunked::Data(left)) => {
                if read.is_empty() {
                    return Ok(Decoded::More);
                }
                let take = read.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                let data = read.split_to(take).freeze();
                if let Framing::Chunked(state @ Chunked::Data(0)) = framing {
                    // Its CRLF is taken with it when it is there, so
                    // that a whole chunk leaves nothing behind.
                    *state = if read.starts_with(b"\r\n") {
                        read.advance(2);
                        Chunked::Size
                    } else {
                        Chunked::DataEnd
                    };
                }
                return Ok(Decoded::Data(data));
            }
            Framing::Close => {
                if read.is_empty() {
                    return Ok(Decoded::More);
                }
                return Ok(Decoded::Data(read.split().freeze()));
            }
            Framing::Chunked(state @ Chunked::Size) => match httparse::parse_chunk_size(read) {
                Ok(httparse::Status::Complete((length, 0))) => {
                    read.advance(length);
                    *state = Chunked::Trailers;
                }
                Ok(httparse::Status::Complete((length, size))) => {
                    read.advance(length);
                    *state = Chunked::Data(size);
                }
                Ok(httparse::Status::Partial) if read.len() > MAX_LINES => {
                    return Err("a chunk-size line too long".into());
                }
                Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                Err(_) => return Err("an invalid chunk size".into()),
            },
            Framing::Chunked(state @ Chunked::DataEnd) => {
                if read.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &read[..2] != b"\r\n" {
                    return Err("a chunk longer than its size".into());
                }
                read.advance(2);
                *state = Chunked::Size;
            }
            Framing::Chunked(Chunked::Trailers) => {
                let end = if read.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    memchr::memmem::find(read, b"\r\n\r\n").map(|at| at + 4)
                };
                return match end {
                    Some(end) => {
                        read.advance(end);
                        *framing = Framing::Length(0);
                        Ok(Decoded::End)
                    }
                    None if read.len() > MAX_LINES => Err("a trailer section too long".into()),
                    None => Ok(Decoded::More),
                };
            }
        }
    }
}

/// `content-length` headers that are not one number.
#[derive(Debug)]
pub struct InvalidLength;

/// The length the `content-length` headers give, which must all agree
/// and all be numbers.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, InvalidLength> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let items = value
            .to_str()
            .map_err(|_| InvalidLength)?
            .split(',')
            .map(str::trim);
        for item in items {
            // Digits only: `parse` would take a sign.
            let digits = !item.is_empty() && item.bytes().all(|b| b.is_ascii_digit());
            match (digits.then(|| item.parse::<u64>().ok()).flatten(), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(seen)) if n == seen => {}
                _ => return Err(InvalidLength),
            }
        }
    }
    Ok(length)
}

/// Whether the last transfer coding is `chunked`: what frames a body
/// that has codings.
pub fn chunked_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
}

/// Whether a header of `name` lists `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_reads_the_same_however_its_bytes_are_cut() {
        let wire = b"4\r\ndata\r\n1A;name=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx: y\r\n\r\n";
        for cut in 0..=wire.len() {
            for second in cut..=wire.len() {
                let mut framing = Framing::Chunked(Chunked::Size);
                let mut read = BytesMut::new();
                let mut data = Vec::new();
                let mut ended = false;
                for part in [&wire[..cut], &wire[cut..second], &wire[second..]] {
                    read.extend_from_slice(part);
                    loop {
                        match decode(&mut framing, &mut read).unwrap() {
                            Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                            Decoded::End => {
                                ended = true;
                                break;
                            }
                            Decoded::More => break,
                        }
                    }
                }
                assert!(ended, "cut at {cut} and {second}");
                assert_eq!(data, b"dataabcdefghijklmnopqrstuvwxyz");
                assert!(read.is_empty());
            }
        }
    }
}
