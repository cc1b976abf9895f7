//! The OpenAI chat parameters Converse cannot honour
//! (`config::BEDROCK_UNHONOURED`). Each one that asks for something sends
//! the request to the alias's next deployment, or is a 400 naming it when
//! there is none, unless the backend drops it: answering without it would
//! be a different answer from the one asked for, with a 200.
//!
//! Parameters that only concern the gateway or the transport (`stream`,
//! `stream_options`, `user`, `safety_identifier`, `prompt_cache_key`,
//! `metadata`, `store`, `prediction`) leave the answer as it is and are
//! ignored; fields OpenAI does not define are ignored too.

use serde_json::Value;

use crate::config::BEDROCK_UNHONOURED;
use crate::error::GatewayError;
use crate::openai::ChatRequest;

/// The first parameter of `chat` that Converse cannot honour and
/// `drop_params` does not name, as a 400.
pub fn refuse_unhonoured(chat: &ChatRequest, drop_params: &[String]) -> Result<(), GatewayError> {
    for &param in BEDROCK_UNHONOURED {
        let Some(value) = chat.extra.get(param).filter(|v| !v.is_null()) else {
            continue;
        };
        let (asks_nothing, neutral) = neutral(param, value);
        if asks_nothing || drop_params.iter().any(|d| d == param) {
            continue;
        }
        let instead = match neutral {
            Some(neutral) => format!("leave it out or set it to {neutral}"),
            None => "leave it out".to_owned(),
        };
        return Err(GatewayError::parameter_unsupported(
            format!(
                "Bedrock cannot honour `{param}`; {instead}, or use a model whose deployments support it"
            ),
            param,
        ));
    }
    Ok(())
}

/// Whether `value` of `param` asks for nothing (OpenAI's default), and
/// the value that does, for the message, when there is one besides `null`.
fn neutral(param: &str, value: &Value) -> (bool, Option<&'static str>) {
    match param {
        "frequency_penalty" | "presence_penalty" => (value.as_f64() == Some(0.0), Some("0")),
        "functions" => (value.as_array().is_some_and(Vec::is_empty), Some("[]")),
        "logit_bias" => (value.as_object().is_some_and(|o| o.is_empty()), Some("{}")),
        "logprobs" => (value == &Value::Bool(false), Some("false")),
        "modalities" => (
            value
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m == "text")),
            Some("[\"text\"]"),
        ),
        "n" => (value.as_u64() == Some(1), Some("1")),
        // Converse has no way to keep a model to one tool call per turn.
        // No value is named: Messages asks the same with the opposite
        // value (`disable_parallel_tool_use: true`), and its client reads
        // this message under that name.
        "parallel_tool_calls" => (value == &Value::Bool(true), None),
        "response_format" => (
            value.get("type").and_then(Value::as_str) == Some("text"),
            Some("{\"type\":\"text\"}"),
        ),
        // Another tier is another price than the one Bedrock charges.
        "service_tier" => (
            matches!(value.as_str(), Some("auto" | "default")),
            Some("\"auto\""),
        ),
        "top_logprobs" => (value.as_u64() == Some(0), Some("0")),
        _ => (false, None),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(fields: Value, drop_params: &[&str]) -> Result<(), GatewayError> {
        let mut request = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        request
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let chat: ChatRequest = serde_json::from_value(request).unwrap();
        let drop_params: Vec<String> = drop_params.iter().map(|&d| d.to_owned()).collect();
        refuse_unhonoured(&chat, &drop_params)
    }

    #[test]
    fn a_parameter_that_asks_for_something_is_a_400_naming_it() {
        let cases = [
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"logprobs": true}),
            json!({"top_logprobs": 3}),
            json!({"n": 2}),
            json!({"logit_bias": {"50256": -100}}),
            json!({"presence_penalty": 0.5}),
            json!({"frequency_penalty": -1}),
            json!({"seed": 7}),
            json!({"parallel_tool_calls": false}),
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            json!({"modalities": ["text", "audio"]}),
            json!({"reasoning_effort": "high"}),
            json!({"service_tier": "flex"}),
            json!({"web_search_options": {}}),
            json!({"verbosity": "low"}),
            json!({"functions": [{"name": "f"}]}),
            json!({"function_call": {"name": "f"}}),
        ];
        for fields in cases {
            let param = fields.as_object().unwrap().keys().next().unwrap().clone();
            let error = check(fields.clone(), &[]).unwrap_err();
            assert_eq!(error.status(), 400, "{fields}");
            assert_eq!(error.param_name(), Some(param.as_str()));
            assert!(
                error
                    .message()
                    .starts_with(&format!("Bedrock cannot honour `{param}`; leave it out")),
                "{}",
                error.message()
            );
            check(fields, &[&param]).expect("dropped when the backend says so");
        }
    }

    #[test]
    fn null_and_default_values_and_gateway_only_parameters_pass() {
        check(
            json!({"response_format": {"type": "text"}, "logprobs": false, "top_logprobs": 0,
                "n": 1, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
                "seed": null, "parallel_tool_calls": true, "modalities": ["text"],
                "service_tier": "auto", "functions": [], "audio": null,
                "stream": false, "stream_options": {"include_usage": true}, "user": "u-1",
                "metadata": {"team": "a"}, "store": false, "prediction": {"type": "content", "content": "x"}}),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn the_message_says_which_value_asks_for_nothing() {
        let error = check(json!({"logprobs": true}), &["seed"]).unwrap_err();
        assert_eq!(
            error.message(),
            "Bedrock cannot honour `logprobs`; leave it out or set it to false, or use a model whose deployments support it"
        );
    }
}
