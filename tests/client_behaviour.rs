//! What a client sees must not depend on the kind of backend that serves
//! it. Each behaviour here is one test body, run against an
//! OpenAI-compatible (vLLM), a Bedrock and a TGI deployment, each backed
//! by its protocol's mock on 127.0.0.1: answers whole and streamed, the
//! usage chunk on request only, tool calls, errors before and after the
//! first byte, and a client that goes away.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::bedrock_mock;
use support::gateway::*;
use support::kinds::{COMPLETION_TOKENS, Kind, for_each_kind, start_for};
use support::openai_mock::{CANNED_PROMPT_TOKENS, TOOL_CALL_ID, TOOL_NAME};

fn chat(stream: bool, include_usage: Option<bool>) -> Value {
    let mut body =
        json!({"model": "chat", "messages": user("Hello"), "stream": stream, "max_tokens": 16});
    if let Some(include) = include_usage {
        body["stream_options"] = json!({"include_usage": include});
    }
    body
}

fn with_tools(mut body: Value) -> Value {
    body["tools"] = json!([{"type": "function", "function": {"name": TOOL_NAME, "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    body
}

fn expected_usage() -> Value {
    json!({"prompt_tokens": CANNED_PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
           "total_tokens": CANNED_PROMPT_TOKENS + COMPLETION_TOKENS})
}

/// The chunks of a finished stream (without `[DONE]`, checked to be last).
async fn chunks(events: Events) -> Vec<Value> {
    let mut payloads = events.rest().await;
    assert_eq!(
        payloads.pop().as_deref(),
        Some("[DONE]"),
        "a stream ends with [DONE]"
    );
    payloads.iter().map(|p| parse(p)).collect()
}

fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn finish_reason(chunks: &[Value]) -> Option<&str> {
    chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
}

async fn a_whole_answer_is_an_openai_chat_completion_with_exact_usage(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let response = gateway.chat(chat(false, None)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "up");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "tok tok tok ");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(body["usage"], expected_usage());
    gateway
        .eventually_exact_output_tokens("chat", "chat", "up", COMPLETION_TOKENS)
        .await;
    assert_eq!(upstream.hits(), 1);
}

async fn a_stream_has_no_usage_chunk_unless_asked(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    for include_usage in [None, Some(false)] {
        let (_, events) = gateway
            .stream("/v1/chat/completions", chat(true, include_usage))
            .await;
        let chunks = chunks(events).await;
        assert_eq!(content(&chunks), "tok tok tok ");
        assert_eq!(finish_reason(&chunks), Some("stop"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks.iter().all(|c| c["object"] == "chat.completion.chunk"
                && c["choices"].as_array().is_some_and(|c| !c.is_empty())),
            "no usage-only chunk: {chunks:#?}"
        );
    }
    // Usage is metered exactly all the same.
    gateway
        .eventually_exact_output_tokens("chat", "chat", "up", 2 * COMPLETION_TOKENS)
        .await;
}

async fn a_stream_ends_with_the_usage_chunk_when_asked(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let (_, events) = gateway
        .stream("/v1/chat/completions", chat(true, Some(true)))
        .await;
    let chunks = chunks(events).await;
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], expected_usage());
    assert_eq!(content(&chunks), "tok tok tok ");
    let id = &chunks[0]["id"];
    assert!(id.as_str().is_some_and(|id| !id.is_empty()));
    assert!(
        chunks.iter().all(|c| &c["id"] == id),
        "one id for the whole stream: {chunks:#?}"
    );
    assert_eq!(chunks.iter().filter(|c| c["usage"].is_object()).count(), 1);
}

async fn tool_calls_come_back_as_openai_tool_calls(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let body: Value = gateway
        .chat(with_tools(chat(false, None)))
        .await
        .json()
        .await
        .unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], TOOL_CALL_ID);
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], TOOL_NAME);
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));

    let (_, events) = gateway
        .stream("/v1/chat/completions", with_tools(chat(true, None)))
        .await;
    let chunks = chunks(events).await;
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]
                .as_object()
                .map(|_| &c["choices"][0]["delta"]["tool_calls"][0])
        })
        .collect();
    assert_eq!(calls[0]["id"], TOOL_CALL_ID);
    assert_eq!(calls[0]["function"]["name"], TOOL_NAME);
    assert!(calls.iter().all(|c| c["index"] == 0));
    let streamed: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(finish_reason(&chunks), Some("tool_calls"));
}

async fn upstream_errors_become_openai_errors_with_the_right_status(kind: Kind) {
    let limited = kind.rate_limited(kind.mock()).start().await;
    let gateway = start_for(kind, &limited).await;
    // The second is the gateway's own: the first's 429 cools the only
    // deployment for the backoff it says.
    for stream in [false, true] {
        let response = gateway.chat(chat(stream, None)).await;
        assert_eq!(response.status(), 429, "stream: {stream}");
        assert_eq!(response.headers()["retry-after"], "1", "stream: {stream}");
        let error = error_of(response).await;
        assert_eq!(error["code"], "rate_limit_exceeded");
        assert_eq!(error["type"], "rate_limit_error");
    }

    let (mock, status) = kind.rejecting(kind.mock());
    let rejecting = mock.start().await;
    let gateway = start_for(kind, &rejecting).await;
    let response = gateway.chat(chat(false, None)).await;
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert!(message(&error).contains("bad input words"), "{error}");
}

async fn a_failure_after_the_first_byte_is_an_error_event_then_done(kind: Kind) {
    let upstream = kind.mock().reset_after(2).start().await;
    let gateway = start_for(kind, &upstream).await;
    let (_, events) = gateway
        .stream("/v1/chat/completions", chat(true, Some(true)))
        .await;
    let mut payloads = events.rest().await;
    assert_eq!(payloads.pop().as_deref(), Some("[DONE]"));
    let error = parse(&payloads.pop().expect("an error event"));
    check_error_shape(&error);
    assert_eq!(error["error"]["type"], "upstream_error", "{error}");
    assert!(!payloads.is_empty() && payloads.iter().all(|p| parse(p)["choices"].is_array()));
}

async fn a_client_that_goes_away_closes_the_upstream_connection(kind: Kind) {
    let upstream = kind.mock().hold_after(2).start().await;
    let gateway = start_for(kind, &upstream).await;
    let (_, mut events) = gateway
        .stream("/v1/chat/completions", chat(true, None))
        .await;
    assert!(events.next().await.is_some(), "the first chunk arrives");
    drop(events);
    assert!(
        upstream.wait_peer_closed(1, Duration::from_secs(5)).await,
        "the gateway closed the upstream connection"
    );
}

for_each_kind!(
    a_whole_answer_is_an_openai_chat_completion_with_exact_usage,
    a_stream_has_no_usage_chunk_unless_asked,
    a_stream_ends_with_the_usage_chunk_when_asked,
    tool_calls_come_back_as_openai_tool_calls,
    upstream_errors_become_openai_errors_with_the_right_status,
    a_failure_after_the_first_byte_is_an_error_event_then_done,
    a_client_that_goes_away_closes_the_upstream_connection,
);

#[test]
fn the_bedrock_mock_frames_are_the_verified_ones() {
    // The mock's messageStart frame, without Bedrock's padding, is
    // byte for byte the one PROTOCOLS.md 4.5 verified against botocore.
    let frame = bedrock_mock::frame("event", "messageStart", &json!({"role": "assistant"}));
    assert_eq!(
        hex::encode(frame),
        "000000760000005296d5fade0b3a6576656e742d7479706507000c6d65737361676553746172740d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b22726f6c65223a22617373697374616e74227d6fa8c599"
    );
}
