//! The answer to the client: the upstream's whole body, or a stream
//! forwarded chunk by chunk, with the headers that say who served it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::attempt::{Ready, Served};
use super::stream::{SseBody, SseParams};
use crate::inbound::Reply;
use crate::metering::Ended;
use crate::openai::InboundRequest;
use crate::state::AppState;

pub const BACKEND_HEADER: HeaderName = HeaderName::from_static("x-tollgate-backend");
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-tollgate-attempts");
/// Says an answer came from a Llama model, with `licence.attribution_header`.
pub const BUILT_WITH_HEADER: HeaderName = HeaderName::from_static("x-built-with");
/// Tells nginx-style proxies in front not to buffer a stream.
const ACCEL_BUFFERING_HEADER: HeaderName = HeaderName::from_static("x-accel-buffering");
/// A stream's headers: its three, who served it (three), the config's
/// version, the request id, and CORS's four for a browser.
const STREAM_HEADERS: usize = 12;

/// The answer, translated into the client's API (`answer_as`) after the meter
/// has read it.
pub fn respond(
    app: &AppState,
    request: &InboundRequest,
    served: Served<'_>,
    answer_as: Reply,
    attribution: bool,
) -> Response {
    let Served {
        backend,
        deployment,
        attempts,
        mut meter,
        reply,
        running_usage,
    } = served;
    let mut response = match reply {
        Ready::Complete(body, observed) => {
            let now = Instant::now();
            meter.upstream_done(now);
            meter.observe(observed, now);
            match answer_as.complete(body, &backend.name) {
                Ok(body) => {
                    let body = Recording::new(Full::new(body), meter.ended(200));
                    json_response(StatusCode::OK, Body::new(body))
                }
                Err(error) => {
                    let shape = answer_as.error_shape();
                    meter.failed(error.label());
                    let ended = meter.ended(error.status_in(shape).as_u16());
                    error
                        .into_response_in(shape)
                        .map(|body| Body::new(Recording::new(body, ended)))
                }
            }
        }
        Ready::Stream(first, facts, upstream, reader) => {
            let body = SseBody::new(SseParams {
                first: (first, facts),
                reader,
                upstream,
                idle: backend.timeouts.idle,
                grace_over: app.grace_over(),
                backend: backend.name.clone(),
                endpoint: request.endpoint(),
                answers: request.answers(),
                include_usage: request.include_usage(),
                running_usage,
                asks_running_usage: running_usage && request.asks_running_usage(),
                encoder: answer_as.encoder(|| meter.usage_so_far().prompt_tokens),
                meter,
            });
            let mut response = Response::new(Body::from_stream(body));
            let headers = response.headers_mut();
            // More than the six a map starts with room for: made whole at
            // once rather than grown and rehashed on the way out.
            *headers = HeaderMap::with_capacity(STREAM_HEADERS);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(ACCEL_BUFFERING_HEADER, HeaderValue::from_static("no"));
            response
        }
    };
    set_served_by(&mut response, Some(&backend.name), attempts);
    if attribution && deployment.is_llama() {
        response
            .headers_mut()
            .insert(BUILT_WITH_HEADER, HeaderValue::from_static("Llama"));
    }
    response
}

/// A whole answer's body, which records its request as the server lets it
/// go, its last bytes written.
struct Recording<B> {
    body: B,
    _ended: Ended,
}

impl<B> Recording<B> {
    fn new(body: B, ended: Ended) -> Self {
        Self {
            body,
            _ended: ended,
        }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Recording<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A JSON body with its content type.
pub fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `x-tollgate-backend` and `x-tollgate-attempts`.
pub fn set_served_by(response: &mut Response, backend: Option<&str>, attempts: usize) {
    let headers = response.headers_mut();
    if let Some(value) = backend.and_then(|b| HeaderValue::from_str(b).ok()) {
        headers.insert(BACKEND_HEADER, value);
    }
    let attempts = ATTEMPTS
        .get(attempts)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(attempts));
    headers.insert(ATTEMPTS_HEADER, attempts);
}

/// The usual counts of attempts as header values, which need no
/// allocation: a count written as a number takes one.
const ATTEMPTS: [HeaderValue; 5] = [
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
    HeaderValue::from_static("4"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_written_as_numbers_within_the_table_and_past_it() {
        for attempts in [0, 1, 4, 5, 12] {
            let mut response = Response::new(Body::empty());
            set_served_by(&mut response, Some("b"), attempts);
            let headers = response.headers();
            assert_eq!(headers[ATTEMPTS_HEADER], attempts.to_string().as_str());
            assert_eq!(headers[BACKEND_HEADER], "b");
        }
    }
}
