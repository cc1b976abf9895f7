//! The built-in `simulated` backend, through the gateway, as a client sees it.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};

async fn start() -> String {
    let config = Config::new()
        .backend(Backend::simulated("sim").answers(20, 500, 12))
        .backend(Backend::simulated("broken").always_fails())
        .model(Model::new("llama").deployment(
            Deployment::new("sim", "meta-llama/Llama-3.1-8B-Instruct").set("tools", true),
        ))
        .model(
            Model::new("flaky")
                .deployment(Deployment::new("broken", "x"))
                .deployment(Deployment::new("sim", "y")),
        )
        .model(Model::new("down").deployment(Deployment::new("broken", "x")));
    support::gateway::start(&config).await.base
}

async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("gateway answers")
}

/// The chunks of an SSE body, which ends with `[DONE]`.
fn chunks(body: &str) -> Vec<Value> {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .expect("every event is a data line")
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn non_streaming_chat_is_deterministic_with_exact_usage() {
    let base = start().await;
    let request =
        json!({"model": "llama", "messages": [{"role": "user", "content": "Say something"}]});
    let first: Value = post(&base, "/v1/chat/completions", request.clone())
        .await
        .json()
        .await
        .unwrap();
    let second: Value = post(&base, "/v1/chat/completions", request)
        .await
        .json()
        .await
        .unwrap();
    let text = first["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        text, second["choices"][0]["message"]["content"],
        "same prompt, same text"
    );
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    assert_eq!(first["usage"]["completion_tokens"], 12);
    assert_eq!(text.split(' ').count(), 12, "one word per token");
    let usage = &first["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 12
    );
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_with_finish_reason_length() {
    let base = start().await;
    let body: Value = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "llama", "max_completion_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn streaming_chat_sends_one_chunk_per_token_and_usage_on_request() {
    let base = start().await;
    for include_usage in [false, true] {
        let response = post(
            &base,
            "/v1/chat/completions",
            json!({"model": "llama", "stream": true, "stream_options": {"include_usage": include_usage},
                   "messages": [{"role": "user", "content": "Say something"}]}),
        )
        .await;
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert_eq!(response.headers()["x-tollgate-backend"], "sim");
        let body = response.text().await.unwrap();
        let chunks = chunks(&body);
        let words = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count();
        assert_eq!(words, 12);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage_chunks: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"] == json!([]))
            .collect();
        if include_usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["usage"]["completion_tokens"], 12);
        } else {
            assert!(usage_chunks.is_empty(), "usage chunk only when asked for");
        }
    }
}

#[tokio::test]
async fn several_answers_come_as_a_real_server_sends_them() {
    let base = start().await;
    let ask = json!({"model": "llama", "n": 3, "messages": [{"role": "user", "content": "Say something"}]});
    let whole: Value = post(&base, "/v1/chat/completions", ask.clone())
        .await
        .json()
        .await
        .unwrap();
    let choices = whole["choices"].as_array().unwrap();
    let indices: Vec<&Value> = choices.iter().map(|c| &c["index"]).collect();
    assert_eq!(indices, [0, 1, 2]);
    assert!(
        choices
            .iter()
            .all(|c| c["message"] == choices[0]["message"])
    );
    assert_eq!(whole["usage"]["completion_tokens"], 3 * 12);

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let body = post(&base, "/v1/chat/completions", streamed)
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks(&body);
    for index in 0..3 {
        let of_answer: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        let words = of_answer
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count();
        assert_eq!(words, 12, "answer {index}");
        assert_eq!(
            of_answer.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 3 * 12);

    // A legacy batch: each prompt answered.
    let batch: Value = post(
        &base,
        "/v1/completions",
        json!({"model": "llama", "prompt": ["Once", "Twice"], "max_tokens": 5}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(batch["choices"].as_array().unwrap().len(), 2);
    assert_eq!(batch["usage"]["completion_tokens"], 2 * 5);
    // `best_of` candidates are generated and billed; `n` come back.
    let best: Value = post(
        &base,
        "/v1/completions",
        json!({"model": "llama", "prompt": "Once", "best_of": 3, "max_tokens": 5}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(best["choices"].as_array().unwrap().len(), 1);
    assert_eq!(best["usage"]["completion_tokens"], 3 * 5);
}

#[tokio::test]
async fn legacy_completions_stream_and_not() {
    let base = start().await;
    let whole: Value = post(
        &base,
        "/v1/completions",
        json!({"model": "llama", "prompt": "Once", "max_tokens": 5}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["usage"]["completion_tokens"], 5);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_owned();

    let body = post(
        &base,
        "/v1/completions",
        json!({"model": "llama", "prompt": "Once", "max_tokens": 5, "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let streamed: String = chunks(&body)
        .iter()
        .map(|c| {
            c["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(streamed, text, "streamed and whole answers agree");
}

#[tokio::test]
async fn a_failing_deployment_fails_over_and_an_all_failing_alias_is_503() {
    let base = start().await;
    let ok = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-tollgate-backend"], "sim");

    let down = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "down", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(down.status(), 503);
    assert_eq!(down.headers()["x-tollgate-backend"], "broken");
    let body: Value = down.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated failure")
    );

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(
        r#"tollgate_upstream_attempts_total{backend="broken",outcome="upstream_error"} 2"#
    ));
    assert!(metrics.contains(
        r#"tollgate_requests_total{alias="down",api="chat",backend="broken",status="503"} 1"#
    ));
}

/// A whole chat answer to `body`.
async fn chat(base: &str, body: Value) -> Value {
    post(base, "/v1/chat/completions", body)
        .await
        .json()
        .await
        .unwrap()
}

/// Two tools, as an agent offers them.
fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
            "properties": {"query": {"type": "string"}}}}},
    ])
}

fn asking(messages: Value, more: Value) -> Value {
    let mut body = json!({"model": "llama", "messages": messages, "tools": tools()});
    body.as_object_mut()
        .unwrap()
        .extend(more.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn offered_tools_it_calls_one_with_arguments_that_fit_and_answers_its_result_in_words() {
    let base = start().await;
    let user = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let body: Value = chat(&base, asking(user.clone(), json!({}))).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert_eq!(arguments["unit"], "celsius");
    assert_eq!(arguments["days"], 1);
    // A token for each 4 bytes of arguments, as the gateway estimates.
    let written = call["function"]["arguments"].as_str().unwrap().len();
    assert_eq!(body["usage"]["completion_tokens"], written.div_ceil(4));

    // The function `tool_choice` names; none with `none`.
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "search"}}});
    let body: Value = chat(&base, asking(user.clone(), named)).await;
    let other = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(other["function"]["name"], "search");
    assert_ne!(other["id"], call["id"], "each call has an id of its own");
    let none = json!({"tool_choice": "none"});
    let body: Value = chat(&base, asking(user.clone(), none)).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // The tool's result is answered in words, so an agent's loop ends.
    let id = call["id"].as_str().unwrap();
    let turn = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": id, "content": "18 C, sunny"},
    ]);
    let body: Value = chat(&base, asking(turn, json!({}))).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn a_streamed_call_comes_a_token_a_chunk_and_adds_up_to_the_whole_one() {
    let base = start().await;
    let user = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let whole: Value = chat(&base, asking(user.clone(), json!({}))).await;
    let whole_call = &whole["choices"][0]["message"]["tool_calls"][0];
    let stream = json!({"stream": true, "stream_options": {"include_usage": true}});
    let body = post(&base, "/v1/chat/completions", asking(user.clone(), stream))
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks(&body);
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert!(
        first["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_")
    );
    assert_eq!(first["tool_calls"][0]["function"]["name"], "get_weather");
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(pieces.concat(), whole_call["function"]["arguments"]);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "tool_calls");
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert_eq!(usage["completion_tokens"], pieces.len());
    assert_eq!(usage, &whole["usage"]);

    // A limit cuts the call's arguments, as it cuts text.
    let limited = json!({"max_tokens": 3});
    let body: Value = chat(&base, asking(user, limited)).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let cut = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert!(
        whole_call["function"]["arguments"]
            .as_str()
            .unwrap()
            .starts_with(cut)
    );
}

#[tokio::test]
async fn asked_for_json_it_answers_json_that_fits_the_schema_whole_and_streamed() {
    let base = start().await;
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"type": "integer"}, "rain": {"type": ["boolean", "null"]}}}},
        "note": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    }});
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}});
    let ask = json!({"model": "llama", "messages": [{"role": "user", "content": "Forecast?"}],
                     "response_format": format});
    let whole = chat(&base, ask.clone()).await;
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value = serde_json::from_str(content).unwrap();
    assert!(answer["city"].is_string(), "{answer}");
    assert_eq!(answer["unit"], "celsius");
    assert_eq!(answer["days"][0]["day"], 1);
    assert_eq!(answer["days"][0]["rain"], true);
    assert_eq!(answer["note"], 1.5);
    assert_eq!(
        whole["usage"]["completion_tokens"],
        content.len().div_ceil(4)
    );

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let body = post(&base, "/v1/chat/completions", streamed)
        .await
        .text()
        .await
        .unwrap();
    let text: String = chunks(&body)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, content);

    let object = json!({"model": "llama", "messages": [{"role": "user", "content": "JSON please"}],
                        "response_format": {"type": "json_object"}});
    let whole = chat(&base, object).await;
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).unwrap().is_object(),
        "{content}"
    );
}

/// As vLLM: a client that asks for the usage so far in every chunk gets
/// it, each chunk counting its answer's tokens; and a stream a key's budget
/// bounds is counted by it, so words of more than 4 bytes a token reach
/// the limit the budget set rather than the gateway's estimate of it.
#[tokio::test]
async fn it_reports_the_usage_so_far_as_vllm_does() {
    let base = start().await;
    let response = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "llama", "stream": true, "n": 2,
               "stream_options": {"include_usage": true, "continuous_usage_stats": true},
               "messages": [{"role": "user", "content": "Say something"}]}),
    )
    .await;
    let streamed = chunks(&response.text().await.unwrap());
    let (usage_only, with_choices) = streamed.split_last().unwrap();
    assert_eq!(usage_only["usage"]["completion_tokens"], 24);
    for answer in [0, 1] {
        let counts: Vec<u64> = with_choices
            .iter()
            .filter(|c| c["choices"][0]["index"] == answer)
            .map(|c| c["usage"]["completion_tokens"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=12).chain([12]).collect();
        assert_eq!(counts, expected, "answer {answer}");
    }

    // $0.001 at $1 and $10 a million tokens: the most the prompt can be
    // (100 tokens: a chat template's 64, a message's 16 and its 20 bytes)
    // and 90 output tokens, of the simulated backend's words of about 5.6
    // bytes.
    let config = Config::new()
        .backend(Backend::simulated("sim").answers(1, 100_000, 1_000))
        .model(Model::new("llama").deployment(Deployment::new("sim", "m").price(1.0, 10.0)))
        .key(Key::new("team").set("budget_daily_usd", 0.001));
    let gateway = support::gateway::start(&config).await;
    let body = json!({"model": "llama", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "Tell me a long story"}]});
    let response = gateway.chat_as("team-secret", body).await;
    let streamed = chunks(&response.text().await.unwrap());
    let (usage_only, with_choices) = streamed.split_last().unwrap();
    let limit = usage_only["usage"]["completion_tokens"].as_u64().unwrap();
    let words = with_choices
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count() as u64;
    assert_eq!((words, limit), (90, 90));
    assert_eq!(
        with_choices[with_choices.len() - 1]["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        with_choices.iter().all(|c| c.get("usage").is_none()),
        "the client did not ask for the usage so far"
    );
}
