//! How a Bedrock request proves who sends it: SigV4 (signing name
//! `bedrock`) with static credentials from the environment, or a Bedrock
//! API key as a bearer token. Secrets stay in `Credentials` and sensitive
//! header values, whose `Debug` shows neither.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::http::header::{AUTHORIZATION, HeaderName, HeaderValue};

use crate::config::Backend;
use crate::error::GatewayError;
use crate::providers::http::Target;

/// The service name in the credential scope: `bedrock`, not the
/// endpoint prefix `bedrock-runtime`.
const SIGNING_NAME: &str = "bedrock";

#[derive(Debug)]
pub enum Auth {
    SigV4 {
        credentials: Credentials,
        region: String,
    },
    ApiKey(HeaderValue),
}

impl Auth {
    pub fn new(backend: &Backend) -> Result<Self, String> {
        let aws = backend
            .aws
            .as_ref()
            .ok_or("a bedrock backend needs aws_region")?;
        if let Some(keys) = &aws.keys {
            return Ok(Self::SigV4 {
                credentials: Credentials::new(
                    keys.access_key_id.expose(),
                    keys.secret_access_key.expose(),
                    keys.session_token.as_ref().map(|t| t.expose().to_owned()),
                    None,
                    "tollgate-config",
                ),
                region: aws.region.clone(),
            });
        }
        crate::providers::http::bearer(backend)?
            .map(Self::ApiKey)
            .ok_or_else(|| "a bedrock backend needs credentials".to_owned())
    }

    /// The headers that authenticate a `POST` of `body` (JSON) to `target`.
    pub fn headers(
        &self,
        backend: &str,
        target: &Target,
        body: &[u8],
    ) -> Result<Vec<(HeaderName, HeaderValue)>, GatewayError> {
        self.headers_at(backend, target, body, SystemTime::now())
    }

    fn headers_at(
        &self,
        backend: &str,
        target: &Target,
        body: &[u8],
        time: SystemTime,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, GatewayError> {
        let (credentials, region) = match self {
            Self::ApiKey(key) => return Ok(vec![(AUTHORIZATION, key.clone())]),
            Self::SigV4 {
                credentials,
                region,
            } => (credentials, region),
        };
        let failed = |e: &dyn std::fmt::Display| {
            GatewayError::internal(format!(
                "could not sign the request to backend \"{backend}\": {e}"
            ))
        };
        // The host header the request is sent with.
        let host = target.host.to_str().map_err(|e| failed(&e))?;
        let url = target.uri.to_string();
        let identity = credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(SIGNING_NAME)
            .time(time)
            // The defaults are Bedrock's: the path double-encoded in the
            // canonical request, the session token signed, no
            // x-amz-content-sha256 header.
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let request = SignableRequest::new(
            "POST",
            &url,
            [("host", host), ("content-type", "application/json")].into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| failed(&e))?;
        let (instructions, _signature) =
            sign(request, &params).map_err(|e| failed(&e))?.into_parts();
        instructions
            .headers()
            .map(|(name, value)| {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| failed(&e))?;
                let mut value = HeaderValue::from_str(value).map_err(|e| failed(&e))?;
                value.set_sensitive(true);
                Ok((name, value))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// A golden vector: fixed credentials, time and body, whose signatures
    /// botocore's `SigV4Auth` and a hand implementation give too.
    fn golden(session_token: Option<&str>) -> Vec<(HeaderName, HeaderValue)> {
        let auth = Auth::SigV4 {
            credentials: Credentials::new(
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                session_token.map(str::to_owned),
                None,
                "test",
            ),
            region: "us-east-1".into(),
        };
        let target = crate::providers::http::target("b", "https://bedrock-runtime.us-east-1.amazonaws.com/model/meta.llama3-3-70b-instruct-v1%3A0/converse").unwrap();
        let body = br#"{"messages":[{"role":"user","content":[{"text":"Hello"}]}],"inferenceConfig":{"maxTokens":64}}"#;
        let time = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        auth.headers_at("b", &target, body, time).unwrap()
    }

    fn header<'h>(headers: &'h [(HeaderName, HeaderValue)], name: &str) -> &'h str {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    #[test]
    fn signs_the_golden_vector_with_the_colon_double_encoded() {
        let headers = golden(None);
        assert_eq!(header(&headers, "x-amz-date"), "20150830T123600Z");
        assert_eq!(
            header(&headers, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=57369b61c2f182ee97acdb5d1e03f7b072896a1137b7fcce28438cbfb59dc5cc"
        );
        assert!(headers.iter().all(|(n, _)| n != "x-amz-content-sha256"));
    }

    #[test]
    fn signs_the_session_token() {
        let headers = golden(Some("SESSIONTOKENEXAMPLE"));
        assert_eq!(
            header(&headers, "x-amz-security-token"),
            "SESSIONTOKENEXAMPLE"
        );
        let authorization = header(&headers, "authorization");
        assert!(
            authorization
                .contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token")
        );
        assert!(authorization.ends_with(
            "Signature=38312d03e5656a236f786c495516868ad156c28fb5a3fecda53b4545cb4f4625"
        ));
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let auth = Auth::SigV4 {
            credentials: Credentials::new(
                "AKID",
                "very-secret",
                Some("token-secret".into()),
                None,
                "t",
            ),
            region: "us-east-1".into(),
        };
        let shown = format!("{auth:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("token-secret"),
            "{shown}"
        );
        let mut key = HeaderValue::from_static("Bearer bedrock-key");
        key.set_sensitive(true);
        assert!(!format!("{:?}", Auth::ApiKey(key)).contains("bedrock-key"));
    }
}
