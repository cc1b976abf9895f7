//! Bedrock's errors → what a client should see, and whether another
//! deployment may be tried. Bedrock names the error (`x-amzn-ErrorType`
//! on a response, `:exception-type` on a stream frame); the name, more
//! than the HTTP status, decides.

use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;

use crate::error::GatewayError;
use crate::providers::http::ErrorReply;

#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default, alias = "Message")]
    message: Option<String>,
}

/// An error status from Bedrock.
pub fn from_reply(backend: &str, reply: ErrorReply) -> GatewayError {
    // `x-amzn-ErrorType` may carry a suffix (`Name:http://…`) or a
    // namespace (`ns#Name`); botocore keeps what is between.
    let name = reply
        .fields
        .get_str("x-amzn-errortype")
        .map(|v| v.split(':').next().unwrap_or(v))
        .map(|v| v.rsplit('#').next().unwrap_or(v))
        .unwrap_or("")
        .to_owned();
    let retry_after = reply.retry_after();
    exception(backend, &name, reply.status, &reply.body, retry_after)
}

/// A named Bedrock error. `status` is the HTTP status it came with (for a
/// stream exception frame, the status its exception has in the API).
pub fn exception(
    backend: &str,
    name: &str,
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> GatewayError {
    let message = serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.message)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    let detail = if name.is_empty() {
        message
    } else {
        format!("{name}: {message}")
    };
    let status = match name.to_ascii_lowercase().as_str() {
        "throttlingexception" | "servicequotaexceededexception" => StatusCode::TOO_MANY_REQUESTS,
        // The model is loading or Bedrock is overloaded: try elsewhere.
        "modelnotreadyexception" | "serviceunavailableexception" => StatusCode::SERVICE_UNAVAILABLE,
        "validationexception" => StatusCode::BAD_REQUEST,
        "modeltimeoutexception" => StatusCode::GATEWAY_TIMEOUT,
        "accessdeniedexception"
        | "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "expiredtokenexception" => StatusCode::FORBIDDEN,
        "resourcenotfoundexception" => StatusCode::NOT_FOUND,
        "modelerrorexception" | "modelstreamerrorexception" => StatusCode::FAILED_DEPENDENCY,
        "internalserverexception" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => status,
    };
    if matches!(status.as_u16(), 401 | 403) {
        return GatewayError::upstream_auth(format!(
            "backend \"{backend}\" refused the gateway's own AWS credentials ({detail}); \
             this is not the client's fault: the gateway operator must fix the backend's \
             aws_*_env or api_key_env credentials and the IAM permissions \
             (bedrock:InvokeModel, bedrock:InvokeModelWithResponseStream)"
        ));
    }
    let body = serde_json::json!({"message": detail}).to_string();
    GatewayError::upstream_status(backend, status, body.as_bytes(), retry_after)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn reply(status: u16, error_type: &str, body: &str) -> GatewayError {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amzn-errortype",
            HeaderValue::from_str(error_type).unwrap(),
        );
        from_reply(
            "bedrock-us",
            ErrorReply {
                status: StatusCode::from_u16(status).unwrap(),
                fields: headers.into(),
                body: body.as_bytes().to_vec(),
            },
        )
    }

    #[test]
    fn each_bedrock_error_maps_to_the_status_the_client_should_see() {
        // (status, x-amzn-ErrorType, client status, retriable)
        let cases = [
            (429, "ThrottlingException", 429, true),
            (400, "ValidationException", 400, false),
            (429, "ModelNotReadyException", 503, true),
            (503, "ServiceUnavailableException", 503, true),
            (408, "ModelTimeoutException", 504, true),
            (403, "AccessDeniedException", 502, false),
            (
                403,
                "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/",
                502,
                false,
            ),
            (424, "ModelErrorException", 502, true),
            (500, "InternalServerException", 502, true),
        ];
        for (status, name, client, retriable) in cases {
            let e = reply(status, name, r#"{"message":"words"}"#);
            assert_eq!(e.status(), client, "{name}");
            assert_eq!(e.retriable(), retriable, "{name}");
            assert!(e.message().contains("words"), "{name}: {}", e.message());
        }
        let e = reply(403, "AccessDeniedException", r#"{"Message":"no"}"#);
        assert!(
            e.message().contains("gateway's own AWS credentials"),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains("AccessDeniedException: no"),
            "{}",
            e.message()
        );
    }
}
