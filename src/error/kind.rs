//! The closed set of errors the gateway answers. Everything a client or a
//! metric sees of an error — its status, OpenAI `type` and `code`, whether
//! another deployment may be tried, whether the SDKs should retry, and
//! its metrics label — follows from its kind, here, once.

use axum::http::StatusCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible.
    BadRequest,
    /// The prompt alone is more than the key's whole `tpm`.
    PromptOverTpm,
    PayloadTooLarge,
    /// The body is compressed (`Content-Encoding`), or sent with a
    /// transfer coding other than `chunked`, which the gateway does not
    /// decode.
    UnsupportedEncoding,
    /// The request is not valid HTTP/1.1 (framing, header bytes, request
    /// line); hyper refuses it before any route runs.
    MalformedHttp,
    /// The request head is over its size or header-count limit.
    HeadTooLarge,
    /// The client did not send its whole body within the deadline.
    BodyTimeout,
    Unauthorized,
    ModelNotAllowed,
    RegionNotAllowed,
    UnknownModel,
    UnknownRoute,
    MethodNotAllowed,
    /// Policy leaves no deployment (region, licence, modality, context).
    PolicyBlocked,
    /// The prompt and the output asked for fit no deployment's context
    /// window.
    ContextLengthExceeded,
    BudgetExhausted,
    /// What is left of the key's budget is reserved by its requests in
    /// flight; it frees as they end.
    BudgetHeld,
    /// The key is over its `rpm` or `tpm`; it refills.
    RateLimited,
    /// This backend cannot serve the request as asked (its endpoint, or a
    /// parameter its protocol cannot honour); another deployment may.
    EndpointUnsupported,
    /// Every deployment policy allows is unhealthy, cooling or at quota.
    NoDeployment,
    /// The shared state (Redis) does not answer, and the config says to
    /// refuse rather than serve on this replica's own state.
    StateUnavailable,
    UpstreamConnect,
    /// No first byte within the backend's first-byte timeout.
    UpstreamTimeout,
    /// The upstream went silent in the middle of a response.
    UpstreamIdle,
    /// The upstream sent something that is not what it promised.
    UpstreamProtocol,
    /// The connection failed in the middle of a response.
    UpstreamBroken,
    /// The upstream sent more than its backend's `max_response_bytes`, or
    /// one event over its `max_event_bytes`.
    UpstreamTooLarge,
    /// The upstream refused the gateway's own credentials.
    UpstreamAuth,
    /// The upstream does not know the deployment's model id or path.
    UpstreamNotFound,
    UpstreamRateLimited,
    /// The upstream rejected the request itself with this 4xx.
    UpstreamRejected(StatusCode),
    /// The upstream failed with this status (5xx, or TGI's and Bedrock's
    /// 424 "the model failed").
    UpstreamFailed(StatusCode),
    /// The fleet's ledger database cannot be reached (`/admin/spend`).
    LedgerUnavailable,
    /// The gateway's shutdown grace period ran out while the response was
    /// still streaming.
    ShuttingDown,
    Internal,
}

use ErrorKind::*;

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            BadRequest
            | PromptOverTpm
            | EndpointUnsupported
            | MalformedHttp
            | ContextLengthExceeded => StatusCode::BAD_REQUEST,
            HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Unauthorized => StatusCode::UNAUTHORIZED,
            ModelNotAllowed | RegionNotAllowed => StatusCode::FORBIDDEN,
            UnknownModel | UnknownRoute => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            PolicyBlocked => StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            BudgetExhausted | BudgetHeld | RateLimited | UpstreamRateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            NoDeployment | StateUnavailable | LedgerUnavailable | ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamTimeout | UpstreamIdle => StatusCode::GATEWAY_TIMEOUT,
            // The operator's problems, not the client's: the client is not
            // told its request was wrong.
            UpstreamConnect | UpstreamProtocol | UpstreamBroken | UpstreamTooLarge
            | UpstreamAuth | UpstreamNotFound => StatusCode::BAD_GATEWAY,
            UpstreamRejected(status) => status,
            UpstreamFailed(status) => match status {
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => status,
                _ => StatusCode::BAD_GATEWAY,
            },
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            BudgetExhausted => "insufficient_quota",
            BudgetHeld | RateLimited | UpstreamRateLimited => "rate_limit_error",
            NoDeployment | StateUnavailable | LedgerUnavailable | ShuttingDown | Internal => {
                "server_error"
            }
            UpstreamConnect | UpstreamTimeout | UpstreamIdle | UpstreamProtocol
            | UpstreamBroken | UpstreamTooLarge | UpstreamAuth | UpstreamNotFound
            | UpstreamFailed(_) => "upstream_error",
            _ => "invalid_request_error",
        }
    }

    /// Anthropic's error `type` and the status a Messages client sees:
    /// the gateway's own status, but 529 `overloaded_error` when no
    /// deployment is healthy, as Anthropic answers when it is overloaded.
    pub fn anthropic(self) -> (&'static str, StatusCode) {
        let status = self.status();
        let kind = match (self, status.as_u16()) {
            (NoDeployment, _) => {
                return (
                    "overloaded_error",
                    StatusCode::from_u16(529).expect("529 is a status"),
                );
            }
            (_, 401) => "authentication_error",
            (_, 403 | 451) => "permission_error",
            (_, 404) => "not_found_error",
            (_, 413 | 431) => "request_too_large",
            (_, 429) => "rate_limit_error",
            (_, 504) => "timeout_error",
            (_, 500..) => "api_error",
            _ => "invalid_request_error",
        };
        (kind, status)
    }

    /// OpenAI's `code`; an upstream's rejection carries the upstream's own.
    pub fn code(self) -> Option<&'static str> {
        Some(match self {
            PromptOverTpm | PayloadTooLarge => "request_too_large",
            MalformedHttp => "malformed_http",
            UnsupportedEncoding => "unsupported_content_encoding",
            HeadTooLarge => "headers_too_large",
            BodyTimeout => "request_timeout",
            Unauthorized => "invalid_api_key",
            ModelNotAllowed => "model_not_allowed",
            RegionNotAllowed => "region_not_allowed",
            UnknownModel => "model_not_found",
            PolicyBlocked => "policy_blocked",
            ContextLengthExceeded => "context_length_exceeded",
            BudgetExhausted => "insufficient_quota",
            BudgetHeld => "budget_held",
            RateLimited | UpstreamRateLimited => "rate_limit_exceeded",
            NoDeployment => "no_deployment_available",
            StateUnavailable => "state_unavailable",
            LedgerUnavailable => "ledger_unavailable",
            ShuttingDown => "shutting_down",
            UpstreamConnect => "upstream_unavailable",
            UpstreamTimeout | UpstreamIdle => "upstream_timeout",
            UpstreamProtocol => "upstream_invalid_response",
            UpstreamBroken => "upstream_disconnected",
            UpstreamTooLarge => "upstream_response_too_large",
            UpstreamAuth => "upstream_auth_failed",
            UpstreamNotFound => "upstream_not_found",
            UpstreamFailed(_) => "upstream_error",
            BadRequest | UnknownRoute | MethodNotAllowed | EndpointUnsupported
            | UpstreamRejected(_) | Internal => return None,
        })
    }

    /// Another deployment may be tried (only before the client got a
    /// byte): the upstream, not the request, was the trouble. A connection
    /// that broke mid-body is one: the client has seen nothing of it.
    pub fn retriable(self) -> bool {
        match self {
            UpstreamConnect | UpstreamTimeout | UpstreamProtocol | UpstreamBroken
            | UpstreamTooLarge | UpstreamNotFound | UpstreamRateLimited | EndpointUnsupported => {
                true
            }
            UpstreamFailed(status) => matches!(status.as_u16(), 424 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// Sending the request again cannot help: the answer says
    /// `x-should-retry: false`. Either the request itself is at fault (the
    /// official SDKs retry 408/409/429/5xx only; a key's rate limit
    /// refills and a body sent too slowly may arrive in time next time, so
    /// those are retried), or an upstream refused the gateway's own
    /// credential, which only the operator can fix.
    pub fn client_should_not_retry(self) -> bool {
        let client_at_fault = !self.retriable()
            && self.client_at_fault()
            && !matches!(self, RateLimited | BudgetHeld | BodyTimeout);
        client_at_fault || self == UpstreamAuth
    }

    fn client_at_fault(self) -> bool {
        !self.upstream_at_fault()
            && !matches!(
                self,
                UpstreamRateLimited
                    | NoDeployment
                    | StateUnavailable
                    | LedgerUnavailable
                    | ShuttingDown
                    | Internal
            )
    }

    /// The upstream failed: its deployment's circuit counts it.
    pub fn upstream_at_fault(self) -> bool {
        matches!(
            self,
            UpstreamConnect
                | UpstreamTimeout
                | UpstreamIdle
                | UpstreamProtocol
                | UpstreamBroken
                | UpstreamTooLarge
                | UpstreamAuth
                | UpstreamNotFound
                | UpstreamFailed(_)
        )
    }

    /// A bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Unauthorized => "unauthorized",
            ModelNotAllowed | RegionNotAllowed => "forbidden",
            UnknownModel | UnknownRoute => "not_found",
            PayloadTooLarge | HeadTooLarge => "too_large",
            PolicyBlocked => "policy_blocked",
            ContextLengthExceeded => "context_length_exceeded",
            RateLimited => "rate_limited",
            BudgetExhausted => "budget_exhausted",
            BudgetHeld => "budget_held",
            UpstreamRejected(status) => match status.as_u16() {
                413 => "too_large",
                451 => "policy_blocked",
                _ => "bad_request",
            },
            BadRequest | PromptOverTpm | MethodNotAllowed | EndpointUnsupported | BodyTimeout
            | MalformedHttp | UnsupportedEncoding => "bad_request",
            UpstreamRateLimited => "upstream_rate_limited",
            UpstreamTooLarge => "upstream_too_large",
            UpstreamTimeout | UpstreamIdle => "upstream_timeout",
            UpstreamFailed(StatusCode::GATEWAY_TIMEOUT) => "upstream_timeout",
            NoDeployment => "no_deployment",
            StateUnavailable => "state_unavailable",
            LedgerUnavailable => "ledger_unavailable",
            ShuttingDown => "shutting_down",
            UpstreamConnect | UpstreamProtocol | UpstreamBroken | UpstreamAuth
            | UpstreamNotFound | UpstreamFailed(_) => "upstream_error",
            Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[ErrorKind] = &[
        BadRequest,
        PromptOverTpm,
        PayloadTooLarge,
        UnsupportedEncoding,
        MalformedHttp,
        HeadTooLarge,
        BodyTimeout,
        Unauthorized,
        ModelNotAllowed,
        RegionNotAllowed,
        UnknownModel,
        UnknownRoute,
        MethodNotAllowed,
        PolicyBlocked,
        ContextLengthExceeded,
        BudgetExhausted,
        BudgetHeld,
        RateLimited,
        EndpointUnsupported,
        NoDeployment,
        UpstreamConnect,
        UpstreamTimeout,
        UpstreamIdle,
        UpstreamProtocol,
        UpstreamBroken,
        UpstreamTooLarge,
        UpstreamAuth,
        UpstreamNotFound,
        UpstreamRateLimited,
        UpstreamRejected(StatusCode::UNPROCESSABLE_ENTITY),
        UpstreamFailed(StatusCode::INTERNAL_SERVER_ERROR),
        UpstreamFailed(StatusCode::NOT_IMPLEMENTED),
        UpstreamFailed(StatusCode::GATEWAY_TIMEOUT),
        LedgerUnavailable,
        ShuttingDown,
        Internal,
    ];

    #[test]
    fn what_a_client_sees_agrees_with_who_is_at_fault() {
        for &kind in ALL {
            let status = kind.status();
            if kind.upstream_at_fault() {
                assert!(
                    status.is_server_error(),
                    "{kind:?}: an upstream fault is 5xx"
                );
            }
            if kind.client_should_not_retry() {
                assert!(
                    status.is_client_error() || kind == UpstreamAuth,
                    "{kind:?}: only a 4xx, or a credential the operator must fix, is final"
                );
                assert!(!kind.retriable(), "{kind:?}");
            }
            if status == StatusCode::TOO_MANY_REQUESTS && kind != BudgetExhausted {
                assert!(
                    !kind.client_should_not_retry(),
                    "{kind:?}: a rate limit refills"
                );
                assert_eq!(kind.openai_type(), "rate_limit_error", "{kind:?}");
            }
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_upstream_status_keeps_only_what_the_sdks_handle() {
        assert_eq!(UpstreamFailed(StatusCode::NOT_IMPLEMENTED).status(), 502);
        assert!(!UpstreamFailed(StatusCode::NOT_IMPLEMENTED).retriable());
        assert_eq!(UpstreamFailed(StatusCode::GATEWAY_TIMEOUT).status(), 504);
        assert_eq!(
            UpstreamFailed(StatusCode::GATEWAY_TIMEOUT).label(),
            "upstream_timeout"
        );
        assert!(UpstreamFailed(StatusCode::FAILED_DEPENDENCY).retriable());
        assert_eq!(
            UpstreamRejected(StatusCode::UNPROCESSABLE_ENTITY).status(),
            422
        );
        assert!(UpstreamRejected(StatusCode::UNPROCESSABLE_ENTITY).client_should_not_retry());
    }
}
