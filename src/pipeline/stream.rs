//! The body of a streamed response. It forwards each upstream chunk the
//! moment it arrives, meters it in passing, removes the usage-only chunk
//! the client did not ask for (or adds one the upstream did not send in
//! OpenAI's shape), turns a failure into an SSE error event (an upstream
//! stream that ended before a `finish_reason` said how each answer
//! finished is one), ends a stream
//! before a chunk that would take its cost past its budget reservation, as
//! the upstream would at its `max_tokens` (`finish_reason: "length"`), ends
//! with an error event a stream still open when the shutdown grace period
//! runs out, and always ends with
//! `data: [DONE]`. For a client of another inbound API, each event is
//! re-encoded in its API once the meter has read it. Dropping it (the client went away) drops the
//! upstream stream, which closes the upstream connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use crate::error::GatewayError;
use crate::inbound::Encoder;
use crate::metering::Meter;
use crate::metering::usage::{self, ChunkFacts, StreamReader};
use crate::openai::{Endpoint, ResponseIdentity, Usage};
use crate::providers::{Chunk, ChunkStream};

const DONE: &[u8] = b"data: [DONE]\n\n";
/// The most sent in one frame when the upstream has sent a lot at once.
const MAX_FRAME: usize = 64 * 1024;
/// A frame's first allocation: room for about 20 typical events, so that
/// events read together are not copied again at every doubling. Frames
/// live only until they are written.
const FRAME_START: usize = 4 * 1024;

pub struct SseBody {
    upstream: ChunkStream,
    reader: StreamReader,
    /// Events written but not sent yet: the first chunk's (read before the
    /// response started) and the last ones.
    ready: BytesMut,
    finished: bool,
    idle: Duration,
    /// When the upstream last sent a chunk. The timer is moved on from it
    /// only when it fires, not re-armed for every chunk.
    last_chunk: Instant,
    idle_timer: Pin<Box<Sleep>>,
    /// Resolves when the gateway's shutdown grace period runs out.
    grace_over: Pin<Box<OwnedNotified>>,
    backend: String,
    endpoint: Endpoint,
    /// The answers the stream carries (`n`): a stream cut short ends each.
    answers: u32,
    include_usage: bool,
    /// The upstream sends its usage so far in every chunk, asked by the
    /// gateway: the meter's count.
    running_usage: bool,
    /// ... which the client did not ask for, so it is taken out.
    strip_usage: bool,
    sent_usage_chunk: bool,
    /// The first chunk, kept when the gateway may write a chunk of its own
    /// (a usage chunk, or the last of a stream cut at its reservation) in
    /// the stream's identity, which is read from it then: most streams
    /// never need it, and reading it costs more than keeping it.
    first: Option<Box<[u8]>>,
    /// Re-encodes the events for a client of another inbound API; `None`
    /// for OpenAI's, whose chunks go out as they came.
    encoder: Option<Box<Encoder>>,
    meter: Box<Meter>,
    /// The status the stream ended with: the request is recorded with it
    /// as this body is dropped, after the server has written its last
    /// bytes. A body dropped before its end was left by its client.
    ended: Option<u16>,
}

pub struct SseParams {
    /// The first chunk, already read by `reader`, which reads the rest.
    pub first: (Chunk, ChunkFacts),
    pub reader: StreamReader,
    pub upstream: ChunkStream,
    pub idle: Duration,
    pub grace_over: OwnedNotified,
    pub backend: String,
    pub endpoint: Endpoint,
    pub answers: u32,
    pub include_usage: bool,
    pub running_usage: bool,
    /// The client asked for the usage so far in every chunk.
    pub asks_running_usage: bool,
    pub encoder: Option<Box<Encoder>>,
    pub meter: Box<Meter>,
}

impl SseBody {
    pub fn new(p: SseParams) -> Self {
        let now = Instant::now();
        let mut body = Self {
            upstream: p.upstream,
            reader: p.reader,
            ready: BytesMut::new(),
            finished: false,
            idle: p.idle,
            last_chunk: now,
            idle_timer: Box::pin(tokio::time::sleep_until(now + p.idle)),
            grace_over: Box::pin(p.grace_over),
            backend: p.backend,
            endpoint: p.endpoint,
            answers: p.answers,
            include_usage: p.include_usage,
            running_usage: p.running_usage,
            // Another API's encoder reads no chunk's usage.
            strip_usage: p.running_usage && !p.asks_running_usage && p.encoder.is_none(),
            sent_usage_chunk: false,
            first: None,
            encoder: p.encoder,
            meter: p.meter,
            ended: None,
        };
        let (chunk, facts) = p.first;
        if body.include_usage || body.meter.reserved_nano_usd().is_some() {
            body.first = Some(chunk[..].into());
        }
        let mut ready = BytesMut::new();
        body.on_chunk(&mut ready, &chunk, facts, now);
        // Before anything the first chunk ended the stream with.
        ready.extend_from_slice(&body.ready);
        body.ready = ready;
        body
    }

    /// Decides what the client sees of one upstream chunk, and adds it to
    /// `out`.
    fn on_chunk(&mut self, out: &mut BytesMut, chunk: &[u8], facts: ChunkFacts, now: Instant) {
        let now = now.into_std();
        if self
            .meter
            .passes_reservation(&facts.observed, self.running_usage)
        {
            self.cut(now);
            return;
        }
        let stripped = (self.strip_usage && facts.observed.usage.is_some() && !facts.usage_only)
            .then(|| usage::without_usage(chunk))
            .flatten();
        self.meter.observe(facts.observed, now);
        if facts.usage_only {
            if !self.include_usage {
                return;
            }
            self.sent_usage_chunk = true;
        }
        self.meter.chunk_sent(now);
        match stripped {
            None => emit(&mut self.encoder, out, chunk),
            Some((before, after)) => put_event_parts(out, before, after),
        }
    }

    /// The stream's identity, for a chunk the gateway writes.
    fn identity(&mut self) -> ResponseIdentity {
        self.first
            .take()
            .map(|first| ResponseIdentity::of_chunk(&first))
            .unwrap_or_default()
    }

    /// Ends a stream that has cost what its key's budget reserved for it:
    /// the client sees an answer cut at its length limit.
    fn cut(&mut self, now: std::time::Instant) {
        let identity = self.identity();
        for index in 0..self.answers {
            let last = identity.length_chunk(self.endpoint, index);
            emit(&mut self.encoder, &mut self.ready, &last);
        }
        if self.include_usage {
            let usage = self.meter.usage_so_far();
            let chunk = identity.usage_chunk(self.endpoint, usage);
            emit(&mut self.encoder, &mut self.ready, &chunk);
        }
        self.meter.cut_at_reservation(self.running_usage);
        self.meter.upstream_done(now);
        self.end(200);
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

    /// The upstream ended normally, as seen at `now`.
    fn on_end(&mut self, now: Instant) {
        // Every upstream ends each answer with a chunk that says how it
        // ended (`finish_reason`); a stream that ended before saying was
        // cut short, and must not read as a whole answer.
        if !self.reader.finished(self.answers) {
            let what = match self.answers {
                1 => "its stream ended before a `finish_reason` said how the answer finished"
                    .to_owned(),
                n => format!(
                    "its stream ended before a `finish_reason` said how each of its {n} answers finished"
                ),
            };
            self.fail(GatewayError::upstream_protocol(&self.backend, what));
            return;
        }
        self.meter.upstream_done(now.into_std());
        if self.include_usage && !self.sent_usage_chunk {
            if let Some(usage) = self.meter.usage() {
                let identity = self.identity();
                let chunk = identity.usage_chunk(self.endpoint, usage);
                emit(&mut self.encoder, &mut self.ready, &chunk);
            }
        }
        self.end(200);
    }

    fn fail(&mut self, error: GatewayError) {
        let meter = &mut self.meter;
        meter.upstream_done(Instant::now().into_std());
        meter.failed(error.label());
        tracing::warn!(request_id = meter.request_id(), backend = %self.backend, error = %error.message(), "stream failed after it started");
        match &mut self.encoder {
            Some(encoder) => encoder.fail(&mut self.ready, &error, used(meter)),
            None => put_event(&mut self.ready, &error.body_json()),
        }
        self.end(error.status().as_u16());
    }

    fn end(&mut self, status: u16) {
        match &mut self.encoder {
            Some(encoder) => encoder.end(&mut self.ready, used(&self.meter)),
            None => self.ready.put_slice(DONE),
        }
        self.finished = true;
        self.ended = Some(status);
        self.meter.settle_held(status);
    }
}

/// The usage a stream's last event states: the upstream's, or the
/// meter's count so far.
fn used(meter: &Meter) -> Usage {
    meter.usage().unwrap_or_else(|| meter.usage_so_far())
}

/// One canonical chunk for the client: as it is, or re-encoded.
fn emit(encoder: &mut Option<Box<Encoder>>, out: &mut BytesMut, chunk: &[u8]) {
    match encoder {
        None => put_event(out, chunk),
        Some(encoder) => encoder.chunk(out, chunk),
    }
}

fn put_event(out: &mut BytesMut, json: &[u8]) {
    out.reserve((json.len() + 8).max(FRAME_START.saturating_sub(out.len())));
    out.put_slice(b"data: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
}

/// One event whose JSON is `first` then `second`: a chunk with a member
/// taken out. Not [`put_event`] with an empty second part, which every
/// other event would pay for.
#[cold]
fn put_event_parts(out: &mut BytesMut, first: &[u8], second: &[u8]) {
    out.reserve(first.len() + second.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(first);
    out.put_slice(second);
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
                    match this.reader.read(&this.backend, &chunk) {
                        Ok(facts) => this.on_chunk(&mut out, &chunk, facts, now),
                        Err(error) => this.fail(error),
                    }
                }
                Poll::Ready(Some(Err(error))) => this.fail(error),
                Poll::Ready(None) => this.on_end(*arrived.get_or_insert_with(Instant::now)),
                Poll::Pending if !out.is_empty() => break,
                Poll::Pending => {
                    if this.grace_over.as_mut().poll(cx).is_ready() {
                        this.fail(GatewayError::shutting_down());
                        continue;
                    }
                    if this.idle_expired(cx) {
                        this.fail(GatewayError::upstream_idle(&this.backend, this.idle));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
        this.meter.record_gaps();
        if out.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(out.freeze())))
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if let Some(status) = self.ended {
            self.meter.finish(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::{StreamExt, stream};

    use super::*;
    use crate::ledger::Ledger;
    use crate::metering::budget::Reservation;
    use crate::metering::testing::{Sink, meter_charging};
    use crate::metrics::Metrics;

    const CONTENT: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}"#;
    const LAST: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}"#;
    const LAST_WITH_USAGE: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    const USAGE_ONLY: &str = r#"{"id":"c1","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

    fn test_meter() -> (Arc<Metrics>, Box<Meter>) {
        let (metrics, _, meter) = meter_charging(None, None);
        (metrics, meter)
    }

    /// A chat stream's body, as the handler makes it once `first` arrived.
    fn sse_body(
        first: Chunk,
        upstream: ChunkStream,
        include_usage: bool,
        meter: Box<Meter>,
    ) -> SseBody {
        let mut reader = StreamReader::default();
        let facts = reader.read("b", &first).unwrap();
        SseBody::new(SseParams {
            first: (first, facts),
            reader,
            upstream,
            idle: Duration::from_secs(5),
            grace_over: Arc::new(tokio::sync::Notify::new()).notified_owned(),
            backend: "b".into(),
            endpoint: Endpoint::Chat,
            answers: 1,
            include_usage,
            running_usage: false,
            asks_running_usage: false,
            encoder: None,
            meter,
        })
    }

    async fn run(
        chunks: Vec<Result<&'static str, GatewayError>>,
        include_usage: bool,
    ) -> (Vec<String>, Arc<Metrics>) {
        let (metrics, meter) = test_meter();
        let mut chunks = chunks
            .into_iter()
            .map(|c| c.map(|s| Chunk::from_static(s.as_bytes())));
        let first = chunks.next().unwrap().unwrap();
        let upstream = stream::iter(chunks.collect::<Vec<_>>()).boxed();
        let body = sse_body(first, upstream, include_usage, meter);
        let frames = body
            .map(|e| String::from_utf8(e.unwrap().to_vec()).unwrap())
            .collect::<Vec<_>>()
            .await;
        (split_events(&frames.concat()), metrics)
    }

    /// Each `data: …\n\n` event of a body, in order.
    fn split_events(body: &str) -> Vec<String> {
        body.split_inclusive("\n\n").map(str::to_owned).collect()
    }

    #[tokio::test]
    async fn events_that_are_ready_together_go_out_in_one_frame() {
        let later = stream::iter([Ok(Chunk::from_static(LAST.as_bytes()))]);
        // The upstream has nothing for a moment after its second chunk.
        let upstream = stream::iter([Ok(Chunk::from_static(CONTENT.as_bytes()))])
            .chain(stream::once(tokio::task::yield_now()).filter_map(|()| async { None }))
            .chain(later)
            .boxed();
        let (_, meter) = test_meter();
        let frames: Vec<Bytes> = sse_body(
            Chunk::from_static(CONTENT.as_bytes()),
            upstream,
            false,
            meter,
        )
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

    #[tokio::test]
    async fn chunks_read_together_count_a_zero_gap_each_as_their_frame_goes_out() {
        let content = || Ok(Chunk::from_static(CONTENT.as_bytes()));
        // Two chunks read together, a pause, then two more and the usage,
        // with which the stream ends.
        let upstream = stream::iter([content(), content()])
            .chain(stream::once(tokio::task::yield_now()).filter_map(|()| async { None }))
            .chain(stream::iter([
                content(),
                Ok(Chunk::from_static(LAST.as_bytes())),
                Ok(Chunk::from_static(USAGE_ONLY.as_bytes())),
            ]))
            .boxed();
        let (metrics, meter) = test_meter();
        let gaps = || {
            metrics
                .time_between_tokens
                .with_label_values(&["a", "b"])
                .get_sample_count()
        };
        let mut body = sse_body(
            Chunk::from_static(CONTENT.as_bytes()),
            upstream,
            false,
            meter,
        );
        body.next().await.unwrap().unwrap();
        // The first chunk to the second, and the second to the third: zero.
        assert_eq!(gaps(), 2);
        while body.next().await.is_some() {}
        drop(body);
        // Two more, one of them zero, recorded as the meter finishes; the
        // usage-only chunk was not sent, so it has no gap.
        assert_eq!(gaps(), 4);
    }

    fn requests_metric(metrics: &Metrics, status: &str) -> u64 {
        metrics
            .requests
            .with_label_values(&["chat", "a", "b", status])
            .get()
    }

    #[tokio::test]
    async fn a_request_is_recorded_as_its_body_is_dropped_with_its_status_whatever_happens() {
        let upstream = || stream::iter([Ok(Chunk::from_static(LAST.as_bytes()))]).boxed();
        let first = || Chunk::from_static(CONTENT.as_bytes());
        // Ended: recorded once the server lets the body go, not before.
        let (metrics, meter) = test_meter();
        let mut body = sse_body(first(), upstream(), false, meter);
        while body.next().await.is_some() {}
        assert_eq!(requests_metric(&metrics, "200"), 0);
        drop(body);
        assert_eq!(requests_metric(&metrics, "200"), 1);
        // Failed: with the failure's status.
        let (metrics, meter) = test_meter();
        let failing = stream::iter([Err(GatewayError::upstream_broken("b"))]).boxed();
        let mut body = sse_body(first(), failing, false, meter);
        while body.next().await.is_some() {}
        drop(body);
        assert_eq!(requests_metric(&metrics, "502"), 1);
        assert_eq!(requests_metric(&metrics, "499"), 0, "not as a client gone");
        // Dropped before its end: the client went away.
        let (metrics, meter) = test_meter();
        let open = upstream().chain(stream::pending()).boxed();
        let mut body = sse_body(first(), open, false, meter);
        body.next().await.unwrap().unwrap();
        drop(body);
        assert_eq!(requests_metric(&metrics, "499"), 1);
        assert_eq!(requests_metric(&metrics, "200"), 0);
    }

    #[tokio::test]
    async fn a_budgeted_stream_is_charged_before_its_last_frame_goes_out() {
        let spent_today = |ledger: &Ledger| {
            let today = crate::metering::budget::today();
            ledger.spent("k", today, today)
        };
        let chunks = || {
            stream::iter([
                Ok(Chunk::from_static(CONTENT.as_bytes())),
                Ok(Chunk::from_static(LAST_WITH_USAGE.as_bytes())),
            ])
            .boxed()
        };
        // 3 prompt tokens at 1,000 pico-dollars and 1 output token at
        // 10,000: 13 nano-dollars.
        let sink = Arc::new(Sink::default());
        let reservation = Reservation::shared("k", 1_000, sink.clone(), "r".into());
        let (metrics, ledger, meter) = meter_charging(Some(reservation), None);
        let mut body = sse_body(
            Chunk::from_static(CONTENT.as_bytes()),
            chunks(),
            false,
            meter,
        );
        let mut frames = String::new();
        while let Some(frame) = body.next().await {
            frames.push_str(std::str::from_utf8(&frame.unwrap()).unwrap());
            let last = frames.ends_with("data: [DONE]\n\n");
            let told: &[u64] = if last { &[13] } else { &[] };
            assert_eq!(*sink.0.lock().unwrap(), told, "{frames}");
            assert_eq!(spent_today(&ledger), if last { 13 } else { 0 });
        }
        // Its metrics and log line wait for the server to let the body go.
        assert_eq!(requests_metric(&metrics, "200"), 0);
        drop(body);
        assert_eq!(requests_metric(&metrics, "200"), 1);
        assert_eq!(*sink.0.lock().unwrap(), [13], "charged once");
        assert_eq!(spent_today(&ledger), 13);

        // Holding nothing, it is charged once its last bytes are written.
        let (_, ledger, meter) = meter_charging(None, None);
        let mut body = sse_body(
            Chunk::from_static(CONTENT.as_bytes()),
            chunks(),
            false,
            meter,
        );
        while body.next().await.is_some() {}
        assert_eq!(spent_today(&ledger), 0);
        drop(body);
        assert_eq!(spent_today(&ledger), 13);
    }

    fn usage_metric(metrics: &Metrics, estimated: &str) -> u64 {
        metrics
            .tokens
            .with_label_values(&["chat", "a", "b", "output", estimated])
            .get()
    }

    #[tokio::test]
    async fn drops_the_usage_chunk_nobody_asked_for() {
        let (events, metrics) = run(vec![Ok(LAST), Ok(USAGE_ONLY)], false).await;
        assert_eq!(
            events,
            [format!("data: {LAST}\n\n"), "data: [DONE]\n\n".into()]
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
    async fn a_first_chunk_that_is_framed_but_not_json_is_passed_on_and_names_no_stream() {
        const GARBLED: &str = r#"{"id":"c1",choices}"#;
        let (events, _) = run(vec![Ok(GARBLED), Ok(LAST_WITH_USAGE)], true).await;
        assert_eq!(events[0], format!("data: {GARBLED}\n\n"));
        let usage: serde_json::Value =
            serde_json::from_str(events[2].strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 4);
        assert_eq!((&usage["id"], &usage["model"]), (&"".into(), &"".into()));
    }

    #[tokio::test]
    async fn the_first_chunk_is_kept_only_for_a_chunk_the_gateway_may_write() {
        let first = || Chunk::from_static(CONTENT.as_bytes());
        let body = |include_usage| {
            let upstream = stream::iter(Vec::new()).boxed();
            sse_body(first(), upstream, include_usage, test_meter().1)
        };
        assert_eq!(body(true).first.as_deref(), Some(CONTENT.as_bytes()));
        assert!(
            body(false).first.is_none(),
            "no usage asked for, no reservation"
        );
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
    async fn a_stream_that_ends_before_saying_how_its_answer_finished_is_a_failure() {
        let (events, metrics) = run(vec![Ok(CONTENT), Ok(CONTENT)], false).await;
        assert_eq!(events.len(), 4, "{events:?}");
        assert!(
            events[2].contains(r#""code":"upstream_invalid_response""#)
                && events[2].contains("`finish_reason`"),
            "{events:?}"
        );
        assert_eq!(events[3], "data: [DONE]\n\n");
        assert_eq!(requests_metric(&metrics, "502"), 1);
        assert_eq!(requests_metric(&metrics, "200"), 0);
        assert_eq!(usage_metric(&metrics, "true"), 3, "the 10 characters sent");
    }

    #[tokio::test]
    async fn a_chunk_that_is_not_a_json_object_ends_the_stream_with_an_error() {
        let (events, _) = run(vec![Ok(CONTENT), Ok("{not json"), Ok(CONTENT)], false).await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[1].contains("is not a JSON object"), "{events:?}");
    }
}
