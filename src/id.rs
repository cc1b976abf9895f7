//! Random ids for requests and responses, and the header a request's id
//! travels in. They need to be unique, not secret: 128 bits from a fast
//! thread-local generator, as 32 hex digits (the shape of a simple UUID),
//! with no system call per id.

use axum::http::HeaderName;

/// The request id, on the client's request and response and on the
/// upstream call, so the logs can be joined.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

pub fn random() -> String {
    // Written into place: `hex::encode` pushes its digits one `char` at a
    // time, which costs more than the rest of finding a request's id.
    let mut digits = [0; 32];
    hex::encode_to_slice(fastrand::u128(..).to_be_bytes(), &mut digits)
        .expect("16 bytes are 32 hex digits");
    String::from_utf8(digits.to_vec()).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_id_is_32_lowercase_hex_digits_and_new_each_time() {
        let (a, b) = (super::random(), super::random());
        assert_eq!(a.len(), 32, "{a}");
        assert!(
            a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{a}"
        );
        assert_ne!(a, b);
    }
}
