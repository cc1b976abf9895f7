//! The one error type. It knows who is at fault (client, upstream, gateway)
//! and whether another deployment may be tried; `server` turns it into an
//! OpenAI error body in one place (`into_response`).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::limits::{Limit, Refused};
mod wire;

pub use wire::UpstreamErrorParts;
use wire::{ErrorBody, ErrorObject};

/// OpenAI's `code` for a rate limit.
const RATE_LIMIT_EXCEEDED: &str = "rate_limit_exceeded";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, Clone)]
pub struct GatewayError {
    pub status: StatusCode,
    pub source: ErrorSource,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    /// Another deployment may be tried (only before the client got a byte).
    pub retriable: bool,
    pub retry_after: Option<Duration>,
}

impl GatewayError {
    fn new(
        status: StatusCode,
        source: ErrorSource,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            source,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retriable: false,
            retry_after: None,
        }
    }

    fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    fn retriable(mut self) -> Self {
        self.retriable = true;
        self
    }

    pub fn bad_request(message: impl Into<String>, param: Option<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Client,
            "invalid_request_error",
            message,
        );
        e.param = param;
        e
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorSource::Client,
            "invalid_request_error",
            format!("request body is larger than this gateway's limit of {limit} bytes; send a smaller request"),
        )
        .code("request_too_large")
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorSource::Client,
            "invalid_request_error",
            message,
        )
        .code("invalid_api_key")
    }

    pub fn model_not_allowed(alias: &str, key: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            ErrorSource::Client,
            "invalid_request_error",
            format!("key \"{key}\" may not use model \"{alias}\"; GET /v1/models lists the models it may use"),
        )
        .code("model_not_allowed")
    }

    pub fn unknown_model(alias: &str, known: &[&str]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            ErrorSource::Client,
            "invalid_request_error",
            format!(
                "the model \"{alias}\" does not exist; available models: {}",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        )
        .code("model_not_found");
        e.param = Some("model".into());
        e
    }

    /// Policy leaves no deployment for the request (region, licence,
    /// modality, context window, tools).
    pub fn policy_blocked(message: String) -> Self {
        Self::new(
            StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            ErrorSource::Client,
            "invalid_request_error",
            message,
        )
        .code("policy_blocked")
    }

    /// Every deployment the policy allows is unhealthy or cooling down.
    pub fn no_deployment_available(alias: &str, retry_after: Duration) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorSource::Upstream,
            "server_error",
            format!(
                "no deployment of model \"{alias}\" is available right now (circuits open or rate limited); retry after {} s",
                retry_after.as_secs_f64().ceil()
            ),
        )
        .code("no_deployment_available");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn region_not_allowed(key: &str, chosen: &str, own: Option<&str>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            ErrorSource::Client,
            "invalid_request_error",
            match own {
                Some(own) => format!(
                    "key \"{key}\" serves region \"{own}\" and may not choose region \"{chosen}\" with x-tollgate-region; remove the header"
                ),
                None => format!(
                    "key \"{key}\" may not choose its region with x-tollgate-region (\"{chosen}\"); remove the header, or ask the operator for region_header = true"
                ),
            },
        )
        .code("region_not_allowed")
    }

    /// A key's budget cannot cover the request.
    pub fn budget_exhausted(message: String) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorSource::Client,
            "insufficient_quota",
            message,
        )
        .code("insufficient_quota")
    }

    /// A key is over its `rpm` or `tpm`: 429 with `retry-after` from the
    /// limiter, which the SDKs honour and retry, as they should — the
    /// limit refills. A prompt of about `tokens` that is more than the
    /// whole `tpm` never fits: 400.
    pub fn key_rate_limited(key: &str, refused: &Refused, tokens: u64) -> Self {
        let Refused {
            limit, per_minute, ..
        } = *refused;
        let Some(wait) = refused.wait else {
            return Self::new(
                StatusCode::BAD_REQUEST,
                ErrorSource::Client,
                "invalid_request_error",
                format!(
                    "the request's prompt is about {tokens} tokens, more than key \"{key}\" may use in a minute \
                     (tpm = {per_minute}); send a shorter prompt, or ask the operator to raise the key's tpm"
                ),
            )
            .code("request_too_large");
        };
        let wait = wait.max(Duration::from_secs(1));
        let need = match limit {
            Limit::Requests => String::new(),
            Limit::Tokens => format!(" (this request needs about {tokens})"),
        };
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorSource::Client,
            "rate_limit_error",
            format!(
                "key \"{key}\" is over its rate limit of {per_minute} {} per minute ({}){need}; retry after {} s",
                limit.unit(),
                limit.name(),
                wait.as_secs_f64().ceil()
            ),
        )
        .code(RATE_LIMIT_EXCEEDED);
        e.retry_after = Some(wait);
        e
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorSource::Client,
            "invalid_request_error",
            format!(
                "no route for {path}; this gateway serves /v1/chat/completions, /v1/completions and /v1/models"
            ),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorSource::Client,
            "invalid_request_error",
            "method not allowed",
        )
    }

    pub fn upstream_connect(backend: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            "upstream_error",
            format!("could not connect to backend \"{backend}\""),
        )
        .code("upstream_unavailable")
        .retriable()
    }

    pub fn upstream_timeout(backend: &str, waited: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorSource::Upstream,
            "upstream_error",
            format!(
                "backend \"{backend}\" sent no response within {} ms",
                waited.as_millis()
            ),
        )
        .code("upstream_timeout")
        .retriable()
    }

    pub fn upstream_idle(backend: &str, waited: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorSource::Upstream,
            "upstream_error",
            format!(
                "backend \"{backend}\" stopped sending for {} ms in the middle of a response",
                waited.as_millis()
            ),
        )
        .code("upstream_timeout")
    }

    /// The upstream broke its protocol: a body that is not what it promised.
    pub fn upstream_protocol(backend: &str, what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            "upstream_error",
            format!("backend \"{backend}\" sent an invalid response: {what}"),
        )
        .code("upstream_invalid_response")
        .retriable()
    }

    /// An error object the upstream sent in place of a response or stream
    /// chunk, with a 200 status. vLLM puts the HTTP status it meant in
    /// `code`; without one, it counts as an upstream failure.
    pub fn upstream_in_band(backend: &str, body: &[u8]) -> Self {
        let meant = UpstreamErrorParts::parse(body)
            .status
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|status| status.is_client_error() || status.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::upstream_status(backend, meant, body, None)
    }

    /// A transport failure after the response started.
    pub fn upstream_broken(backend: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            "upstream_error",
            format!("the connection to backend \"{backend}\" failed in the middle of a response"),
        )
        .code("upstream_disconnected")
    }

    /// An error status from the upstream. 429 and 5xx may be retried on
    /// another deployment; 401/403 mean the gateway's own credential was
    /// refused, which is not the client's fault, so the client sees 502.
    /// 424 (TGI's and Bedrock's "the model failed") is the upstream's
    /// failure too: 502, and another deployment may serve.
    pub fn upstream_status(
        backend: &str,
        status: StatusCode,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> Self {
        let parts = UpstreamErrorParts::parse(body);
        let detail = parts.message.unwrap_or_else(|| status.to_string());
        let retriable = matches!(status.as_u16(), 404 | 424 | 429 | 500 | 502 | 503 | 504);
        let mut e = match status.as_u16() {
            401 | 403 => Self::new(
                StatusCode::BAD_GATEWAY,
                ErrorSource::Upstream,
                "upstream_error",
                format!(
                    "backend \"{backend}\" refused the gateway's credentials ({status}); \
                     the gateway operator must fix the backend's api_key_env"
                ),
            )
            .code("upstream_auth_failed"),
            // The deployment's upstream model id or base URL is wrong: the
            // operator's mistake, and another deployment may still serve.
            404 => Self::new(
                StatusCode::BAD_GATEWAY,
                ErrorSource::Upstream,
                "upstream_error",
                format!(
                    "backend \"{backend}\" answered 404 ({detail}); the gateway operator must check \
                     the deployment's upstream model id and the backend's base_url"
                ),
            )
            .code("upstream_not_found"),
            429 => Self::new(
                status,
                ErrorSource::Upstream,
                "rate_limit_error",
                format!("backend \"{backend}\" is rate limiting: {detail}"),
            )
            .code(RATE_LIMIT_EXCEEDED),
            400..=423 | 425..=499 => {
                let mut e = Self::new(
                    status,
                    ErrorSource::Client,
                    "invalid_request_error",
                    format!("backend \"{backend}\" rejected the request: {detail}"),
                );
                e.param = parts.param;
                e.code = parts.code;
                e
            }
            _ => Self::new(
                match status {
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => status,
                    _ => StatusCode::BAD_GATEWAY,
                },
                ErrorSource::Upstream,
                "upstream_error",
                format!("backend \"{backend}\" failed with {status}: {detail}"),
            )
            .code("upstream_error"),
        };
        e.retriable = retriable;
        e.retry_after = retry_after;
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorSource::Internal,
            "server_error",
            message,
        )
    }

    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match (self.source, self.status.as_u16()) {
            (ErrorSource::Client, 401) => "unauthorized",
            (ErrorSource::Client, 403) => "forbidden",
            (ErrorSource::Client, 404) => "not_found",
            (ErrorSource::Client, 413) => "too_large",
            (ErrorSource::Client, 451) => "policy_blocked",
            (ErrorSource::Client, 429) if self.is_rate_limit() => "rate_limited",
            (ErrorSource::Client, 429) => "budget_exhausted",
            (ErrorSource::Client, _) => "bad_request",
            (ErrorSource::Upstream, 429) => "upstream_rate_limited",
            (ErrorSource::Upstream, 504) => "upstream_timeout",
            (ErrorSource::Upstream, 503)
                if self.code.as_deref() == Some("no_deployment_available") =>
            {
                "no_deployment"
            }
            (ErrorSource::Upstream, _) => "upstream_error",
            (ErrorSource::Internal, _) => "internal",
        }
    }

    fn is_rate_limit(&self) -> bool {
        self.code.as_deref() == Some(RATE_LIMIT_EXCEEDED)
    }

    /// The OpenAI error body, also used as an SSE error event mid-stream.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        })
        .expect("error bodies serialise")
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: the SDKs read integer seconds.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if !self.retriable && self.source == ErrorSource::Client && !self.is_rate_limit() {
            // The official SDKs retry 408/409/429/5xx only; say so for
            // clarity. A key's rate limit refills, so its 429 is retried.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}
