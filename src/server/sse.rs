//! The body of a streamed response. It forwards each upstream chunk the
//! moment it arrives, meters it in passing, removes the usage-only chunk
//! the client did not ask for (or adds one the upstream did not send in
//! OpenAI's shape), turns a failure into an SSE error event, and always
//! ends with `data: [DONE]`. Dropping it (the client went away) drops the
//! upstream stream, which closes the upstream connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::error::GatewayError;
use crate::metering::{Meter, Observed};
use crate::openai::{Endpoint, ResponseView, Usage};
use crate::providers::ChunkStream;

const DONE: &[u8] = b"data: [DONE]\n\n";

pub struct SseBody {
    upstream: ChunkStream,
    /// The chunk peeked before the response started.
    first: Option<Bytes>,
    /// Events left to send once the upstream is finished.
    tail: VecDeque<Bytes>,
    finished: bool,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    backend: String,
    endpoint: Endpoint,
    include_usage: bool,
    sent_usage_chunk: bool,
    /// `id`, `created` and `model` of the stream, for a synthesised usage chunk.
    identity: Option<(String, u64, String)>,
    meter: Meter,
}

pub struct SseParams {
    pub first: Bytes,
    pub upstream: ChunkStream,
    pub idle: Duration,
    pub backend: String,
    pub endpoint: Endpoint,
    pub include_usage: bool,
    pub meter: Meter,
}

impl SseBody {
    pub fn new(p: SseParams) -> Self {
        Self {
            upstream: p.upstream,
            first: Some(p.first),
            tail: VecDeque::new(),
            finished: false,
            idle: p.idle,
            idle_timer: Box::pin(tokio::time::sleep(p.idle)),
            backend: p.backend,
            endpoint: p.endpoint,
            include_usage: p.include_usage,
            sent_usage_chunk: false,
            identity: None,
            meter: p.meter,
        }
    }

    /// Decides what the client sees of one upstream chunk.
    fn on_chunk(&mut self, chunk: Bytes) -> Option<Bytes> {
        let view = match serde_json::from_slice::<ResponseView<'_>>(&chunk) {
            Ok(view) => view,
            Err(e) => {
                self.fail(GatewayError::upstream_protocol(
                    &self.backend,
                    format_args!("a stream chunk is not JSON: {e}"),
                ));
                return None;
            }
        };
        self.meter.observe(Observed::of(&view));
        if view.error.is_some() {
            // The upstream's own error event, already in OpenAI shape.
            self.end(502);
            return Some(event(&chunk));
        }
        if self.identity.is_none() {
            self.identity = Some((
                view.id.as_deref().unwrap_or_default().to_owned(),
                view.created.unwrap_or_default(),
                view.model.as_deref().unwrap_or_default().to_owned(),
            ));
        }
        if view.is_usage_only() {
            if !self.include_usage {
                return None;
            }
            self.sent_usage_chunk = true;
        }
        self.meter.first_chunk_sent();
        Some(event(&chunk))
    }

    /// The upstream ended normally.
    fn on_end(&mut self) {
        if self.include_usage && !self.sent_usage_chunk {
            if let Some(usage) = self.meter.usage() {
                self.tail.push_back(event(&self.usage_chunk(usage)));
            }
        }
        self.end(200);
    }

    fn fail(&mut self, error: GatewayError) {
        tracing::warn!(backend = %self.backend, error = %error.message, "stream failed after it started");
        self.tail.push_back(event(&error.body_json()));
        self.end(error.status.as_u16());
    }

    fn end(&mut self, status: u16) {
        self.tail.push_back(Bytes::from_static(DONE));
        self.finished = true;
        self.meter.finish(status);
    }

    fn usage_chunk(&self, usage: Usage) -> Vec<u8> {
        let (id, created, model) = self.identity.clone().unwrap_or_default();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        serde_json::to_vec(&serde_json::json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [], "usage": usage,
        }))
        .expect("usage chunks serialise")
    }
}

fn event(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
    out.freeze()
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(out) = this.tail.pop_front() {
                return Poll::Ready(Some(Ok(out)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let next = match this.first.take() {
                Some(first) => Poll::Ready(Some(Ok(first))),
                None => this.upstream.as_mut().poll_next(cx),
            };
            match next {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(deadline);
                    if let Some(out) = this.on_chunk(chunk) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(error))) => this.fail(error),
                Poll::Ready(None) => this.on_end(),
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        this.fail(GatewayError::upstream_idle(&this.backend, this.idle));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
