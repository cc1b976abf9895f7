//! The `data` of each SSE event of an upstream body, within the backend's
//! caps. sse-stream parses the body; a read that the parser holds no part
//! of an event before, and that starts with whole events of the form every
//! OpenAI-compatible server writes (`data: <payload>\n\n`, one line), has
//! those events cut out of it where they are, without the parser: each
//! payload is a slice of the read, where the parser would scan it line by
//! line and copy it into a `String`. Most reads of a stream are of that
//! form.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper::body::Body;
use sse_stream::SseByteStream;

use super::Chunk;
use super::http::{BodyError, Capped, Caps};
use crate::error::GatewayError;

/// How long the rest of a stream's body is read for after its
/// `data: [DONE]`.
const DRAIN: Duration = Duration::from_secs(1);

const DONE: &[u8] = b"[DONE]";

/// The `data` of each SSE event of `body`, parsed incrementally (an event
/// may be cut across reads; the work is linear in the bytes, however many
/// events a read holds), within `caps`. Events without data (comments,
/// keep-alives) are skipped, and OpenAI's end marker, `data: [DONE]`,
/// ends the stream.
pub fn sse_data<B>(backend: &str, caps: Caps, body: B) -> SseData<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    SseData {
        body: Some(Capped::new(backend, caps, body, true)),
        plain: Bytes::new(),
        plain_utf8: false,
        parser: None,
        parsing: false,
        parser_between_events: true,
        backend: backend.to_owned(),
        done: false,
    }
}

/// See [`sse_data`]. A stream that ended at `data: [DONE]` before its body
/// did (a chunked body's last chunk comes after it) reads the rest in the
/// background once dropped, for up to [`DRAIN`], so that its connection is
/// kept for the next request rather than closed. One dropped before
/// `[DONE]` closes it: the client left, and the upstream should stop
/// generating.
pub struct SseData<B: Body<Data = Bytes> + Unpin + Send + 'static> {
    /// `None` once it has ended, or been taken by the drain.
    body: Option<Capped<B>>,
    /// What is left of a read whose leading events are taken as they are.
    plain: Bytes,
    /// That read is valid UTF-8 as a whole, and so is every event cut
    /// out of it: one check of the read costs less than one per event.
    plain_utf8: bool,
    /// Parses what is not taken as it is; made when a read first needs
    /// it, which most streams' reads never do.
    parser: Option<(SseByteStream<Fed>, Fed)>,
    /// The parser has been given something it may not have used all of.
    parsing: bool,
    /// The parser holds no part of an event: the next read may be taken
    /// without it.
    parser_between_events: bool,
    backend: String,
    done: bool,
}

impl<B> SseData<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    /// Gives `bytes` to the parser.
    fn feed(&mut self, bytes: Bytes) {
        // Ended by a blank line, whatever came before: the parser has
        // dispatched or dropped every event it was given.
        self.parser_between_events = bytes.ends_with(b"\n\n");
        self.give(Some(bytes));
    }

    fn give(&mut self, read: Option<Bytes>) {
        self.parsing = true;
        let (_, fed) = self.parser.get_or_insert_with(|| {
            let fed = Fed::default();
            (SseByteStream::new(fed.clone()), fed)
        });
        fed.give(read);
    }

    /// A data payload: the stream's next item, or `None` for one that is
    /// skipped or ends it.
    fn payload(&mut self, data: Bytes) -> Option<Chunk> {
        if data.as_ref() == DONE {
            self.done = true;
        }
        (!self.done && !data.is_empty()).then_some(data)
    }
}

impl<B> Stream for SseData<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Item = Result<Chunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                // Past `[DONE]`, one poll only looks for the body's end,
                // which has often arrived with it: then there is nothing
                // to drain.
                if let Some(body) = this.body.as_mut() {
                    if let Poll::Ready(None | Some(Err(_))) = Pin::new(body).poll_frame(cx) {
                        this.body = None;
                    }
                }
                return Poll::Ready(None);
            }
            if !this.plain.is_empty() {
                match plain_event(&mut this.plain, this.plain_utf8) {
                    Some(data) => match this.payload(data) {
                        Some(chunk) => return Poll::Ready(Some(Ok(chunk))),
                        None => continue,
                    },
                    None => {
                        let rest = std::mem::take(&mut this.plain);
                        this.feed(rest);
                    }
                }
            }
            if let Some((parser, _)) = this.parser.as_mut().filter(|_| this.parsing) {
                match parser.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(event))) => {
                        let data = event.data.map(on_one_line);
                        if let Some(chunk) = data.and_then(|d| this.payload(d.into())) {
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let error = GatewayError::upstream_protocol(&this.backend, e);
                        return Poll::Ready(Some(Err(error)));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    // It has used all it was given.
                    Poll::Pending => this.parsing = false,
                }
            }
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if this.parser_between_events => {
                        this.plain_utf8 = simdutf8::basic::from_utf8(&data).is_ok();
                        this.plain = data;
                    }
                    Ok(data) => this.feed(data),
                    Err(_) => {}
                },
                Some(Err(BodyError(error))) => {
                    this.body = None;
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    this.body = None;
                    if this.parser.is_none() {
                        return Poll::Ready(None);
                    }
                    this.give(None);
                }
            }
        }
    }
}

/// Data sent over several `data` lines, which the parser joins with line
/// feeds, on one line: written again as one `data` line, a line feed would
/// end it. The data is JSON, where a space is the same white space.
fn on_one_line(data: String) -> String {
    if data.contains('\n') {
        data.replace('\n', " ")
    } else {
        data
    }
}

/// Cuts the first event off `read` and returns its data, when it is one
/// `data` line ended by a blank line (`data: <payload>\n\n`, or `data:`
/// with no space), its payload not empty, and valid UTF-8 (known to be
/// when the whole read is, `utf8`); otherwise leaves `read` as it is, for
/// the parser.
fn plain_event(read: &mut Bytes, utf8: bool) -> Option<Bytes> {
    let value = read.strip_prefix(b"data:")?;
    let start = 5 + usize::from(value.first() == Some(&b' '));
    let line = &read[start..];
    let end = memchr::memchr2(b'\n', b'\r', line)?;
    // An empty payload would be skipped either way; without `end == 0`
    // the compiler makes this cut 11 instructions an event longer.
    if end == 0 || line.get(end..end + 2) != Some(b"\n\n") {
        return None;
    }
    // The parser refuses a payload that is not UTF-8; so must this.
    if !utf8 {
        simdutf8::basic::from_utf8(&line[..end]).ok()?;
    }
    let data = read.slice(start..start + end);
    bytes::Buf::advance(read, start + end + 2);
    if read.is_empty() {
        // An empty slice would still hold the read's memory while the
        // stream waits for its next one.
        *read = Bytes::new();
    }
    Some(data)
}

/// What [`SseData`] gives its parser: each read not taken as it is, then
/// the body's end. The parser is polled only after it is given something,
/// until it has used it all: it then finds nothing here, and yields
/// `Pending` without a waker, and `SseData` polls the body, whose waker
/// is the task's. Shared with the parser, which owns its stream.
#[derive(Clone, Default)]
struct Fed(Arc<Mutex<Given>>);

#[derive(Default)]
struct Given {
    read: Option<Bytes>,
    ended: bool,
}

impl Fed {
    /// A read for the parser, or (`None`) the body's end.
    fn give(&self, read: Option<Bytes>) {
        let mut given = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        given.ended = read.is_none();
        given.read = read;
    }
}

impl Stream for Fed {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut given = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match given.read.take() {
            Some(read) => Poll::Ready(Some(Ok(read))),
            None if given.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl<B> Drop for SseData<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        if !self.done {
            return;
        }
        let Some(mut body) = self.body.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // To the body's end, or to its first error, which ends the
            // drain too.
            let drain = std::future::poll_fn(move |cx| {
                while let Some(Ok(_)) = ready!(Pin::new(&mut body).poll_frame(cx)) {}
                Poll::Ready(())
            });
            runtime.spawn(async move {
                let _ = tokio::time::timeout(DRAIN, drain).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::FutureExt;

    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;

    #[tokio::test]
    async fn sse_data_skips_comments_and_empty_events_and_joins_cut_ones() {
        let data = sse_text(&[
            ": keep-alive\n\ndata: {\"a\":1}\n\nda",
            "ta: {\"b\":2}\r\n\r\nevent: ping\n\n",
            "data: line one\ndata: line two\n\ndata: cut at the end",
        ])
        .await;
        assert_eq!(data, [r#"{"a":1}"#, r#"{"b":2}"#, "line one line two"]);
    }

    #[tokio::test]
    async fn sse_data_reads_every_line_end_and_field_form_the_spec_allows() {
        // A byte order mark; CR, CRLF (cut between its CR and LF) and LF
        // line ends; `data:` with no space, and with two, of which one is
        // the value's; fields other than data.
        let data = sse_text(&[
            "\u{feff}data:a\r\rdata: b\r",
            "\n\r\n",
            "data:  c\n",
            "\n",
            "id: 7\nretry: 10\nevent: x\ndata: d\n\n",
        ])
        .await;
        assert_eq!(data, ["a", "b", " c", "d"]);
    }

    #[tokio::test]
    async fn sse_data_that_is_not_utf8_is_an_invalid_response() {
        let (data, error) = sse_within(ROOMY, &[b"data: ok\n\ndata: \xff\n\n"]).await;
        assert_eq!(data, ["ok"]);
        let error = error.expect("invalid UTF-8 is refused");
        assert_eq!(error.code(), Some("upstream_invalid_response"));
        let message = error.message();
        assert!(
            message.starts_with("backend \"b\" sent an invalid response: ")
                && message.contains("invalid utf-8"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn sse_data_ends_at_done_whatever_follows() {
        let data = sse_text(&["data: {\"a\":1}\n\ndata: [DONE]\n\n", "data: {\"b\":2}\n\n"]).await;
        assert_eq!(data, [r#"{"a":1}"#]);
    }

    #[tokio::test]
    async fn a_drain_after_done_stops_at_the_bodys_first_error() {
        let polled = Arc::new(AtomicUsize::new(0));
        let done = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(
            b"data: {\"a\":1}\n\ndata: [DONE]\n\n",
        )))]);
        // Then a body that fails on every read, at once.
        let errors = futures_util::stream::repeat_with({
            let polled = polled.clone();
            move || {
                polled.fetch_add(1, Ordering::SeqCst);
                Err(std::io::Error::other("reset"))
            }
        });
        let body = StreamBody::new(done.chain(errors));
        let mut events = Box::pin(sse_data("b", ROOMY, body));
        assert_eq!(events.next().await.unwrap().unwrap(), &b"{\"a\":1}"[..]);
        assert!(events.next().await.is_none());
        drop(events);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // At [DONE], one look for the body's end; in the drain, one error.
        assert!(polled.load(Ordering::SeqCst) <= 2, "{polled:?}");
    }

    async fn sse_text(pieces: &[&'static str]) -> Vec<String> {
        let (data, error) = sse_within(
            ROOMY,
            &pieces.iter().map(|p| p.as_bytes()).collect::<Vec<_>>(),
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        data
    }

    const ROOMY: Caps = Caps {
        body: 1 << 20,
        event: 1 << 20,
    };

    /// The data of `pieces` read as SSE within `caps`, up to the error that
    /// ended it.
    async fn sse_within(caps: Caps, pieces: &[&[u8]]) -> (Vec<String>, Option<GatewayError>) {
        let frames: Vec<_> = pieces
            .iter()
            .map(|p| Ok::<_, std::io::Error>(Frame::data(Bytes::copy_from_slice(p))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut events = Box::pin(sse_data("b", caps, body));
        let mut data = Vec::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => data.push(String::from_utf8(event.to_vec()).unwrap()),
                Err(error) => return (data, Some(error)),
            }
        }
        (data, None)
    }

    /// What the parser alone makes of `text`, by the same rules: data
    /// only, none empty, each on one line, up to `[DONE]`; an error as its
    /// message.
    async fn parser_alone(text: &[u8]) -> (Vec<String>, Option<String>) {
        let read = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::copy_from_slice(text))]);
        let mut events = SseByteStream::new(read);
        let mut data = Vec::new();
        while let Some(event) = events.next().await {
            match event.map(|e| e.data) {
                Ok(Some(d)) if d == "[DONE]" => break,
                Ok(Some(d)) if !d.is_empty() => data.push(on_one_line(d)),
                Ok(_) => {}
                Err(e) => return (data, Some(e.to_string())),
            }
        }
        (data, None)
    }

    #[tokio::test]
    async fn events_taken_as_they_are_read_as_the_parser_reads_them_however_the_reads_cut_them() {
        // Plain events beside every form the parser alone reads: comments,
        // other fields, lines of one event, CR and CRLF line ends, `data:`
        // with no space and with two, an empty event, a byte order mark,
        // multi-byte text, and bytes that are not UTF-8.
        let texts: &[&[u8]] = &[
            b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\ndata: {\"c\":3}\n\n",
            b"data: a\n\n: keep-alive\n\ndata: b\n\nevent: x\ndata: c\n\ndata: d\n\n",
            b"data: a\n\ndata: one\ndata: two\n\ndata:b\n\ndata:  c\n\ndata: \n\ndata: d\n\n",
            b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\n\ndata: e\n\r\ndata: f\n\n",
            "\u{feff}data: a\n\ndata: \u{e9}t\u{e9} \u{1f600}\n\ndata: b\n".as_bytes(),
            b"data: a\n\ndata: b\xff\n\ndata: c\n\n",
            b"data: a\n\nid: 7\nretry: 10\n\ndata\n\ndata: b\n\ndata: [DONE]",
        ];
        for text in texts {
            let (expected, error) = parser_alone(text).await;
            let error = error.map(|e| format!("backend \"b\" sent an invalid response: {e}"));
            // Every cut into one, two and three reads.
            let mut cuts = vec![vec![]];
            for i in 1..text.len() {
                cuts.push(vec![i]);
                cuts.extend((i + 1..text.len()).map(|j| vec![i, j]));
            }
            for cut in cuts {
                let mut reads = Vec::new();
                let mut at = 0;
                for &end in cut.iter().chain([&text.len()]) {
                    reads.push(&text[at..end]);
                    at = end;
                }
                let (data, got) = sse_within(ROOMY, &reads).await;
                let shown = String::from_utf8_lossy(text);
                assert_eq!(data, expected, "{shown:?} read as {cut:?}");
                assert_eq!(
                    got.map(|e| e.message().to_owned()),
                    error,
                    "{shown:?} read as {cut:?}"
                );
            }
        }
    }

    /// A random SSE body: mostly plain events, as every OpenAI-compatible
    /// server writes them, among every other form the spec allows.
    fn random_sse(rng: &mut fastrand::Rng) -> Vec<u8> {
        const TEXT: &[&str] = &[
            "{\"a\":1}",
            "data: ",
            "data:",
            " ",
            "x",
            ":",
            "\\",
            "\"",
            "\u{e9}",
            "\u{1f600}",
            "\r",
            "\n",
            "[DONE]",
            "\u{feff}",
        ];
        const END: &[&str] = &["\n", "\r", "\r\n"];
        let mut body = Vec::new();
        if rng.u8(..16) == 0 {
            body.extend("\u{feff}".as_bytes());
        }
        for _ in 0..rng.usize(1..12) {
            let line = |rng: &mut fastrand::Rng, body: &mut Vec<u8>| {
                for _ in 0..rng.usize(..5) {
                    body.extend(TEXT[rng.usize(..TEXT.len())].as_bytes());
                }
                if rng.u8(..64) == 0 {
                    body.push(0xff);
                }
            };
            match rng.u8(..8) {
                // A plain event; its payload may still hold a CR or LF.
                0..=4 => {
                    body.extend(b"data: ");
                    line(rng, &mut body);
                    body.extend(b"\n\n");
                }
                5 => {
                    body.extend(
                        [&b": ping"[..], b"event: x", b"id: 7", b"data", b"retry: 5"]
                            [rng.usize(..5)],
                    );
                    body.extend(END[rng.usize(..3)].as_bytes());
                }
                6 => {
                    body.extend([&b"data:"[..], b"data: ", b"data:  "][rng.usize(..3)]);
                    line(rng, &mut body);
                    body.extend(END[rng.usize(..3)].as_bytes());
                }
                _ => body.extend(END[rng.usize(..3)].as_bytes()),
            }
        }
        body
    }

    #[tokio::test]
    async fn random_bodies_in_random_reads_give_what_the_parser_alone_gives() {
        let mut rng = fastrand::Rng::with_seed(23);
        for _ in 0..10_000 {
            let text = random_sse(&mut rng);
            let (expected, error) = parser_alone(&text).await;
            let error = error.map(|e| format!("backend \"b\" sent an invalid response: {e}"));
            let mut cuts: Vec<usize> = (0..rng.usize(..5))
                .map(|_| rng.usize(..=text.len()))
                .collect();
            cuts.sort_unstable();
            let mut reads = Vec::new();
            let mut at = 0;
            for end in cuts.into_iter().chain([text.len()]) {
                reads.push(&text[at..end]);
                at = end;
            }
            let (data, got) = sse_within(ROOMY, &reads).await;
            let shown = String::from_utf8_lossy(&text);
            assert_eq!(data, expected, "{shown:?} read as {reads:?}");
            assert_eq!(
                got.map(|e| e.message().to_owned()),
                error,
                "{shown:?} read as {reads:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_next_read_holds_none_of_the_last() {
        struct Read(Arc<AtomicUsize>);
        impl AsRef<[u8]> for Read {
            fn as_ref(&self) -> &[u8] {
                b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n"
            }
        }
        impl Drop for Read {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let read = Bytes::from_owner(Read(dropped.clone()));
        let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(read))])
            .chain(futures_util::stream::pending());
        let mut events = sse_data("b", ROOMY, StreamBody::new(frames));
        assert_eq!(events.next().await.unwrap().unwrap(), &b"{\"a\":1}"[..]);
        assert_eq!(events.next().await.unwrap().unwrap(), &b"{\"b\":2}"[..]);
        assert!(
            events.next().now_or_never().is_none(),
            "waits for the next read"
        );
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the last read is let go");
    }

    #[tokio::test]
    async fn plain_events_are_slices_of_the_read_they_came_in() {
        let read = Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n: ping\n\n");
        let body = StreamBody::new(futures_util::stream::iter([Ok::<_, Infallible>(
            Frame::data(read.clone()),
        )]));
        let events: Vec<Chunk> = sse_data("b", ROOMY, body)
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(events, [&b"{\"a\":1}"[..], b"{\"b\":2}"]);
        for event in events {
            let within = read.as_ptr_range();
            assert!(within.contains(&event.as_ptr()), "copied, not sliced");
        }
    }

    #[tokio::test]
    async fn an_sse_event_over_the_event_cap_fails_whatever_the_reads() {
        let caps = Caps {
            body: 1 << 20,
            event: 64,
        };
        let big = format!("data: {}\n\n", "x".repeat(100));
        let small = b"data: ok\n\n";
        // In one read with a small event after it; or cut in pieces.
        let (data, error) =
            sse_within(caps, &[small, format!("{big}data: no\n\n").as_bytes()]).await;
        assert_eq!(data, ["ok"]);
        let error = error.expect("the big event is refused");
        assert_eq!(error.code(), Some("upstream_response_too_large"));
        assert_eq!(
            error.message(),
            "backend \"b\" sent an SSE event larger than max_event_bytes (64 bytes)"
        );
        let pieces: Vec<&[u8]> = big.as_bytes().chunks(10).collect();
        let (data, error) = sse_within(caps, &pieces).await;
        assert!(data.is_empty());
        assert!(error.is_some());
        // Many small events, together far over the event cap, pass.
        let many = "data: ok\n\n".repeat(50);
        let (data, error) = sse_within(caps, &[many.as_bytes()]).await;
        assert_eq!(
            (data.len(), error.map(|e| e.message().to_owned())),
            (50, None)
        );
    }

    #[tokio::test]
    async fn a_stream_over_the_body_cap_fails_after_the_events_within_it() {
        let caps = Caps {
            body: 100,
            event: 100,
        };
        let event: &[u8] = b"data: 0123456789\n\n";
        let (data, error) = sse_within(caps, &[event; 8]).await;
        // 18 bytes an event: five fit in 100.
        assert_eq!(data.len(), 5);
        assert_eq!(
            error.expect("the sixth read passes the cap").message(),
            "backend \"b\" sent a response body larger than max_response_bytes (100 bytes)"
        );
    }
}
