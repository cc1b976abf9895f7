//! The one error type. Its kind (`kind.rs`) says who is at fault and
//! decides the status, the OpenAI `type` and `code`, and whether another
//! deployment may be tried; `into_response` turns it into the OpenAI error
//! body (`wire.rs`) in one place. Its fields are set once, by the
//! constructor that names the case.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::limits::{Limit, Refused};
use crate::logging::{MAX_CLIENT_CHARS, MAX_MESSAGE_CHARS, bounded};

mod headers;
mod kind;
mod wire;

pub use headers::{LIMIT_HEADERS, RETRY_AFTER_MS};
pub use kind::ErrorKind;
pub use wire::UpstreamErrorParts;
use wire::{AnthropicErrorBody, AnthropicErrorObject, ErrorBody, ErrorObject};

/// The error body a client reads: the inbound API it speaks decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// Chat, completions, models and Responses.
    OpenAi,
    /// Messages.
    Anthropic,
}

/// An error and its causes, `outer: inner: …`, for an operator's log: a
/// library's error often says only what failed (`client error
/// (Connect)`), and its source why (`invalid peer certificate`).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A client's string as a message echoes it: control characters escaped,
/// cut at [`MAX_CLIENT_CHARS`].
pub fn echo(text: &str) -> String {
    bounded(text.to_owned(), MAX_CLIENT_CHARS)
}

#[derive(Debug, Clone)]
pub struct GatewayError {
    kind: ErrorKind,
    message: String,
    param: Option<String>,
    /// The code an upstream's own rejection carried, passed on.
    upstream_code: Option<String>,
    retry: Option<Retry>,
}

/// When a refused client may come back.
#[derive(Debug, Clone)]
enum Retry {
    After(Duration),
    /// When the key's rate limit that refused it admits it; the limit
    /// goes in the answer's headers too. Boxed, so that the error every
    /// `Result` on the request path may carry stays small.
    Limit(Box<Refused>),
}

impl GatewayError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: bounded(message.into(), MAX_MESSAGE_CHARS),
            param: None,
            upstream_code: None,
            retry: None,
        }
    }

    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry = after.map(Retry::After);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn param_name(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The error as a client that calls the parameter `to` reads it: its
    /// `param`, and the message where it names `from` in backticks.
    pub fn rename_param(&mut self, from: &str, to: &str) {
        if self.param.as_deref() != Some(from) {
            return;
        }
        self.param = Some(to.to_owned());
        self.message = self
            .message
            .replace(&format!("`{from}`"), &format!("`{to}`"));
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> Option<&str> {
        self.kind.code().or(self.upstream_code.as_deref())
    }

    /// Another deployment may be tried (only before the client got a byte).
    pub fn retriable(&self) -> bool {
        self.kind.retriable()
    }

    /// Tells the client to wait `wait`, unless the error already says how
    /// long.
    pub fn or_wait(&mut self, wait: Duration) {
        self.retry.get_or_insert(Retry::After(wait));
    }

    /// How long the client should wait before trying again, when known.
    pub fn wait(&self) -> Option<Duration> {
        match &self.retry {
            Some(Retry::After(after)) => Some(*after),
            Some(Retry::Limit(refused)) => refused.wait,
            None => None,
        }
    }

    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        self.kind.label()
    }

    pub fn bad_request(message: impl Into<String>, param: Option<String>) -> Self {
        let mut e = Self::new(ErrorKind::BadRequest, message);
        e.param = param.map(|p| bounded(p, MAX_CLIENT_CHARS));
        e
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "request body is larger than this gateway's limit of {limit} bytes; send a smaller request"
            ),
        )
    }

    /// A body sent compressed: `coding` is its `Content-Encoding`, as the
    /// client wrote it.
    pub fn unsupported_encoding(coding: &str) -> Self {
        Self::new(
            ErrorKind::UnsupportedEncoding,
            format!(
                "the request body is compressed (Content-Encoding: {}), which this gateway does not decode; send it uncompressed",
                echo(coding)
            ),
        )
    }

    /// A body sent with a transfer coding other than `chunked`
    /// (`codings`, the `Transfer-Encoding` header as sent), which the
    /// gateway does not decode either.
    pub fn unsupported_transfer_coding(codings: &str) -> Self {
        Self::new(
            ErrorKind::UnsupportedEncoding,
            format!(
                "the request body is sent with Transfer-Encoding: {}, and this gateway decodes no transfer coding but chunked; send it uncompressed, with Content-Length or only `Transfer-Encoding: chunked`",
                echo(codings)
            ),
        )
    }

    /// A request that is not HTTP/1.1 as RFC 9112 frames it, refused
    /// before any route ran; `problem` says which rule it broke and what
    /// to send instead.
    pub fn malformed_http(problem: &str) -> Self {
        Self::new(
            ErrorKind::MalformedHttp,
            format!("the request is not valid HTTP/1.1: {problem}"),
        )
    }

    /// A request head (request line and headers) over `limit_bytes`.
    pub fn head_too_large(limit_bytes: usize) -> Self {
        Self::new(
            ErrorKind::HeadTooLarge,
            format!(
                "the request's head (request line and headers) is larger than {} KiB; send fewer \
                 or shorter headers",
                limit_bytes / 1024
            ),
        )
    }

    /// A request with more than `max_headers` headers.
    pub fn too_many_headers(max_headers: usize) -> Self {
        Self::new(
            ErrorKind::HeadTooLarge,
            format!("the request has more than {max_headers} headers; send fewer"),
        )
    }

    pub fn body_timeout(waited: Duration) -> Self {
        Self::new(
            ErrorKind::BodyTimeout,
            format!(
                "the request body did not arrive within {} ms; send it at once",
                waited.as_millis()
            ),
        )
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }

    pub fn model_not_allowed(alias: &str, key: &str) -> Self {
        Self::new(
            ErrorKind::ModelNotAllowed,
            format!(
                "key \"{key}\" may not use model \"{}\"; GET /v1/models lists the models it may use",
                echo(alias)
            ),
        )
    }

    pub fn unknown_model(alias: &str, known: &[&str]) -> Self {
        Self::new(
            ErrorKind::UnknownModel,
            format!(
                "the model \"{}\" does not exist; available models: {}",
                echo(alias),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        )
        .param("model")
    }

    /// Policy leaves no deployment for the request (region, licence,
    /// modality, context window, tools).
    pub fn policy_blocked(message: String) -> Self {
        Self::new(ErrorKind::PolicyBlocked, message)
    }

    /// Every deployment the policy allows is unhealthy or cooling down;
    /// `why` says so of each.
    pub fn no_deployment_available(alias: &str, why: &str, retry_after: Duration) -> Self {
        Self::retry_later(
            ErrorKind::NoDeployment,
            format_args!("no deployment of model \"{alias}\" is available right now ({why})"),
            retry_after,
        )
    }

    /// Every deployment of `alias` policy allows is rate limited: cooling
    /// down after an upstream's 429, or at its quota.
    pub fn deployments_rate_limited(alias: &str, why: &str, retry_after: Duration) -> Self {
        Self::retry_later(
            ErrorKind::UpstreamRateLimited,
            format_args!("every deployment of model \"{alias}\" is rate limited right now ({why})"),
            retry_after,
        )
    }

    /// Redis, which holds the fleet's budgets and limits, did not answer in
    /// time and `[state] on_unavailable = "refuse"`.
    pub fn state_unavailable(retry_after: Duration) -> Self {
        Self::retry_later(
            ErrorKind::StateUnavailable,
            "the gateway cannot reach the shared state that enforces budgets and rate limits across its replicas, and is set to refuse requests until it can",
            retry_after,
        )
    }

    /// Redis did not answer, and this replica has not learned since it
    /// started (nor kept from before) what the fleet spent of `key`'s
    /// budget: it has no share to spend on its own.
    pub fn fleet_spend_unknown(key: &str, retry_after: Duration) -> Self {
        Self::retry_later(
            ErrorKind::StateUnavailable,
            format_args!(
                "key \"{key}\" has a budget that the gateway's replicas share, and this replica cannot reach the shared state (Redis) and has not learned what the fleet spent of it, so it cannot tell what is left; requests with a budget are refused until the shared state answers"
            ),
            retry_after,
        )
    }

    /// `message`, then when to retry, which `retry-after` says too.
    fn retry_later(
        kind: ErrorKind,
        message: impl std::fmt::Display,
        retry_after: Duration,
    ) -> Self {
        Self::new(
            kind,
            format!(
                "{message}; retry after {} s",
                retry_after.as_secs_f64().ceil()
            ),
        )
        .retry_after(Some(retry_after))
    }

    /// The gateway's shutdown grace period ran out before the stream
    /// ended.
    pub fn shutting_down() -> Self {
        Self::new(
            ErrorKind::ShuttingDown,
            "the gateway is shutting down and its grace period for streams in flight ran out; send the request again",
        )
    }

    pub fn region_not_allowed(key: &str, chosen: &str, own: Option<&str>) -> Self {
        Self::new(
            ErrorKind::RegionNotAllowed,
            match own {
                Some(own) => format!(
                    "key \"{key}\" serves region \"{own}\" and may not choose region \"{chosen}\" with x-tollgate-region; remove the header"
                ),
                None => format!(
                    "key \"{key}\" may not choose its region with x-tollgate-region (\"{chosen}\"); remove the header, or ask the operator for region_header = true"
                ),
            },
        )
    }

    /// The prompt (`prompt` tokens, estimated) and the output asked for
    /// fit no deployment of the model: OpenAI's 400, which the SDKs raise
    /// as `BadRequestError` with this code. `param` is what to shorten.
    pub fn context_length_exceeded(
        window: u32,
        prompt: u64,
        output: Option<u64>,
        param: &str,
    ) -> Self {
        let asked = match output {
            Some(output) => format!(
                "you requested about {} tokens ({prompt} in the {param}, {output} in the completion)",
                prompt + output
            ),
            None => format!("your {param} come to about {prompt} tokens"),
        };
        Self::new(
            ErrorKind::ContextLengthExceeded,
            format!(
                "This model's maximum context length is {window} tokens. However, {asked}. \
                 Please reduce the length of the {param}{}.",
                if output.is_some() {
                    " or completion"
                } else {
                    ""
                }
            ),
        )
        .param(param)
    }

    /// A key's budget cannot cover the request.
    pub fn budget_exhausted(message: String) -> Self {
        Self::new(ErrorKind::BudgetExhausted, message)
    }

    /// A key's budget could cover the request but for what its requests
    /// in flight reserve: 429 with `retry-after`, which the SDKs honour.
    pub fn budget_held(message: String, retry_after: Duration) -> Self {
        Self::new(ErrorKind::BudgetHeld, message).retry_after(Some(retry_after))
    }

    /// A key is over its `rpm` or `tpm`: 429 with `retry-after` from the
    /// limiter, which the SDKs honour and retry, as they should — the
    /// limit refills — and the limit's own headers. A prompt of about
    /// `tokens` that is more than the whole `tpm` never fits: 400.
    pub fn key_rate_limited(key: &str, refused: &Refused, tokens: u64) -> Self {
        let Refused {
            limit, per_minute, ..
        } = *refused;
        let Some(wait) = refused.wait else {
            return Self::new(
                ErrorKind::PromptOverTpm,
                format!(
                    "the request's prompt is about {tokens} tokens, more than key \"{key}\" may use in a minute \
                     (tpm = {per_minute}); send a shorter prompt, or ask the operator to raise the key's tpm"
                ),
            );
        };
        let need = match limit {
            Limit::Requests => String::new(),
            Limit::Tokens => format!(" (this request needs about {tokens})"),
        };
        let mut e = Self::new(
            ErrorKind::RateLimited,
            format!(
                "key \"{key}\" is over its rate limit of {per_minute} {} per minute ({}){need}; retry after {} s",
                limit.unit(),
                limit.name(),
                wait.as_secs_f64().ceil()
            ),
        );
        e.retry = Some(Retry::Limit(Box::new(*refused)));
        e
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            ErrorKind::UnknownRoute,
            format!(
                "no route for {}; this gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/messages, /v1/responses and /v1/models",
                echo(path)
            ),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(ErrorKind::MethodNotAllowed, "method not allowed")
    }

    /// A backend that cannot serve this endpoint; another deployment of
    /// the alias may.
    pub fn endpoint_unsupported(message: String) -> Self {
        Self::new(ErrorKind::EndpointUnsupported, message)
    }

    /// A parameter this backend's protocol cannot honour: a 400 naming it
    /// when no other deployment of the alias can serve the request.
    pub fn parameter_unsupported(message: String, param: &str) -> Self {
        Self::new(ErrorKind::EndpointUnsupported, message).param(param)
    }

    pub fn upstream_connect(backend: &str) -> Self {
        Self::new(
            ErrorKind::UpstreamConnect,
            format!("could not connect to backend \"{backend}\""),
        )
    }

    /// The connection was made, but the request failed before a response.
    pub fn upstream_request_failed(backend: &str) -> Self {
        Self::new(
            ErrorKind::UpstreamConnect,
            format!("request to backend \"{backend}\" failed before a response"),
        )
    }

    pub fn upstream_timeout(backend: &str, waited: Duration) -> Self {
        Self::new(
            ErrorKind::UpstreamTimeout,
            format!(
                "backend \"{backend}\" sent no response within {} ms",
                waited.as_millis()
            ),
        )
    }

    pub fn upstream_idle(backend: &str, waited: Duration) -> Self {
        Self::new(
            ErrorKind::UpstreamIdle,
            format!(
                "backend \"{backend}\" stopped sending for {} ms in the middle of a response",
                waited.as_millis()
            ),
        )
    }

    /// The upstream broke its protocol: a body that is not what it promised.
    pub fn upstream_protocol(backend: &str, what: impl std::fmt::Display) -> Self {
        // A parser's message can quote what it read.
        Self::new(
            ErrorKind::UpstreamProtocol,
            crate::redact::redacted(format!(
                "backend \"{backend}\" sent an invalid response: {what}"
            )),
        )
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
            ErrorKind::UpstreamBroken,
            format!("the connection to backend \"{backend}\" failed in the middle of a response"),
        )
    }

    /// The upstream sent, or announced, more than the backend's `setting`
    /// allows (`limit` bytes); `what` says what, with its verb: "sent a
    /// response body".
    pub fn upstream_too_large(
        backend: &str,
        what: impl std::fmt::Display,
        setting: &str,
        limit: u64,
    ) -> Self {
        Self::new(
            ErrorKind::UpstreamTooLarge,
            format!("backend \"{backend}\" {what} larger than {setting} ({limit} bytes)"),
        )
    }

    /// The upstream refused the gateway's own credentials; `message` says
    /// what the operator must fix.
    pub fn upstream_auth(message: String) -> Self {
        Self::new(ErrorKind::UpstreamAuth, message)
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
        let e = match status.as_u16() {
            401 | 403 => Self::upstream_auth(format!(
                "backend \"{backend}\" refused the gateway's credentials ({status}); \
                 the gateway operator must fix the backend's api_key_env"
            )),
            // The deployment's upstream model id or base URL is wrong: the
            // operator's mistake, and another deployment may still serve.
            404 => Self::new(
                ErrorKind::UpstreamNotFound,
                format!(
                    "backend \"{backend}\" answered 404 ({detail}); the gateway operator must check \
                     the deployment's upstream model id and the backend's base_url"
                ),
            ),
            429 => Self::new(
                ErrorKind::UpstreamRateLimited,
                format!("backend \"{backend}\" is rate limiting: {detail}"),
            ),
            400..=423 | 425..=499 => {
                let mut e = Self::new(
                    ErrorKind::UpstreamRejected(status),
                    format!("backend \"{backend}\" rejected the request: {detail}"),
                );
                e.param = parts.param;
                e.upstream_code = parts.code;
                e
            }
            _ => Self::new(
                ErrorKind::UpstreamFailed(status),
                format!("backend \"{backend}\" failed with {status}: {detail}"),
            ),
        };
        e.retry_after(retry_after)
    }

    /// `/admin/spend` cannot ask the fleet's ledger database; the
    /// replicas keep spend in their spools meanwhile.
    pub fn ledger_unavailable(retry_after: Duration) -> Self {
        Self::new(
            ErrorKind::LedgerUnavailable,
            format!(
                "the spend ledger's PostgreSQL cannot be reached, so the fleet's spend cannot be \
                 read; each replica keeps its spend in its spool and ships it when the database \
                 answers; retry after {} s",
                retry_after.as_secs()
            ),
        )
        .retry_after(Some(retry_after))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The OpenAI error body, also used as an SSE error event mid-stream.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind.openai_type(),
                param: self.param.as_deref(),
                code: self.code(),
            },
        })
        .expect("error bodies serialise")
    }

    /// The status a client of `shape` sees.
    pub fn status_in(&self, shape: ErrorShape) -> StatusCode {
        match shape {
            ErrorShape::OpenAi => self.status(),
            ErrorShape::Anthropic => self.kind.anthropic().1,
        }
    }

    /// The error body in `shape`, also used as an SSE error event.
    pub fn body_json_in(&self, shape: ErrorShape) -> Vec<u8> {
        match shape {
            ErrorShape::OpenAi => self.body_json(),
            ErrorShape::Anthropic => serde_json::to_vec(&AnthropicErrorBody {
                kind: "error",
                error: AnthropicErrorObject {
                    kind: self.kind.anthropic().0,
                    message: &self.message,
                },
            })
            .expect("error bodies serialise"),
        }
    }

    /// The error answer in `shape`: `retry-after` and `x-should-retry` as
    /// for OpenAI clients (the Anthropic SDKs read them too), and a key's
    /// rate limit in the headers of `shape`'s API.
    pub fn into_response_in(self, shape: ErrorShape) -> Response {
        let (status, body) = (self.status_in(shape), self.body_json_in(shape));
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.wait() {
            headers::retry(headers, after);
        }
        if let Some(Retry::Limit(refused)) = &self.retry {
            headers::limit(headers, refused, shape);
        }
        if self.kind.client_should_not_retry() {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_in(ErrorShape::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_client_sent_is_echoed_escaped_and_bounded() {
        let forged = GatewayError::unknown_model("m\n2026-12-04T00:00:00Z  INFO forged", &["a"]);
        assert!(!forged.message().contains('\n'), "{}", forged.message());
        assert!(
            forged.message().contains("m\\n2026"),
            "{}",
            forged.message()
        );
        let huge = "x".repeat(3 << 20);
        let error = GatewayError::unknown_model(&huge, &["a"]);
        assert!(
            error.message().chars().count() < 400,
            "{}",
            error.message().len()
        );
        let error =
            GatewayError::bad_request(format!("invalid type: string \"{huge}\""), Some(huge));
        assert!(error.message().chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(error.param_name().unwrap().chars().count() <= MAX_CLIENT_CHARS + 1);
        let plain = GatewayError::unknown_model("llama-3.3-70b", &["a", "b"]);
        assert_eq!(
            plain.message(),
            "the model \"llama-3.3-70b\" does not exist; available models: a, b"
        );
    }

    #[test]
    fn a_keys_refusal_carries_its_limit_in_the_headers_its_api_defines() {
        let refused = Refused {
            limit: Limit::Tokens,
            per_minute: 1000,
            wait: Some(Duration::from_millis(5_500)),
            full_in: Duration::from_millis(42_250),
        };
        let error = GatewayError::key_rate_limited("k", &refused, 400);
        let header = |response: &Response, name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let openai = error.clone().into_response();
        for (name, value) in [
            ("retry-after", "6"),
            ("retry-after-ms", "5500"),
            ("x-ratelimit-limit-tokens", "1000"),
            // (60 - 42.25) s of a minute's 1000.
            ("x-ratelimit-remaining-tokens", "295"),
            ("x-ratelimit-reset-tokens", "42.25s"),
        ] {
            assert_eq!(header(&openai, name).as_deref(), Some(value), "{name}");
        }
        let named = |response: &Response, prefix: &str| {
            response
                .headers()
                .keys()
                .filter(|name| name.as_str().starts_with(prefix))
                .count()
        };
        assert_eq!(named(&openai, "x-ratelimit-"), 3, "the tokens' only");
        assert_eq!(named(&openai, "anthropic-"), 0);

        let before = time::OffsetDateTime::now_utc();
        let anthropic = error.into_response_in(ErrorShape::Anthropic);
        assert_eq!(header(&anthropic, "retry-after").as_deref(), Some("6"));
        assert_eq!(
            header(&anthropic, "anthropic-ratelimit-tokens-limit").as_deref(),
            Some("1000")
        );
        assert_eq!(
            header(&anthropic, "anthropic-ratelimit-tokens-remaining").as_deref(),
            Some("295")
        );
        let reset = header(&anthropic, "anthropic-ratelimit-tokens-reset").unwrap();
        let at =
            time::OffsetDateTime::parse(&reset, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let full_in = (at - before).as_seconds_f64();
        assert!((42.25..=43.5).contains(&full_in), "{reset}: {full_in}");
        assert!(reset.ends_with('Z') && !reset.contains('.'), "{reset}");
        assert_eq!(named(&anthropic, "anthropic-ratelimit-"), 3);
        assert_eq!(named(&anthropic, "x-ratelimit-"), 0);
    }

    #[test]
    fn messages_clients_get_anthropics_error_types_and_529_when_overloaded() {
        let cases = [
            (
                GatewayError::bad_request("x", None),
                400,
                "invalid_request_error",
            ),
            (GatewayError::unauthorized("x"), 401, "authentication_error"),
            (
                GatewayError::model_not_allowed("m", "k"),
                403,
                "permission_error",
            ),
            (
                GatewayError::policy_blocked("x".into()),
                451,
                "permission_error",
            ),
            (
                GatewayError::unknown_model("m", &[]),
                404,
                "not_found_error",
            ),
            (GatewayError::payload_too_large(1), 413, "request_too_large"),
            (
                GatewayError::budget_exhausted("x".into()),
                429,
                "rate_limit_error",
            ),
            (GatewayError::internal("x"), 500, "api_error"),
            (GatewayError::upstream_broken("b"), 502, "api_error"),
            (
                GatewayError::upstream_timeout("b", Duration::from_secs(1)),
                504,
                "timeout_error",
            ),
            (
                GatewayError::no_deployment_available("m", "x", Duration::from_secs(1)),
                529,
                "overloaded_error",
            ),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status_in(ErrorShape::Anthropic), status, "{kind}");
            let body: serde_json::Value =
                serde_json::from_slice(&error.body_json_in(ErrorShape::Anthropic)).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"type": "error", "error": {"type": kind, "message": error.message()}})
            );
            let response = error.into_response_in(ErrorShape::Anthropic);
            assert_eq!(response.status(), status);
        }
    }
}
