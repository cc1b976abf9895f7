//! HTTP/1.1 message framing (RFC 9112 §6–7), shared by the server and the
//! upstream client: what a head's headers say of where its body ends and
//! of its connection, read as they are parsed; and the chunked coding
//! decoded as its bytes arrive, however they are cut.

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

/// What a message head's headers say of its framing and its connection,
/// gathered as the head is read: one comparison of each header's name,
/// where looking each fact up in the header map afterwards hashed the
/// names again.
#[derive(Debug, Default)]
pub struct HeadFacts {
    /// What the `content-length` headers give, which must all agree and
    /// all be numbers.
    length: Option<u64>,
    invalid_length: bool,
    /// A `transfer-encoding` header is there.
    pub transfer_encoding: bool,
    /// The last transfer coding is `chunked`: what frames a body that has
    /// codings.
    pub chunked_last: bool,
    /// A transfer coding other than `chunked` is listed (`gzip, chunked`):
    /// the body's bytes are not the message, and no one here decodes them.
    pub other_coding: bool,
    /// `connection` lists `close`.
    pub close: bool,
    /// `connection` lists `keep-alive`.
    pub keep_alive: bool,
    /// `expect` lists `100-continue`.
    pub expect_continue: bool,
}

impl HeadFacts {
    /// Takes in the head's next header, its name a token in any case (as
    /// httparse and `HeaderName` check them). Most values are written one
    /// way (`chunked`, `keep-alive`, one number), taken as they are before
    /// being read as lists.
    pub fn read(&mut self, name: &[u8], value: &[u8]) {
        // The length tells the four names apart, and most others from them.
        let is = |known: &[u8]| token_is(name, known);
        match name.len() {
            14 if is(b"content-length") => self.read_length(value),
            17 if is(b"transfer-encoding") => {
                self.transfer_encoding = true;
                if value == b"chunked" {
                    self.chunked_last = true;
                    return;
                }
                self.chunked_last = false;
                let Some(codings) = items(value) else {
                    self.other_coding = true;
                    return;
                };
                for coding in codings {
                    self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                    self.other_coding |= !self.chunked_last;
                }
            }
            10 if is(b"connection") => match value {
                b"keep-alive" => self.keep_alive = true,
                b"close" => self.close = true,
                _ => {
                    for option in items(value).into_iter().flatten() {
                        self.close |= option.eq_ignore_ascii_case(b"close");
                        self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
            },
            6 if is(b"expect") => self.expect_continue |= lists(value, b"100-continue"),
            _ => {}
        }
    }

    /// Any byte that is not a digit, or a space, makes an item no number,
    /// so the value needs no check of its own.
    fn read_length(&mut self, value: &[u8]) {
        if let Some(n) = number(value) {
            return self.take_length(n);
        }
        for item in value.split(|&b| b == b',') {
            match number(item.trim_ascii()) {
                Some(n) => self.take_length(n),
                None => self.invalid_length = true,
            }
        }
    }

    /// Every copy of the length must be the same.
    fn take_length(&mut self, n: u64) {
        match self.length {
            None => self.length = Some(n),
            Some(seen) if seen == n => {}
            Some(_) => self.invalid_length = true,
        }
    }

    /// Framed both by a length and by codings: a smuggling attempt, it may
    /// be, so what follows the message is not trusted.
    pub fn framed_twice(&self) -> bool {
        self.transfer_encoding && (self.length.is_some() || self.invalid_length)
    }

    /// The length the `content-length` headers give, if any.
    pub fn content_length(&self) -> Result<Option<u64>, InvalidLength> {
        if self.invalid_length {
            return Err(InvalidLength);
        }
        Ok(self.length)
    }
}

/// Whether the token `name` is `lower` (lowercase letters and `-`) in any
/// case, compared 8 bytes a step: setting bit 5 lowercases a letter and
/// leaves `-` as it is, and no other byte a token may hold becomes a
/// letter or `-` with it set.
fn token_is(name: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    let word = |part: &[u8]| {
        let mut word = [0; 8];
        word[..part.len()].copy_from_slice(part);
        u64::from_ne_bytes(word) | CASE
    };
    name.len() == lower.len()
        && name
            .chunks(8)
            .zip(lower.chunks(8))
            .all(|(a, b)| word(a) == word(b))
}

/// Whether a header value is visible ASCII (and tabs): what
/// `HeaderValue::to_str` reads as text.
pub fn visible_ascii(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The comma-separated items of a header value, trimmed; `None` when the
/// value is not [`visible_ascii`].
fn items(value: &[u8]) -> Option<impl DoubleEndedIterator<Item = &[u8]>> {
    visible_ascii(value).then(|| value.split(|&b| b == b',').map(<[u8]>::trim_ascii))
}

/// Whether a header value lists `token` (case-insensitive).
fn lists(value: &[u8], token: &[u8]) -> bool {
    items(value).is_some_and(|mut items| items.any(|item| item.eq_ignore_ascii_case(token)))
}

/// Digits only, as a number that fits: `parse` would take a sign.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &digit| {
        digit
            .is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(digit - b'0')))?
    })
}

/// Whether a header of `name` lists `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|value| lists(value.as_bytes(), token.as_bytes()))
}

/// A body framed at random, as a message's last header and the rest of
/// the message: by `content-length`, or chunked in random pieces with
/// chunk extensions and trailers; the header's name in either case.
#[cfg(test)]
pub fn random_framing(rng: &mut fastrand::Rng, body: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    if rng.bool() {
        let name = ["Content-Length", "content-length"][rng.usize(..2)];
        wire.extend(format!("{name}: {}\r\n\r\n", body.len()).bytes());
        wire.extend_from_slice(body);
        return wire;
    }
    let name = ["Transfer-Encoding", "transfer-encoding"][rng.usize(..2)];
    wire.extend(format!("{name}: chunked\r\n\r\n").bytes());
    let mut rest = body;
    while !rest.is_empty() {
        let size = rng.usize(1..=rest.len());
        let extension = ["", ";x=\"y\""][rng.usize(..2)];
        wire.extend(format!("{size:x}{extension}\r\n").bytes());
        wire.extend_from_slice(&rest[..size]);
        wire.extend_from_slice(b"\r\n");
        rest = &rest[size..];
    }
    let trailers = ["", "t: v\r\n", "t: v\r\nu: w\r\n"][rng.usize(..3)];
    wire.extend(format!("0\r\n{trailers}\r\n").bytes());
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(headers: &[(&str, &[u8])]) -> HeadFacts {
        let mut said = HeadFacts::default();
        for (name, value) in headers {
            said.read(name.as_bytes(), value);
        }
        said
    }

    #[test]
    fn names_are_read_in_any_case_and_only_names_that_are_them() {
        let said = said(&[
            ("Content-Length", b"5"),
            ("TRANSFER-encoding", b"chunked"),
            ("CONNECTION", b"close"),
            ("Expect", b"100-continue"),
        ]);
        assert_eq!(said.content_length().ok(), Some(Some(5)));
        assert!(said.transfer_encoding && said.chunked_last && said.close);
        assert!(said.expect_continue);
        // Every byte a token may hold, in every place of each name: only
        // the name's own letters, in either case, are it.
        let tokens = (0..=255u8).filter(|&b| {
            httparse::parse_headers(
                &[b, b':', b'\r', b'\n', b'\r', b'\n'],
                &mut [httparse::EMPTY_HEADER],
            )
            .is_ok()
        });
        for known in [
            "content-length",
            "transfer-encoding",
            "connection",
            "expect",
        ] {
            for at in 0..known.len() {
                for byte in tokens.clone() {
                    let mut name = known.as_bytes().to_vec();
                    name[at] = byte;
                    let same = byte.to_ascii_lowercase() == known.as_bytes()[at];
                    assert_eq!(token_is(&name, known.as_bytes()), same, "{name:?}");
                }
            }
        }
    }

    #[test]
    fn a_length_is_one_number_in_digits_however_many_times_it_is_given() {
        let length = |values: &[&[u8]]| {
            let headers: Vec<_> = values.iter().map(|v| ("content-length", *v)).collect();
            said(&headers).content_length().ok()
        };
        assert_eq!(length(&[]), Some(None));
        assert_eq!(length(&[b"42"]), Some(Some(42)));
        assert_eq!(length(&[b"0042"]), Some(Some(42)));
        assert_eq!(length(&[b"42, 42", b" 42 "]), Some(Some(42)));
        assert_eq!(length(&[b"18446744073709551615"]), Some(Some(u64::MAX)));
        for refused in [
            &[&b"42"[..], b"43"][..],
            &[b"42, 43"],
            &[b"+42"],
            &[b"-1"],
            &[b"4 2"],
            &[b""],
            &[b"42,"],
            &[b"0x2a"],
            &[b"18446744073709551616"],
            &[b"4\x802"],
        ] {
            assert_eq!(length(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn the_last_coding_of_the_last_transfer_encoding_decides_chunked() {
        let chunked = |values: &[&[u8]]| {
            let headers: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            let said = said(&headers);
            assert!(said.transfer_encoding);
            said.chunked_last
        };
        assert!(chunked(&[b"chunked"]));
        assert!(chunked(&[b"gzip, Chunked "]));
        assert!(chunked(&[b"chunked, gzip", b"chunked"]));
        assert!(!chunked(&[b"chunked", b"gzip"]));
        assert!(!chunked(&[b"chunked, gzip"]));
        assert!(!chunked(&[b""]));
        // Not visible ASCII: not read at all.
        assert!(!chunked(&[b"g\xffzip, chunked"]));
    }

    #[test]
    fn any_coding_but_chunked_is_told_apart() {
        let other = |values: &[&[u8]]| {
            let headers: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            said(&headers).other_coding
        };
        assert!(!other(&[b"chunked"]));
        assert!(!other(&[b"Chunked "]));
        assert!(!other(&[b"chunked", b"CHUNKED"]));
        assert!(other(&[b"gzip, chunked"]));
        assert!(other(&[b"gzip", b"chunked"]));
        assert!(other(&[b"chunked, identity"]));
        assert!(other(&[b""]));
        assert!(other(&[b"g\xffzip, chunked"]));
    }

    #[test]
    fn connection_and_expect_are_read_as_lists_of_tokens() {
        let closing = said(&[
            ("Connection", b"Upgrade, CLOSE"),
            ("expect", b"100-continue"),
            ("content-length", b"5"),
        ]);
        assert!(closing.close && !closing.keep_alive && closing.expect_continue);
        assert!(!closing.framed_twice());
        let kept = said(&[("connection", b"keep-alive"), ("expect", b"100-continued")]);
        assert!(!kept.close && kept.keep_alive && !kept.expect_continue);
        let twice = said(&[("content-length", b"x"), ("transfer-encoding", b"chunked")]);
        assert!(twice.framed_twice());
    }

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
