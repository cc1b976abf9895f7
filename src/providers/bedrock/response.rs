//! Bedrock `ConverseResponse` → OpenAI `chat.completion`, and the OpenAI
//! shapes the stream mapper writes: chunks, finish reasons, usage.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::openai::ResponseIdentity;
use crate::openai::{PromptTokensDetails, Usage};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseResponse {
    output: Output,
    stop_reason: String,
    usage: TokenUsage,
}

#[derive(Debug, Deserialize)]
struct Output {
    message: OutputMessage,
}

#[derive(Debug, Deserialize)]
struct OutputMessage {
    #[serde(default)]
    content: Vec<OutputBlock>,
}

/// One `ContentBlock`; members other than text, toolUse and
/// reasoningContent (citations…) are read as none of them and skipped.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutputBlock {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<ToolUse>,
    #[serde(default)]
    reasoning_content: Option<ReasoningBlock>,
}

/// A `ReasoningContentBlock`: the model's reasoning as text (with the
/// signature that lets it be sent back), or redacted, which has no text.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReasoningBlock {
    #[serde(default)]
    reasoning_text: Option<ReasoningText>,
}

#[derive(Debug, Deserialize)]
struct ReasoningText {
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUse {
    tool_use_id: String,
    name: String,
    #[serde(default)]
    input: Value,
}

/// Converse's usage: `inputTokens` leaves out the prompt tokens read from
/// or written to the prompt cache, which come apart when caching is used.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_write_input_tokens: Option<u64>,
}

impl From<TokenUsage> for Usage {
    /// The whole prompt, with the cache's reads as OpenAI's cached tokens
    /// and its writes beside them.
    fn from(u: TokenUsage) -> Self {
        let (read, written) = (u.cache_read_input_tokens, u.cache_write_input_tokens);
        let prompt = u
            .input_tokens
            .saturating_add(read.unwrap_or(0))
            .saturating_add(written.unwrap_or(0));
        let mut usage = Usage::new(prompt, u.output_tokens);
        usage.prompt_tokens_details =
            (read.is_some() || written.is_some()).then(|| PromptTokensDetails {
                cached_tokens: read.unwrap_or(0),
                cache_write_tokens: written.unwrap_or(0),
            });
        usage
    }
}

/// Bedrock's `stopReason` as an OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "guardrail_intervened" | "content_filtered" => "content_filter",
        // end_turn, stop_sequence, and the malformed_* outcomes: the model
        // stopped; there is no closer OpenAI value.
        _ => "stop",
    }
}

/// The stop sequence that ended an answer Converse stopped with
/// `stop_sequence`: Converse does not say which of the request's it
/// matched, so it is known when the request sent one.
pub fn matched_stop<'r>(stop_reason: &str, stops: Option<&'r str>) -> Option<&'r str> {
    stops.filter(|_| stop_reason == "stop_sequence")
}

/// The `chat.completion` for a Converse response body; `stop`: the
/// request's one stop sequence, if it sent one.
pub fn chat_completion(
    backend: &str,
    model: &str,
    body: &[u8],
    stop: Option<&str>,
) -> Result<Bytes, GatewayError> {
    let response: ConverseResponse = serde_json::from_slice(body).map_err(|e| {
        GatewayError::upstream_protocol(backend, format_args!("not a Converse response: {e}"))
    })?;
    let identity = ResponseIdentity::new("chatcmpl", model);
    let blocks = response.output.message.content;
    let text: String = blocks.iter().filter_map(|b| b.text.as_deref()).collect();
    let tool_calls: Vec<Value> = blocks
        .iter()
        .filter_map(|b| b.tool_use.as_ref())
        .map(|t| {
            json!({"id": t.tool_use_id, "type": "function",
                   "function": {"name": t.name, "arguments": t.input.to_string()}})
        })
        .collect();
    let reasoning: String = blocks
        .iter()
        .filter_map(|b| b.reasoning_content.as_ref()?.reasoning_text.as_ref())
        .map(|r| r.text.as_str())
        .collect();
    let mut message = json!({"role": "assistant", "content": text, "refusal": null});
    // Where vLLM puts a reasoning model's reasoning: never in the answer.
    if !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    if !tool_calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(tool_calls);
    }
    Ok(Bytes::from(identity.chat_completion(
        &message,
        finish_reason(&response.stop_reason),
        matched_stop(&response.stop_reason, stop),
        response.usage.into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_tool_calls_stop_reason_and_usage_become_an_openai_completion() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[
            {"text":"Let me check."},{"toolUse":{"toolUseId":"t1","name":"get_weather","input":{"city":"Paris"}}}]}},
            "stopReason":"tool_use","usage":{"inputTokens":1620,"outputTokens":6,"totalTokens":1626},
            "metrics":{"latencyMs":812}}"#;
        let out: Value =
            serde_json::from_slice(&chat_completion("b", "meta.llama", body, None).unwrap())
                .unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["model"], "meta.llama");
        let choice = &out["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Let me check.");
        assert_eq!(
            choice["message"]["tool_calls"][0],
            json!({"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})
        );
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 1620, "completion_tokens": 6, "total_tokens": 1626})
        );
    }

    #[test]
    fn reasoning_becomes_reasoning_content_never_text() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[
            {"reasoningContent":{"reasoningText":{"text":"The user greets; ","signature":"sig"}}},
            {"reasoningContent":{"redactedContent":"b64"}},
            {"reasoningContent":{"reasoningText":{"text":"answer briefly."}}},
            {"text":"Hello!"}]}},
            "stopReason":"end_turn","usage":{"inputTokens":9,"outputTokens":12,"totalTokens":21}}"#;
        let out: Value =
            serde_json::from_slice(&chat_completion("b", "m", body, None).unwrap()).unwrap();
        let message = &out["choices"][0]["message"];
        assert_eq!(message["content"], "Hello!");
        assert_eq!(
            message["reasoning_content"],
            "The user greets; answer briefly."
        );
    }

    #[test]
    fn stop_reasons_become_openai_finish_reasons() {
        for (bedrock, openai) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("content_filtered", "content_filter"),
        ] {
            assert_eq!(finish_reason(bedrock), openai);
        }
    }

    #[test]
    fn a_body_that_is_not_a_converse_response_is_a_protocol_error() {
        let error = chat_completion("b", "m", b"{}", None).unwrap_err();
        assert_eq!(error.code(), Some("upstream_invalid_response"));
    }

    #[test]
    fn cache_reads_and_writes_count_in_the_prompt_and_reads_as_cached() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hi"}]}},
            "stopReason":"end_turn","usage":{"inputTokens":10,"outputTokens":2,"totalTokens":1112,
            "cacheReadInputTokens":1000,"cacheWriteInputTokens":100}}"#;
        let out: Value =
            serde_json::from_slice(&chat_completion("b", "m", body, None).unwrap()).unwrap();
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 1110, "completion_tokens": 2, "total_tokens": 1112,
                "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 100}})
        );
    }

    #[test]
    fn a_stop_on_the_requests_one_stop_sequence_names_it() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hi"}]}},
            "stopReason":"stop_sequence","usage":{"inputTokens":3,"outputTokens":1,"totalTokens":4}}"#;
        let choice = |stop| {
            let out: Value =
                serde_json::from_slice(&chat_completion("b", "m", body, stop).unwrap()).unwrap();
            out["choices"][0].clone()
        };
        assert_eq!(choice(Some("END"))["stop_reason"], "END");
        assert_eq!(choice(Some("END"))["finish_reason"], "stop");
        assert!(choice(None).get("stop_reason").is_none());
    }
}
