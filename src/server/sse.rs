//! The body of a streamed response. It forwards each upstream chunk the
//! moment it arrives, meters it in passing, removes the usage-only chunk
//! the client did not ask for (or adds one the upstream did not send in
//! OpenAI's shape), turns a failure into an SSE error event, and always
//! ends with `data: [DONE]`. Dropping it (the client went away) drops the
//! upstream stream, which closes the upstream connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use memchr::memmem::Finder;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use crate::error::GatewayError;
use crate::metering::{Meter, Observed};
use crate::openai::{Endpoint, IdentityView, ResponseView, Text, Usage};
use crate::providers::{Chunk, ChunkStream};

const DONE: &[u8] = b"data: [DONE]\n\n";
/// The most sent in one frame when the upstream has sent a lot at once.
const MAX_FRAME: usize = 64 * 1024;
/// A frame's first allocation: room for about 20 typical events, so that
/// events read together are not copied again at every doubling. Frames
/// live only until they are written.
const FRAME_START: usize = 4 * 1024;

/// `id`, `created` and `model` of a stream, for a synthesised usage chunk.
type Identity = (String, u64, String);

/// What the gateway reads of one stream chunk.
pub struct ChunkFacts {
    observed: Observed,
    /// Read from the first chunk only.
    identity: Option<Identity>,
    usage_only: bool,
}

/// Reads an upstream object before the client has seen any of it, so that
/// a broken one or an error sent with a 200 can still fail over.
pub fn read_view<'b>(backend: &str, body: &'b [u8]) -> Result<ResponseView<'b>, GatewayError> {
    let view = parse::<ResponseView<'_>>(backend, body)?;
    if view.is_error() {
        return Err(GatewayError::upstream_in_band(backend, body));
    }
    Ok(view)
}

fn parse<'b, T: Deserialize<'b>>(backend: &str, body: &'b [u8]) -> Result<T, GatewayError> {
    serde_json::from_slice(body).map_err(|e| {
        GatewayError::upstream_protocol(backend, format_args!("the body is not JSON: {e}"))
    })
}

/// Reads one chunk. Most chunks carry a few characters of text and nothing
/// the meter needs: they are checked to be framed as a JSON object and
/// their text measured, without being parsed. Usage and errors are read in
/// full; of a chunk whose stream identity is wanted (`identity`: the
/// first, when the gateway may have to write a usage chunk), only that.
pub fn read_chunk(backend: &str, chunk: &[u8], identity: bool) -> Result<ChunkFacts, GatewayError> {
    let keys = &*KEYS;
    if keys.usage.find(chunk).is_some() || keys.error.find(chunk).is_some() {
        let view = read_view(backend, chunk)?;
        return Ok(ChunkFacts {
            observed: Observed::of(&view),
            identity: identity.then(|| owned(&view.id, view.created, &view.model)),
            usage_only: view.is_usage_only(),
        });
    }
    if !framed_as_object(chunk) {
        return Err(GatewayError::upstream_protocol(
            backend,
            "a stream chunk is not a JSON object",
        ));
    }
    let identity = if identity {
        let view = parse::<IdentityView<'_>>(backend, chunk)?;
        Some(owned(&view.id, view.created, &view.model))
    } else {
        None
    };
    Ok(ChunkFacts {
        observed: Observed {
            usage: None,
            text_chars: text_chars(chunk),
        },
        identity,
        usage_only: false,
    })
}

fn owned(id: &Option<Text<'_>>, created: Option<u64>, model: &Option<Text<'_>>) -> Identity {
    (
        id.as_deref().unwrap_or_default().to_owned(),
        created.unwrap_or_default(),
        model.as_deref().unwrap_or_default().to_owned(),
    )
}

pub struct SseBody {
    upstream: ChunkStream,
    /// Events written but not sent yet: the first chunk's (read before the
    /// response started) and the last ones.
    ready: BytesMut,
    finished: bool,
    idle: Duration,
    /// When the upstream last sent a chunk. The timer is moved on from it
    /// only when it fires, not re-armed for every chunk.
    last_chunk: Instant,
    idle_timer: Pin<Box<Sleep>>,
    backend: String,
    endpoint: Endpoint,
    include_usage: bool,
    sent_usage_chunk: bool,
    identity: Option<Identity>,
    /// Given up when the stream ends, to record the request.
    meter: Option<Meter>,
}

pub struct SseParams {
    /// The first chunk, already read with [`read_chunk`] (its identity
    /// kept when `include_usage`).
    pub first: (Chunk, ChunkFacts),
    pub upstream: ChunkStream,
    pub idle: Duration,
    pub backend: String,
    pub endpoint: Endpoint,
    pub include_usage: bool,
    pub meter: Meter,
}

impl SseBody {
    pub fn new(p: SseParams) -> Self {
        let now = Instant::now();
        let mut body = Self {
            upstream: p.upstream,
            ready: BytesMut::new(),
            finished: false,
            idle: p.idle,
            last_chunk: now,
            idle_timer: Box::pin(tokio::time::sleep(p.idle)),
            backend: p.backend,
            endpoint: p.endpoint,
            include_usage: p.include_usage,
            sent_usage_chunk: false,
            identity: None,
            meter: Some(p.meter),
        };
        let (chunk, facts) = p.first;
        let mut ready = BytesMut::new();
        body.on_chunk(&mut ready, &chunk, facts, now);
        body.ready = ready;
        body
    }

    /// Decides what the client sees of one upstream chunk, and adds it to
    /// `out`.
    fn on_chunk(&mut self, out: &mut BytesMut, chunk: &[u8], facts: ChunkFacts, now: Instant) {
        self.meter().observe(facts.observed);
        if facts.identity.is_some() {
            self.identity = facts.identity;
        }
        if facts.usage_only {
            if !self.include_usage {
                return;
            }
            self.sent_usage_chunk = true;
        }
        self.meter().chunk_sent(now.into_std());
        put_event(out, chunk);
    }

    /// Whether the upstream has been silent for longer than `idle`; if not,
    /// the timer is set for when it would be.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last_chunk + self.idle;
            if deadline <= Instant::now() {
                return true;
            }
            self.idle_timer.as_mut().reset(deadline);
        }
        false
    }

    fn meter(&mut self) -> &mut Meter {
        self.meter
            .as_mut()
            .expect("the meter is kept until the stream ends")
    }

    /// The upstream ended normally.
    fn on_end(&mut self) {
        self.meter().upstream_done();
        if self.include_usage && !self.sent_usage_chunk {
            if let Some(usage) = self.meter().usage() {
                let chunk = self.usage_chunk(usage);
                put_event(&mut self.ready, &chunk);
            }
        }
        self.end(200);
    }

    fn fail(&mut self, error: GatewayError) {
        self.meter().upstream_done();
        tracing::warn!(backend = %self.backend, error = %error.message, "stream failed after it started");
        put_event(&mut self.ready, &error.body_json());
        self.end(error.status.as_u16());
    }

    fn end(&mut self, status: u16) {
        self.ready.put_slice(DONE);
        self.finished = true;
        if let Some(meter) = self.meter.take() {
            meter.finish_after_response(status);
        }
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

/// The keys a chunk is searched for, each searcher built once: building
/// one per search cost more than the search.
struct Keys {
    usage: Finder<'static>,
    error: Finder<'static>,
    content: Finder<'static>,
    text: Finder<'static>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    usage: Finder::new(b"\"usage\""),
    error: Finder::new(b"\"error"),
    content: Finder::new(b"\"content\":\""),
    text: Finder::new(b"\"text\":\""),
});

/// Bytes of generated text in a chunk, for an estimate when the upstream
/// reports no usage: the first `"content":"…"` (chat) or `"text":"…"`
/// (legacy; Together sends both, so the first one found counts), escapes
/// counted as written.
fn text_chars(chunk: &[u8]) -> usize {
    let start = [&KEYS.content, &KEYS.text]
        .into_iter()
        .find_map(|key| key.find(chunk).map(|at| at + key.needle().len()));
    let Some(start) = start else { return 0 };
    let text = &chunk[start..];
    let mut at = 0;
    // Skips to each quote or backslash; a backslash escapes the next byte.
    while let Some(found) = memchr::memchr2(b'"', b'\\', &text[at..]) {
        let i = at + found;
        if text[i] == b'"' {
            return i;
        }
        at = i + 2;
        if at >= text.len() {
            break;
        }
    }
    0
}

/// Whether a chunk starts and ends as a JSON object does. Chunks are passed
/// on as the upstream wrote them, and parsing each one in full to check it
/// was a fifth of the gateway's CPU for a stream. The framing catches what
/// upstreams send in place of a chunk (plain text, an HTML page, an object
/// cut short); any other fault is left to the client's JSON parser, as it
/// would be without a gateway.
fn framed_as_object(chunk: &[u8]) -> bool {
    let chunk = chunk.trim_ascii();
    chunk.first() == Some(&b'{') && chunk.last() == Some(&b'}')
}

fn put_event(out: &mut BytesMut, json: &[u8]) {
    out.reserve((json.len() + 8).max(FRAME_START.saturating_sub(out.len())));
    out.put_slice(b"data: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    /// Everything ready is sent as one frame: the events of one upstream
    /// read go out in one write, and nothing that has arrived waits.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut out = std::mem::take(&mut this.ready);
        // Chunks that are ready together arrived together: one clock read.
        let mut arrived = None;
        loop {
            out.extend_from_slice(&this.ready);
            this.ready.clear();
            if this.finished || out.len() >= MAX_FRAME {
                break;
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let now = *arrived.get_or_insert_with(Instant::now);
                    this.last_chunk = now;
                    match read_chunk(&this.backend, &chunk, false) {
                        Ok(facts) => this.on_chunk(&mut out, &chunk, facts, now),
                        Err(error) => this.fail(error),
                    }
                }
                Poll::Ready(Some(Err(error))) => this.fail(error),
                Poll::Ready(None) => this.on_end(),
                Poll::Pending if !out.is_empty() => break,
                Poll::Pending => {
                    if this.idle_expired(cx) {
                        this.fail(GatewayError::upstream_idle(&this.backend, this.idle));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
        if out.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(out.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::{StreamExt, stream};

    use super::*;
    use crate::ledger::Ledger;
    use crate::metering::cost::Rate;
    use crate::metering::{Charges, InFlight, MeterLabels, Serving};
    use crate::metrics::Metrics;
    use crate::routing::Lease;

    const CONTENT: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}"#;
    const LAST_WITH_USAGE: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    const USAGE_ONLY: &str = r#"{"id":"c1","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

    #[test]
    fn text_is_measured_without_parsing() {
        assert_eq!(text_chars(CONTENT.as_bytes()), 5);
        assert_eq!(
            text_chars(br#"{"choices":[{"delta":{"content":"a\"b"}}]}"#),
            4
        );
        assert_eq!(
            text_chars(br#"{"choices":[{"text":"xyz","delta":{"content":"xyz"}}]}"#),
            3
        );
        assert_eq!(
            text_chars(br#"{"choices":[{"delta":{"content":null}}]}"#),
            0
        );
    }

    #[test]
    fn chunks_not_framed_as_an_object_are_refused_without_parsing() {
        for good in [CONTENT, " {\"choices\":[]}\r\n"] {
            assert!(read_chunk("b", good.as_bytes(), false).is_ok(), "{good}");
        }
        for bad in [
            "Internal Server Error",
            "<html><body>502 Bad Gateway</body></html>",
            r#"{"id":"c1","choices":[{"delta":{"content":"cut"#,
            "[1,2]",
            "",
        ] {
            let error = read_chunk("b", bad.as_bytes(), false).err().expect(bad);
            assert_eq!(error.status, axum::http::StatusCode::BAD_GATEWAY, "{bad}");
        }
        // A chunk whose identity is read must be JSON, not only framed.
        let garbled = br#"{"id":"c1",choices}"#;
        assert!(read_chunk("b", garbled, false).is_ok());
        let error = read_chunk("b", garbled, true).err().unwrap();
        assert!(error.message.contains("not JSON"), "{}", error.message);
    }

    fn test_meter() -> (Arc<Metrics>, Meter) {
        let metrics = Arc::new(Metrics::new());
        let mut meter = Meter::new(
            metrics.clone(),
            MeterLabels {
                request_id: "r".into(),
                alias: "a".into(),
                key: "k".into(),
            },
            Charges {
                ledger: Arc::new(Ledger::open(None).unwrap()),
                reservation: None,
                counterfactuals: Arc::new([]),
                limits: None,
            },
            std::time::Instant::now(),
            10,
            InFlight::new(&metrics.in_flight),
        );
        meter.begin_attempt(Serving {
            deployment: "a/b".into(),
            backend: "b".into(),
            rate: Rate::default(),
            lease: Lease::new(Arc::default(), Arc::default(), Arc::default()),
        });
        meter.attempt_answered();
        (metrics, meter)
    }

    async fn run(
        chunks: Vec<Result<&'static str, GatewayError>>,
        include_usage: bool,
    ) -> (Vec<String>, Arc<Metrics>) {
        let (metrics, meter) = test_meter();
        let mut chunks = chunks.into_iter().map(|c| c.map(|s| s.as_bytes().to_vec()));
        let first = chunks.next().unwrap().unwrap();
        let facts = read_chunk("b", &first, true).unwrap();
        let body = SseBody::new(SseParams {
            first: (first, facts),
            upstream: stream::iter(chunks.collect::<Vec<_>>()).boxed(),
            idle: Duration::from_secs(5),
            backend: "b".into(),
            endpoint: Endpoint::Chat,
            include_usage,
            meter,
        });
        let frames = body
            .map(|e| String::from_utf8(e.unwrap().to_vec()).unwrap())
            .collect::<Vec<_>>()
            .await;
        // The request is recorded by a task of its own, once this one yields.
        tokio::task::yield_now().await;
        (split_events(&frames.concat()), metrics)
    }

    /// Each `data: …\n\n` event of a body, in order.
    fn split_events(body: &str) -> Vec<String> {
        body.split_inclusive("\n\n").map(str::to_owned).collect()
    }

    #[tokio::test]
    async fn events_that_are_ready_together_go_out_in_one_frame() {
        let first = CONTENT.as_bytes().to_vec();
        let facts = read_chunk("b", &first, true).unwrap();
        let later = stream::iter([Ok(CONTENT.as_bytes().to_vec())]);
        // The upstream has nothing for a moment after its second chunk.
        let upstream = stream::iter([Ok(CONTENT.as_bytes().to_vec())])
            .chain(stream::once(tokio::task::yield_now()).filter_map(|()| async { None }))
            .chain(later)
            .boxed();
        let (_, meter) = test_meter();
        let frames: Vec<Bytes> = SseBody::new(SseParams {
            first: (first, facts),
            upstream,
            idle: Duration::from_secs(5),
            backend: "b".into(),
            endpoint: Endpoint::Chat,
            include_usage: false,
            meter,
        })
        .map(Result::unwrap)
        .collect()
        .await;
        let events: Vec<usize> = frames
            .iter()
            .map(|f| split_events(std::str::from_utf8(f).unwrap()).len())
            .collect();
        assert_eq!(
            events,
            [2, 2],
            "two chunks, a pause, then a chunk and [DONE]"
        );
    }

    fn requests_metric(metrics: &Metrics, status: &str) -> u64 {
        metrics
            .requests
            .with_label_values(&["a", "b", status])
            .get()
    }

    #[test]
    fn a_request_is_recorded_after_its_response_with_its_status_whatever_happens() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Recorded by a task of its own, once the current one yields.
        let (metrics, meter) = test_meter();
        runtime.block_on(async {
            meter.finish_after_response(200);
            assert_eq!(requests_metric(&metrics, "200"), 0);
            tokio::task::yield_now().await;
            assert_eq!(requests_metric(&metrics, "200"), 1);
        });
        // The runtime stops before that task runs: recorded as it is dropped.
        let (metrics, meter) = test_meter();
        runtime.block_on(async { meter.finish_after_response(502) });
        drop(runtime);
        assert_eq!(requests_metric(&metrics, "502"), 1);
        assert_eq!(requests_metric(&metrics, "499"), 0, "not as a client gone");
        // No runtime: recorded at once.
        let (metrics, meter) = test_meter();
        meter.finish_after_response(200);
        assert_eq!(requests_metric(&metrics, "200"), 1);
    }

    fn usage_metric(metrics: &Metrics, estimated: &str) -> u64 {
        metrics
            .tokens
            .with_label_values(&["a", "b", "output", estimated])
            .get()
    }

    #[tokio::test]
    async fn drops_the_usage_chunk_nobody_asked_for() {
        let (events, metrics) = run(vec![Ok(CONTENT), Ok(USAGE_ONLY)], false).await;
        assert_eq!(
            events,
            [format!("data: {CONTENT}\n\n"), "data: [DONE]\n\n".into()]
        );
        assert_eq!(usage_metric(&metrics, "false"), 1, "still metered");
    }

    #[tokio::test]
    async fn synthesises_a_usage_chunk_from_usage_on_a_content_chunk() {
        let (events, _) = run(vec![Ok(CONTENT), Ok(LAST_WITH_USAGE)], true).await;
        assert_eq!(events.len(), 4);
        let usage: serde_json::Value =
            serde_json::from_str(events[2].strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 4);
        assert_eq!(usage["id"], "c1");
        assert_eq!(usage["created"], 7);
        assert_eq!(usage["model"], "m");
        assert_eq!(usage["object"], "chat.completion.chunk");
        assert_eq!(events[3], "data: [DONE]\n\n");
    }

    #[tokio::test]
    async fn a_failure_mid_stream_is_an_error_event_then_done() {
        let (events, metrics) = run(
            vec![Ok(CONTENT), Err(GatewayError::upstream_broken("b"))],
            false,
        )
        .await;
        assert_eq!(events.len(), 3);
        assert!(
            events[1].starts_with(
                r#"data: {"error":{"message":"the connection to backend \"b\" failed"#
            )
        );
        assert_eq!(events[2], "data: [DONE]\n\n");
        assert_eq!(
            usage_metric(&metrics, "true"),
            2,
            "usage estimated from the 5 characters sent"
        );
    }

    #[tokio::test]
    async fn a_chunk_that_is_not_a_json_object_ends_the_stream_with_an_error() {
        let (events, _) = run(vec![Ok(CONTENT), Ok("{not json"), Ok(CONTENT)], false).await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[1].contains("is not a JSON object"), "{events:?}");
    }
}
