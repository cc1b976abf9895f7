//! Credentials in a URL's query: config files hold no secrets, and a URL
//! written in one carries none there either.

use url::Url;

/// Query parameters that carry a credential, compared in any case with
/// `-` read as `_`: passwords, API keys, bearer and access tokens, and
/// the signatures of presigned URLs (Azure SAS `sig`, S3's
/// `X-Amz-Signature` and `X-Amz-Security-Token`).
const SECRET_PARAMETERS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "pwd",
    "secret",
    "client_secret",
    "key",
    "api_key",
    "apikey",
    "token",
    "access_token",
    "auth",
    "auth_token",
    "sig",
    "signature",
    "x_amz_signature",
    "x_amz_security_token",
];

/// The first of `url`'s query parameters that carries a credential, as
/// written, for a problem to name (never its value).
pub fn secret_in_query(url: &Url) -> Option<String> {
    url.query_pairs()
        .map(|(name, _)| name)
        .find(|name| {
            let name = name.to_ascii_lowercase().replace('-', "_");
            SECRET_PARAMETERS.contains(&name.as_str())
        })
        .map(|name| name.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Option<String> {
        secret_in_query(&Url::parse(text).unwrap())
    }

    #[test]
    fn a_credential_is_found_by_its_name_in_any_case() {
        for (url, name) in [
            ("http://otel:4318?api_key=s", "api_key"),
            ("http://otel:4318/?x=1&API-Key=s", "API-Key"),
            (
                "https://a.openai.azure.com/?api-version=1&api-key=s",
                "api-key",
            ),
            ("https://blob/x?sv=2022&sig=s", "sig"),
            ("https://s3/x?X-Amz-Signature=s", "X-Amz-Signature"),
            ("redis://r:6379/0?password=s", "password"),
            ("http://c?access%5Ftoken=s", "access_token"),
        ] {
            assert_eq!(found(url).as_deref(), Some(name), "{url}");
        }
        for url in [
            "http://otel:4318",
            "https://a.openai.azure.com/?api-version=2024-02-01",
            "redis://r:6379/0?protocol=resp3",
            "http://c?keys=1&monkey=2&tokens=3",
        ] {
            assert_eq!(found(url), None, "{url}");
        }
    }
}
