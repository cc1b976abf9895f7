//! An independent SigV4 check for the mock Bedrock: it re-derives the
//! signature from the request as received, with `hmac` and `sha2`, step
//! by step as the SigV4 spec describes — not with the `aws-sigv4` crate
//! the gateway signs with, so a shared mistake cannot pass unseen.

use hmac::{Hmac, Mac};
use hyper::HeaderMap;
use sha2::{Digest, Sha256};

pub struct Credentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub service: &'a str,
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding of everything but the unreserved characters, with
/// upper-case hex: SigV4's `UriEncode`.
pub fn uri_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The canonical request of a request as received. `path` is the path as
/// sent on the wire (already encoded once); services other than S3 encode
/// each segment again, so `%3A` becomes `%253A`.
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    signed_headers: &str,
    body: &[u8],
) -> String {
    let uri: Vec<String> = path.split('/').map(uri_encode).collect();
    let canonical_headers: String = signed_headers
        .split(';')
        .map(|name| {
            let value = headers
                .get_all(name)
                .iter()
                .map(|v| {
                    v.to_str()
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
                .join(",");
            format!("{name}:{value}\n")
        })
        .collect();
    format!(
        "{method}\n{}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
        uri.join("/"),
        hex::encode(Sha256::digest(body))
    )
}

/// Checks the `Authorization` header of a request; `Err` says what is
/// wrong, in the words a person debugging the signer needs.
pub fn verify(
    creds: &Credentials<'_>,
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let authorization = header("authorization").ok_or("no Authorization header")?;
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not an AWS4-HMAC-SHA256 signature")?;
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
            .ok_or(format!("no {name} in Authorization"))
    };
    let credential = field("Credential")?;
    let signed_headers = field("SignedHeaders")?;
    let signature = field("Signature")?;
    let date_time = header("x-amz-date").ok_or("no x-amz-date header")?;
    let date = date_time.get(..8).ok_or("a short x-amz-date")?;
    let scope = format!("{date}/{}/{}/aws4_request", creds.region, creds.service);
    if credential != format!("{}/{scope}", creds.access_key_id) {
        return Err(format!(
            "credential {credential} is not for {}/{scope}",
            creds.access_key_id
        ));
    }
    let signed: Vec<&str> = signed_headers.split(';').collect();
    for required in ["host", "x-amz-date"] {
        if !signed.contains(&required) {
            return Err(format!("{required} is not signed"));
        }
    }
    match (creds.session_token, header("x-amz-security-token")) {
        (Some(expected), Some(token)) if token == expected => {
            if !signed.contains(&"x-amz-security-token") {
                return Err("the session token is not signed".into());
            }
        }
        (Some(_), _) => return Err("the session token is missing or wrong".into()),
        (None, Some(_)) => return Err("a session token was sent, none was expected".into()),
        (None, None) => {}
    }
    let canonical = canonical_request(method, path, query, headers, signed_headers, body);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{}", creds.secret_access_key).as_bytes(), date);
    for part in [creds.region, creds.service, "aws4_request"] {
        key = hmac(&key, part);
    }
    let expected = hex::encode(hmac(&key, &string_to_sign));
    if signature == expected {
        Ok(())
    } else {
        Err(format!(
            "signature mismatch; canonical request:\n{canonical}"
        ))
    }
}
