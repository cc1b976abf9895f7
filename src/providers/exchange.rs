//! One exchange with an upstream as a provider sees it: the request it
//! sends and the answer it gets. Neither keeps its header fields in a
//! header map. A request's are only ever written out, in order. Of an
//! answer's, the gateway reads a few (the upstream's quota,
//! `retry-after`, an error's type), so they are kept as they arrived and
//! looked up by name when asked for. A map hashes every name as it is
//! built, which costs more than all the lookups.

use std::ops::Range;

use axum::http::header::HOST;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;

use crate::framing;

/// A request to an upstream.
pub struct Outgoing {
    pub method: Method,
    /// Absolute: the connection's origin is read from it, and its path
    /// and query are written in the request line.
    pub uri: Uri,
    /// The header fields, `host` first, each name once.
    pub fields: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Outgoing {
    /// A request to `uri`, whose `Host` header is `host`.
    pub fn new(method: Method, uri: Uri, host: HeaderValue, body: Bytes) -> Self {
        let mut fields = Vec::with_capacity(6);
        fields.push((HOST, host));
        Self {
            method,
            uri,
            fields,
            body,
        }
    }

    /// The same request for hyper's client.
    pub fn into_request<B>(self, body: impl FnOnce(Bytes) -> B) -> Request<B> {
        let mut request = Request::new(body(self.body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        request.headers_mut().extend(self.fields);
        request
    }
}

pub struct Answer<B> {
    pub status: StatusCode,
    pub fields: Fields,
    pub body: B,
}

impl<B> Answer<B> {
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Answer<C> {
        Answer {
            status: self.status,
            fields: self.fields,
            body: f(self.body),
        }
    }
}

/// A response's header fields, names compared without regard to case.
pub struct Fields(Kept);

enum Kept {
    /// As the gateway's own HTTP/1.1 client read them: the head as
    /// received, and where each field's name and value are in it.
    Read { head: Bytes, at: Vec<FieldAt> },
    /// As hyper's client gives them (HTTPS upstreams).
    Map(HeaderMap),
}

/// Where one field's name and value are in a head.
pub struct FieldAt {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

impl Fields {
    /// The fields at `at` in `head`, whose names and values the head's
    /// parser has checked.
    pub fn read(head: Bytes, at: Vec<FieldAt>) -> Self {
        Self(Kept::Read { head, at })
    }

    /// Every field as (name, value), in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let (read, map) = match &self.0 {
            Kept::Read { head, at } => {
                let field = |f: &FieldAt| (&head[f.name.clone()], &head[f.value.clone()]);
                (Some(at.iter().map(field)), None)
            }
            Kept::Map(map) => {
                let fields = map
                    .iter()
                    .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
                (None, Some(fields))
            }
        };
        read.into_iter().flatten().chain(map.into_iter().flatten())
    }

    /// The first value of the field named `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        match &self.0 {
            Kept::Map(map) => map.get(name).map(|value| value.as_bytes()),
            Kept::Read { .. } => self
                .iter()
                .find(|(field, _)| field.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, value)| value),
        }
    }

    /// The first value of the field named `name`, when it is visible
    /// ASCII, as `HeaderValue::to_str` reads it.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        let value = self
            .get(name)
            .filter(|value| framing::visible_ascii(value))?;
        std::str::from_utf8(value).ok()
    }
}

impl From<HeaderMap> for Fields {
    fn from(map: HeaderMap) -> Self {
        Self(Kept::Map(map))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn read(head: &'static [u8]) -> Fields {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(head).unwrap();
        let start = head.as_ptr() as usize;
        let at = parsed
            .headers
            .iter()
            .map(|h| {
                let name = h.name.as_ptr() as usize - start;
                let value = h.value.as_ptr() as usize - start;
                FieldAt {
                    name: name..name + h.name.len(),
                    value: value..value + h.value.len(),
                }
            })
            .collect();
        Fields::read(Bytes::from_static(head), at)
    }

    #[test]
    fn fields_are_found_by_name_in_any_case_the_first_of_each_name() {
        let fields = read(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-Amzn-ErrorType: A\r\nx-amzn-errortype: B\r\nx-obs: caf\xc3\xa9\r\n\r\n",
        );
        assert_eq!(fields.get("retry-after"), Some(&b"7"[..]));
        assert_eq!(fields.get_str("x-amzn-errortype"), Some("A"));
        assert_eq!(fields.get("x-obs"), Some("café".as_bytes()));
        assert_eq!(fields.get_str("x-obs"), None);
        assert_eq!(fields.get("x-absent"), None);
        assert_eq!(fields.iter().count(), 4);

        let mut map = HeaderMap::new();
        map.insert("retry-after", HeaderValue::from_static("7"));
        map.append("x-amzn-errortype", HeaderValue::from_static("A"));
        map.append("x-amzn-errortype", HeaderValue::from_static("B"));
        let fields = Fields::from(map);
        assert_eq!(fields.get_str("retry-after"), Some("7"));
        assert_eq!(fields.get_str("x-amzn-errortype"), Some("A"));
        let names: Vec<_> = fields.iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                &b"retry-after"[..],
                b"x-amzn-errortype",
                b"x-amzn-errortype"
            ]
        );
    }
}
