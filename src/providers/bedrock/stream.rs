//! ConverseStream: the AWS event-stream body, decoded frame by frame as
//! bytes arrive (`aws-smithy-eventstream`), and its events turned into
//! OpenAI chunks. Usage comes from the `metadata` event, last, as a
//! usage-only chunk.

use std::collections::HashMap;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors;
use super::response::{TokenUsage, finish_reason, matched_stop};
use crate::error::GatewayError;
use crate::openai::{Endpoint, ResponseIdentity};
use crate::providers::http::Caps;
use crate::providers::translate::{ChunkMapper, Chunks, map_chunks};
use crate::providers::{Chunk, ChunkStream};

/// The chunks of a ConverseStream response body, whose frames may each
/// hold at most `caps.event` bytes (its total is `body`'s to bound).
pub fn chunks(
    backend: &str,
    model: &str,
    stop: Option<String>,
    caps: Caps,
    body: impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'static,
) -> ChunkStream {
    map_chunks(
        frames(backend, caps, body),
        Mapper {
            backend: backend.to_owned(),
            identity: ResponseIdentity::new("chatcmpl", model),
            tools: HashMap::new(),
            stopped: false,
            stop,
        },
    )
}

/// The event-stream messages of a body; a frame may arrive in any number
/// of pieces, and one piece may hold several frames. A bad CRC, a broken
/// connection, a body that ends inside a frame or a frame longer than
/// `caps.event` is an error.
fn frames(
    backend: &str,
    caps: Caps,
    body: impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'static,
) -> BoxStream<'static, Result<Message, GatewayError>> {
    struct State<S> {
        body: S,
        decoder: MessageFrameDecoder,
        buffer: BytesMut,
        /// Bytes of an unfinished frame have been read.
        partial: bool,
        /// The length the buffered frame declares has been checked.
        length_checked: bool,
        caps: Caps,
        backend: String,
        done: bool,
    }
    let state = State {
        body: Box::pin(body),
        decoder: MessageFrameDecoder::new(),
        buffer: BytesMut::new(),
        partial: false,
        length_checked: false,
        caps,
        backend: backend.to_owned(),
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            // A frame starts with its total length: one over the cap is
            // refused before its bytes are buffered. Checked before the
            // decoder consumes the 12-byte prelude that holds it.
            if !s.length_checked && s.buffer.len() >= 4 {
                s.length_checked = true;
                let length =
                    u32::from_be_bytes([s.buffer[0], s.buffer[1], s.buffer[2], s.buffer[3]]);
                if u64::from(length) > s.caps.event {
                    s.done = true;
                    let what = format!("began an event-stream frame of {length} bytes,");
                    return Some((Err(s.caps.event_too_large(&s.backend, what)), s));
                }
            }
            match s.decoder.decode_frame(&mut s.buffer) {
                Ok(DecodedFrame::Complete(message)) => {
                    s.partial = !s.buffer.is_empty();
                    s.length_checked = false;
                    return Some((Ok(message), s));
                }
                Ok(DecodedFrame::Incomplete) => {}
                Err(e) => {
                    s.done = true;
                    let error = GatewayError::upstream_protocol(
                        &s.backend,
                        format_args!("a bad event-stream frame: {e}"),
                    );
                    return Some((Err(error), s));
                }
            }
            match s.body.next().await {
                Some(Ok(bytes)) => {
                    s.partial = true;
                    s.buffer.extend_from_slice(&bytes);
                }
                Some(Err(error)) => {
                    s.done = true;
                    return Some((Err(error), s));
                }
                None if s.partial => {
                    s.done = true;
                    let error = GatewayError::upstream_protocol(
                        &s.backend,
                        "the stream ended in the middle of an event-stream frame",
                    );
                    return Some((Err(error), s));
                }
                None => return None,
            }
        }
    })
    .boxed()
}

struct Mapper {
    backend: String,
    identity: ResponseIdentity,
    /// Bedrock's `contentBlockIndex` of each tool use → its OpenAI
    /// `tool_calls` index, and whether any of its input has come.
    tools: HashMap<u64, (usize, bool)>,
    stopped: bool,
    /// The request's one stop sequence, named when Converse stops on it.
    stop: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockEvent {
    #[serde(default)]
    content_block_index: u64,
    #[serde(default)]
    start: Option<Value>,
    #[serde(default)]
    delta: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StopEvent {
    stop_reason: String,
}

#[derive(Deserialize)]
struct MetadataEvent {
    usage: TokenUsage,
}

fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| h.value().as_string().ok())
        .map(|s| s.as_str())
}

impl Mapper {
    fn event(&mut self, kind: &str, payload: &[u8]) -> Result<Option<Vec<u8>>, GatewayError> {
        let parse_error = |e: serde_json::Error| {
            GatewayError::upstream_protocol(&self.backend, format_args!("a bad {kind} event: {e}"))
        };
        Ok(match kind {
            "messageStart" => Some(
                self.identity
                    .chat_chunk(&json!({"role": "assistant", "content": ""}), None),
            ),
            "contentBlockStart" => {
                let event: BlockEvent = serde_json::from_slice(payload).map_err(parse_error)?;
                let Some(tool) = event.start.as_ref().and_then(|s| s.get("toolUse")) else {
                    return Ok(None);
                };
                let index = self.tools.len();
                self.tools.insert(event.content_block_index, (index, false));
                Some(self.identity.chat_chunk(&json!({"tool_calls": [{"index": index, "id": tool.get("toolUseId"), "type": "function",
                        "function": {"name": tool.get("name"), "arguments": ""}}]}),
                    None,
                ))
            }
            "contentBlockDelta" => {
                let event: BlockEvent = serde_json::from_slice(payload).map_err(parse_error)?;
                let delta = event.delta.unwrap_or_default();
                if let Some(text) = delta.get("text").and_then(Value::as_str) {
                    Some(self.identity.chat_chunk(&json!({"content": text}), None))
                } else if let Some(input) = delta.pointer("/toolUse/input").and_then(Value::as_str)
                {
                    let index = match self.tools.get_mut(&event.content_block_index) {
                        Some((index, had_input)) => {
                            *had_input |= !input.is_empty();
                            *index
                        }
                        None => 0,
                    };
                    Some(self.identity.chat_chunk(&json!({"tool_calls": [{"index": index, "function": {"arguments": input}}]}),
                        None,
                    ))
                } else if let Some(text) = delta
                    .pointer("/reasoningContent/text")
                    .and_then(Value::as_str)
                {
                    // Where vLLM streams a reasoning model's reasoning.
                    Some(
                        self.identity
                            .chat_chunk(&json!({"reasoning_content": text}), None),
                    )
                } else {
                    // A reasoning signature or redacted reasoning, and
                    // citations, have no OpenAI chunk.
                    None
                }
            }
            "messageStop" => {
                let event: StopEvent = serde_json::from_slice(payload).map_err(parse_error)?;
                self.stopped = true;
                Some(self.identity.chat_chunk_stopped(
                    &json!({}),
                    Some(finish_reason(&event.stop_reason)),
                    matched_stop(&event.stop_reason, self.stop.as_deref()),
                ))
            }
            "metadata" => {
                let event: MetadataEvent = serde_json::from_slice(payload).map_err(parse_error)?;
                Some(
                    self.identity
                        .usage_chunk(Endpoint::Chat, event.usage.into()),
                )
            }
            // A tool call without arguments has input `{}` whole, and none
            // streamed: its arguments are that object, as OpenAI's are.
            "contentBlockStop" => {
                let event: BlockEvent = serde_json::from_slice(payload).map_err(parse_error)?;
                match self.tools.get(&event.content_block_index) {
                    Some(&(index, false)) => Some(self.identity.chat_chunk(
                        &json!({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]}),
                        None,
                    )),
                    _ => None,
                }
            }
            // Events added to the API later.
            _ => None,
        })
    }
}

impl ChunkMapper for Mapper {
    type Event = Message;

    fn map(&mut self, message: Message, out: &mut Chunks) {
        let result = match header(&message, ":message-type") {
            Some("event") => {
                let kind = header(&message, ":event-type").unwrap_or_default();
                self.event(kind, message.payload())
                    .map(|chunk| chunk.map(Chunk::from))
            }
            Some("exception") => Err(errors::exception(
                &self.backend,
                header(&message, ":exception-type").unwrap_or_default(),
                StatusCode::INTERNAL_SERVER_ERROR,
                message.payload(),
                None,
            )),
            _ => Err(errors::exception(
                &self.backend,
                header(&message, ":error-code").unwrap_or_default(),
                StatusCode::INTERNAL_SERVER_ERROR,
                header(&message, ":error-message")
                    .unwrap_or_default()
                    .as_bytes(),
                None,
            )),
        };
        match result {
            Ok(Some(chunk)) => out.push(Ok(chunk)),
            Ok(None) => {}
            Err(error) => out.push(Err(error)),
        }
    }

    fn end(&mut self) -> Result<(), GatewayError> {
        if self.stopped {
            Ok(())
        } else {
            Err(GatewayError::upstream_broken(&self.backend))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ConverseStream frames, CRCs included, that botocore decodes to the
    /// same events (the last one as a `throttlingException`).
    const MESSAGE_START: &str = "000000760000005296d5fade0b3a6576656e742d7479706507000c6d65737361676553746172740d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b22726f6c65223a22617373697374616e74227d6fa8c599";
    const DELTA_HI: &str = "0000009400000057b4ab9aee0b3a6576656e742d74797065070011636f6e74656e74426c6f636b44656c74610d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b22636f6e74656e74426c6f636b496e646578223a302c2264656c7461223a7b2274657874223a224869227d7d1f944657";
    const BLOCK_STOP: &str = "0000007d00000056e6680fd60b3a6576656e742d74797065070010636f6e74656e74426c6f636b53746f700d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b22636f6e74656e74426c6f636b496e646578223a307db32e4d34";
    const MESSAGE_STOP: &str = "0000007a00000051ca2c46650b3a6576656e742d7479706507000b6d65737361676553746f700d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b2273746f70526561736f6e223a22656e645f7475726e227d5fbf09fc";
    const METADATA: &str = "000000b80000004ed4f1f02b0b3a6576656e742d747970650700086d657461646174610d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b227573616765223a7b22696e707574546f6b656e73223a31302c226f7574707574546f6b656e73223a322c22746f74616c546f6b656e73223a31327d2c226d657472696373223a7b226c6174656e63794d73223a3132337d7dc4f6cca0";
    const THROTTLED: &str = "00000090000000618e91a9b70f3a657863657074696f6e2d747970650700137468726f74746c696e67457863657074696f6e0d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d74797065070009657863657074696f6e7b226d657373616765223a22546f6f206d616e79207265717565737473227de67f8005";

    fn bytes(frames: &[&str]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| hex::decode(f).unwrap())
            .collect()
    }

    /// Feeds `body` in pieces of `size` bytes; returns the chunks as JSON
    /// and the error that ended the stream, if any.
    async fn run(body: Vec<u8>, size: usize) -> (Vec<Value>, Option<GatewayError>) {
        run_with(body, size, 1 << 20).await
    }

    /// `run`, with frames of at most `max_frame` bytes.
    async fn run_with(
        body: Vec<u8>,
        size: usize,
        max_frame: u64,
    ) -> (Vec<Value>, Option<GatewayError>) {
        let pieces: Vec<Result<Bytes, GatewayError>> = body
            .chunks(size)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        let caps = Caps {
            body: u64::MAX,
            event: max_frame,
        };
        let mut out = chunks("b", "m", None, caps, stream::iter(pieces));
        let mut values = Vec::new();
        while let Some(item) = out.next().await {
            match item {
                Ok(chunk) => values.push(serde_json::from_slice(&chunk).unwrap()),
                Err(e) => return (values, Some(e)),
            }
        }
        (values, None)
    }

    #[tokio::test]
    async fn frames_become_openai_chunks_however_the_bytes_are_cut() {
        let body = bytes(&[MESSAGE_START, DELTA_HI, BLOCK_STOP, MESSAGE_STOP, METADATA]);
        for size in [1, 7, 118, 200, body.len()] {
            let (chunks, error) = run(body.clone(), size).await;
            assert!(error.is_none(), "pieces of {size}: {error:?}");
            assert_eq!(chunks.len(), 4, "pieces of {size}");
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
            assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
            assert_eq!(chunks[3]["choices"], json!([]));
            assert_eq!(
                chunks[3]["usage"],
                json!({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
            );
            assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
        }
    }

    #[tokio::test]
    async fn an_exception_frame_ends_the_stream_with_its_error() {
        let (chunks, error) = run(bytes(&[MESSAGE_START, DELTA_HI, THROTTLED]), 50).await;
        assert_eq!(chunks.len(), 2);
        let error = error.expect("an error");
        assert_eq!(error.status(), 429);
        assert!(
            error.message().contains("Too many requests"),
            "{}",
            error.message()
        );
    }

    #[tokio::test]
    async fn a_cut_frame_a_bad_crc_and_a_missing_stop_are_errors() {
        let mut body = bytes(&[MESSAGE_START, DELTA_HI]);
        let cut = body.len() - 3;
        let (_, error) = run(body[..cut].to_vec(), 10).await;
        assert!(
            error
                .unwrap()
                .message()
                .contains("middle of an event-stream frame")
        );

        let last = body.len() - 1;
        body[last] ^= 1;
        let (chunks, error) = run(body, 1000).await;
        assert_eq!(chunks.len(), 1);
        assert!(error.unwrap().message().contains("bad event-stream frame"));

        let (_, error) = run(bytes(&[MESSAGE_START, DELTA_HI]), 1000).await;
        assert_eq!(error.unwrap().code(), Some("upstream_disconnected"));
    }

    #[tokio::test]
    async fn a_frame_longer_than_the_event_cap_is_refused_by_its_declared_length() {
        // DELTA_HI declares 0x94 = 148 bytes; MESSAGE_START 0x76 = 118.
        let body = bytes(&[MESSAGE_START, DELTA_HI, MESSAGE_STOP]);
        for size in [1, 3, 5, 200, body.len()] {
            let (chunks, error) = run_with(body.clone(), size, 140).await;
            assert_eq!(chunks.len(), 1, "pieces of {size}");
            let error = error.expect("an error");
            assert_eq!(error.code(), Some("upstream_response_too_large"));
            assert_eq!(
                error.message(),
                "backend \"b\" began an event-stream frame of 148 bytes, larger than max_event_bytes (140 bytes)"
            );
        }
        let (chunks, error) = run_with(body, 7, 148).await;
        assert!(error.is_none(), "a frame at the cap passes: {error:?}");
        assert_eq!(chunks.len(), 3);
    }

    fn mapper(stop: Option<&str>) -> Mapper {
        Mapper {
            backend: "b".into(),
            identity: ResponseIdentity::new("chatcmpl", "m"),
            tools: HashMap::new(),
            stopped: false,
            stop: stop.map(str::to_owned),
        }
    }

    #[test]
    fn a_streamed_tool_call_without_input_has_arguments_of_an_empty_object() {
        let mut mapper = mapper(None);
        let mut arguments = |events: &[(&str, &str)]| {
            let mut text = String::new();
            for (kind, payload) in events {
                if let Some(chunk) = mapper.event(kind, payload.as_bytes()).unwrap() {
                    let chunk: Value = serde_json::from_slice(&chunk).unwrap();
                    let call = &chunk["choices"][0]["delta"]["tool_calls"][0];
                    text += call["function"]["arguments"].as_str().unwrap_or_default();
                }
            }
            text
        };
        let start = |block: u64| {
            format!(
                r#"{{"contentBlockIndex":{block},"start":{{"toolUse":{{"toolUseId":"t{block}","name":"now"}}}}}}"#
            )
        };
        let stop = |block: u64| format!(r#"{{"contentBlockIndex":{block}}}"#);
        let (start0, stop0) = (start(0), stop(0));
        let empty = r#"{"contentBlockIndex":0,"delta":{"toolUse":{"input":""}}}"#;
        assert_eq!(
            arguments(&[("contentBlockStart", &start0), ("contentBlockStop", &stop0)]),
            "{}"
        );
        let (start1, stop1) = (start(1), stop(1));
        let input = r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"a\":1}"}}}"#;
        assert_eq!(
            arguments(&[
                ("contentBlockStart", &start1),
                ("contentBlockDelta", input),
                ("contentBlockStop", &stop1)
            ]),
            r#"{"a":1}"#
        );
        let (start2, stop2) = (start(2), stop(2));
        let empty2 = empty.replace("Index\":0", "Index\":2");
        assert_eq!(
            arguments(&[
                ("contentBlockStart", &start2),
                ("contentBlockDelta", &empty2),
                ("contentBlockStop", &stop2)
            ]),
            "{}"
        );
    }

    #[test]
    fn a_stop_on_the_requests_one_stop_sequence_names_it() {
        let mapper = |stop: Option<&str>, reason: &str| {
            let mut mapper = mapper(stop);
            let payload = format!(r#"{{"stopReason":"{reason}"}}"#);
            let chunk = mapper
                .event("messageStop", payload.as_bytes())
                .unwrap()
                .unwrap();
            serde_json::from_slice::<Value>(&chunk).unwrap()["choices"][0].clone()
        };
        let choice = mapper(Some("END"), "stop_sequence");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["stop_reason"], "END");
        assert!(mapper(None, "stop_sequence").get("stop_reason").is_none());
        assert!(mapper(Some("END"), "end_turn").get("stop_reason").is_none());
    }
}
