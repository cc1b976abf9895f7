//! `POST /v1/responses`, OpenAI's Responses API without server-side
//! state, served by every backend kind through one translation each way:
//! answers whole and streamed, every object and event checked field by
//! field against the types of OpenAI's own SDK
//! (`tests/fixtures/responses/types.json`), event order and
//! `sequence_number`; a function call out and its output back in; errors
//! in OpenAI's shape before and after the first byte, metered once; and
//! what needs state refused with a 400 that says so.

mod support;

use std::sync::LazyLock;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::*;
use support::kinds::{COMPLETION_TOKENS, Kind, REASONING, RECORDED, for_each_kind, start_for};
use support::mock::{MockUpstream, unfinished_stream};
use support::openai_mock::{CANNED_PROMPT_TOKENS, TOOL_ARGUMENTS, TOOL_CALL_ID, TOOL_NAME};

/// The fields of each Responses type in openai-python: `required` and
/// `optional` names.
static TYPES: LazyLock<Value> = LazyLock::new(|| {
    let path = format!(
        "{}/tests/fixtures/responses/types.json",
        env!("CARGO_MANIFEST_DIR")
    );
    parse(&std::fs::read_to_string(path).unwrap())["types"].clone()
});

/// That `value` has every required field of the SDK type `name` and no
/// field the type lacks; nested objects are checked by their own types.
fn check_type(value: &Value, name: &str) {
    let spec = &TYPES[name];
    let names = |list: &str| -> Vec<&str> {
        spec[list]
            .as_array()
            .unwrap_or_else(|| panic!("no type {name}"))
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect()
    };
    let (required, optional) = (names("required"), names("optional"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{name}: {value}"));
    for field in &required {
        assert!(
            object.contains_key(*field),
            "{name} lacks `{field}`: {value}"
        );
    }
    for (field, inner) in object {
        assert!(
            required.contains(&field.as_str()) || optional.contains(&field.as_str()),
            "{name} has no field `{field}`"
        );
        match (field.as_str(), inner) {
            ("response", _) => check_type(inner, "response"),
            ("item", _) => check_type(inner, inner["type"].as_str().unwrap()),
            ("output", Value::Array(items)) => {
                for item in items {
                    check_type(item, item["type"].as_str().unwrap());
                }
            }
            ("content", Value::Array(parts)) => {
                parts
                    .iter()
                    .for_each(|p| check_type(p, p["type"].as_str().unwrap()));
            }
            ("part", part) => check_type(part, part["type"].as_str().unwrap()),
            ("error", Value::Object(_)) => check_type(inner, "response.error"),
            ("usage", Value::Object(_)) => {
                check_type(inner, "usage");
                check_type(&inner["input_tokens_details"], "usage.input_tokens_details");
                check_type(
                    &inner["output_tokens_details"],
                    "usage.output_tokens_details",
                );
            }
            _ => {}
        }
    }
}

/// Every event typed, named as its `type`, numbered 0, 1, 2… in order.
fn check_events(events: &[(String, Value)]) {
    for (n, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], *name);
        assert_eq!(data["sequence_number"], n, "{name}");
        check_type(data, name);
    }
}

fn ask(stream: bool) -> Value {
    json!({"model": "chat", "max_output_tokens": 16, "stream": stream,
        "instructions": "Be brief.", "input": "Hello"})
}

fn with_tools(mut body: Value) -> Value {
    body["tools"] = json!([{"type": "function", "name": TOOL_NAME, "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    body
}

async fn post(gateway: &Gateway, body: &Value) -> reqwest::Response {
    gateway
        .post("/v1/responses")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn stream(gateway: &Gateway, body: &Value) -> Vec<(String, Value)> {
    let response = post(gateway, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    named_events(&response.text().await.unwrap())
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

fn expected_usage() -> Value {
    json!({"input_tokens": CANNED_PROMPT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": COMPLETION_TOKENS, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": CANNED_PROMPT_TOKENS + COMPLETION_TOKENS})
}

async fn a_whole_answer_is_a_response_with_exact_usage(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let response = post(&gateway, &ask(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    check_type(&body, "response");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"), "{body}");
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["instructions"], "Be brief.");
    assert_eq!(body["max_output_tokens"], 16);
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["role"], "assistant");
    assert_eq!(output[0]["content"][0]["type"], "output_text");
    assert_eq!(output[0]["content"][0]["text"], "tok tok tok ");
    assert_eq!(body["usage"], expected_usage());
    gateway
        .eventually_exact_output_tokens("responses", "chat", "up", COMPLETION_TOKENS)
        .await;
}

async fn a_stream_is_the_responses_event_sequence(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let events = stream(&gateway, &ask(true)).await;
    check_events(&events);
    let deltas = vec!["response.output_text.delta"; COMPLETION_TOKENS as usize];
    let expected = [
        &[
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ][..],
        &deltas,
        &[
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ],
    ]
    .concat();
    assert_eq!(names(&events), expected);
    let item_id = &events[2].1["item"]["id"];
    assert!(
        events[2..events.len() - 1]
            .iter()
            .all(|(_, d)| d.get("item_id").is_none_or(|i| i == item_id))
    );
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(text, "tok tok tok ");
    assert_eq!(events[events.len() - 4].1["text"], "tok tok tok ");
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["usage"], expected_usage());
    assert_eq!(done["output"][0]["content"][0]["text"], "tok tok tok ");
    assert_eq!(done["id"], events[0].1["response"]["id"]);
    gateway
        .eventually_exact_output_tokens("responses", "chat", "up", COMPLETION_TOKENS)
        .await;
}

async fn a_function_call_goes_out_and_its_output_comes_back_in(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let body: Value = post(&gateway, &with_tools(ask(false)))
        .await
        .json()
        .await
        .unwrap();
    check_type(&body, "response");
    let call = &body["output"][0];
    assert_eq!(call["type"], "function_call", "{body}");
    assert_eq!(call["call_id"], TOOL_CALL_ID);
    assert_eq!(call["name"], TOOL_NAME);
    assert_eq!(call["arguments"], TOOL_ARGUMENTS.concat());
    assert_eq!(body["tools"][0]["name"], TOOL_NAME);

    let events = stream(&gateway, &with_tools(ask(true))).await;
    check_events(&events);
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(events[2].1["item"]["call_id"], TOOL_CALL_ID);
    assert_eq!(events[5].1["arguments"], TOOL_ARGUMENTS.concat());
    assert_eq!(events[5].1["name"], TOOL_NAME);

    let mut next = with_tools(ask(false));
    next["input"] = json!([
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": TOOL_CALL_ID, "name": TOOL_NAME, "arguments": TOOL_ARGUMENTS.concat()},
        {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": "18C and sunny"}
    ]);
    let response = post(&gateway, &next).await;
    assert_eq!(response.status(), 200);
    let sent = upstream.requests().pop().unwrap().json;
    let turns = &sent["messages"];
    match kind {
        Kind::Bedrock => {
            assert_eq!(turns[1]["content"][0]["toolUse"]["toolUseId"], TOOL_CALL_ID);
            let result = &turns[2]["content"][0]["toolResult"];
            assert_eq!(result["toolUseId"], TOOL_CALL_ID);
            assert_eq!(result["content"][0]["text"], "18C and sunny");
        }
        Kind::OpenAi | Kind::Tgi => {
            assert_eq!(turns[2]["tool_calls"][0]["id"], TOOL_CALL_ID);
            assert_eq!(
                turns[3],
                json!({"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": "18C and sunny"})
            );
        }
    }

    // An output of text parts is their text.
    next["input"][2]["output"] = json!([{"type": "input_text", "text": "18C"},
        {"type": "input_text", "text": " and sunny"}]);
    assert_eq!(post(&gateway, &next).await.status(), 200);
    assert_eq!(upstream.requests().pop().unwrap().json, sent);
}

/// A function's output reaches the model as a chat `tool` message, which
/// holds only text: an image in it is refused by name, never dropped.
#[tokio::test]
async fn an_image_in_a_function_calls_output_is_a_400_naming_it() {
    let upstream = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("up", "vllm", &url(&upstream)))
        .model(
            Model::new("chat").deployment(
                Deployment::new("up", "m")
                    .multimodal(&["text", "image"])
                    .set("tools", true),
            ),
        );
    let gateway = start(&config).await;
    let mut body = with_tools(ask(false));
    body["input"] = json!([
        {"role": "user", "content": "Chart the weather in Paris and Rome"},
        {"type": "function_call", "call_id": "call_1", "name": TOOL_NAME, "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "call_id": "call_2", "name": TOOL_NAME, "arguments": "{\"city\":\"Rome\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [
            {"type": "input_text", "text": "The chart:"},
            {"type": "input_image", "image_url": png(64, 64)}]},
        {"type": "function_call_output", "call_id": "call_2", "output": "25C"}
    ]);
    let response = post(&gateway, &body).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["param"], "input[3].output[1]");
    assert!(
        message(&error).contains("send the image in a `message` item with role `user`"),
        "{error}"
    );
    assert_eq!(upstream.hits(), 0);

    // Sent as the error says, it reaches the model as an image.
    body["input"][3]["output"] = json!("The chart is below.");
    let image =
        json!({"role": "user", "content": [{"type": "input_image", "image_url": png(64, 64)}]});
    body["input"].as_array_mut().unwrap().push(image);
    assert_eq!(post(&gateway, &body).await.status(), 200);
    let sent = upstream.single_request().json;
    let last = sent["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"][0]["type"], "image_url");
}

async fn upstream_errors_are_openai_errors(kind: Kind) {
    let limited = kind.rate_limited(kind.mock()).start().await;
    let gateway = start_for(kind, &limited).await;
    for streamed in [false, true] {
        let response = post(&gateway, &ask(streamed)).await;
        assert_eq!(response.status(), 429, "stream: {streamed}");
        let error = error_of(response).await;
        assert_eq!(error["type"], "rate_limit_error");
        assert_eq!(error["code"], "rate_limit_exceeded");
    }
}

/// A stream that failed after it started ends as OpenAI's do: an `error`
/// event with the gateway's `code`, then `response.failed`, whose
/// response is `failed` with an `error` of a code the Responses API
/// defines and the same message, its output what was streamed (the item
/// cut short `incomplete`) and its usage; nothing else says the answer was
/// whole. Returns the failed response.
fn check_failed(events: &[(String, Value)], code: &str) -> Value {
    check_events(events);
    let [.., (error_name, error), (failed_name, failed)] = events else {
        panic!("{events:?}");
    };
    assert_eq!(
        (error_name.as_str(), failed_name.as_str()),
        ("error", "response.failed"),
        "{events:?}"
    );
    assert_eq!(error["code"], code, "{error}");
    let response = &failed["response"];
    assert_eq!(response["status"], "failed", "{response}");
    assert_eq!(response["error"]["code"], "server_error", "{response}");
    assert_eq!(response["error"]["message"], error["message"], "{response}");
    assert!(response["usage"]["output_tokens"].is_u64(), "{response}");
    let streamed: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    let output = response["output"].as_array().unwrap();
    let text = output.iter().find(|item| item["type"] == "message");
    match text {
        Some(item) => {
            assert_eq!(item["content"][0]["text"], streamed.as_str(), "{response}");
            assert!(["incomplete", "completed"].contains(&item["status"].as_str().unwrap()));
        }
        None => assert_eq!(streamed, "", "{response}"),
    }
    for name in ["response.completed", "response.incomplete"] {
        assert!(!names(events).contains(&name), "{events:?}");
    }
    response.clone()
}

/// The labels of a Responses request on `up` that failed upstream.
const FAILED_UPSTREAM: [(&str, &str); 4] = [
    ("api", "responses"),
    ("alias", "chat"),
    ("backend", "up"),
    ("status", "502"),
];

async fn a_stream_cut_mid_way_is_an_error_event_and_metered_once(kind: Kind) {
    let upstream = kind.mock().reset_after(2).start().await;
    let gateway = start_for(kind, &upstream).await;
    let events = stream(&gateway, &ask(true)).await;
    check_failed(&events, "upstream_disconnected");
    gateway.recorded_once(&FAILED_UPSTREAM).await;
}

#[tokio::test]
async fn a_stream_the_upstream_ends_unfinished_is_an_error_event_not_an_answer() {
    for upstream in [
        unfinished_stream(),
        MockUpstream::openai().omit_finish(),
        MockUpstream::openai().omit_finish().omit_done(),
    ] {
        let upstream = upstream.start().await;
        let gateway = start_for(Kind::OpenAi, &upstream).await;
        let events = stream(&gateway, &ask(true)).await;
        let response = check_failed(&events, "upstream_invalid_response");
        assert_eq!(
            response["output"][0]["status"], "incomplete",
            "the message was cut short: {response}"
        );
        gateway.recorded_once(&FAILED_UPSTREAM).await;
    }
}

#[tokio::test]
async fn a_stream_the_upstream_stops_sending_fails_at_its_idle_timeout() {
    let upstream = MockUpstream::openai().hold_after(2).start().await;
    let config = Config::new()
        .backend(Backend::upstream("up", "vllm", &url(&upstream)).idle_ms(150))
        .model(Model::new("chat").deployment(Deployment::new("up", "m")));
    let gateway = start(&config).await;
    let events = stream(&gateway, &ask(true)).await;
    let response = check_failed(&events, "upstream_timeout");
    assert!(
        response["error"]["message"]
            .as_str()
            .unwrap()
            .contains("150 ms"),
        "{response}"
    );
    let labels = [
        ("api", "responses"),
        ("alias", "chat"),
        ("backend", "up"),
        ("status", "504"),
    ];
    gateway.recorded_once(&labels).await;
}

for_each_kind!(
    a_whole_answer_is_a_response_with_exact_usage,
    a_stream_is_the_responses_event_sequence,
    a_function_call_goes_out_and_its_output_comes_back_in,
    upstream_errors_are_openai_errors,
    a_stream_cut_mid_way_is_an_error_event_and_metered_once,
);

#[tokio::test]
async fn what_needs_server_side_state_is_a_400_that_says_so() {
    let upstream = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("up", "vllm", &url(&upstream)))
        .model(Model::new("chat").deployment(Deployment::new("up", "m")));
    let gateway = start(&config).await;
    let with = |field: &str, value: Value| {
        let mut body = ask(false);
        body[field] = value;
        body
    };
    let cases = [
        (
            with("previous_response_id", json!("resp_123")),
            "previous_response_id",
            "keeps no state",
        ),
        (with("store", json!(true)), "store", "keeps no state"),
        (
            with("tools", json!([{"type": "web_search"}])),
            "tools[0]",
            "built into OpenAI",
        ),
        (
            with("input", json!([{"type": "item_reference", "id": "msg_1"}])),
            "input[0]",
            "keeps no state",
        ),
        (
            with(
                "input",
                json!([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]),
            ),
            "input[0].content[0]",
            "file_id",
        ),
        (with("input", json!(5)), "input", "a string, or an array"),
        (with("input", json!([])), "input", "empty"),
    ];
    for (body, param, says) in cases {
        let response = post(&gateway, &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error = error_of(response).await;
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], param, "{error}");
        assert!(message(&error).contains(says), "{says}: {error}");
    }
    assert_eq!(upstream.hits(), 0);
    let mut stateless = ask(false);
    stateless["store"] = json!(false);
    assert_eq!(post(&gateway, &stateless).await.status(), 200);
}

/// Reasoning is a `reasoning` item, never text, whole and streamed.
async fn reasoning_stays_reasoning(kind: Kind) {
    let upstream = kind.reasoning_mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
    check_type(&body, "response");
    let output = body["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning", "{body}");
    assert_eq!(
        output[0]["content"],
        json!([{"type": "reasoning_text", "text": REASONING.concat()}])
    );
    assert_eq!(output[1]["content"][0]["text"], "tok tok tok ");
    let events = stream(&gateway, &ask(true)).await;
    check_events(&events);
    let reasoning = [
        &[
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ][..],
        &["response.reasoning_text.delta"; 2],
        &[
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ],
    ]
    .concat();
    assert_eq!(names(&events)[..reasoning.len()], reasoning);
    assert_eq!(events[reasoning.len() - 3].1["text"], REASONING.concat());
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["type"], "reasoning");
    assert_eq!(done["output"][1]["content"][0]["text"], "tok tok tok ");

    // The next turn sends the answer's output back, as the SDK's docs
    // manage a conversation: its reasoning is left out upstream.
    let mut next = ask(false);
    next["input"] = json!([{"role": "user", "content": "Hello"}]);
    let input = next["input"].as_array_mut().unwrap();
    input.extend(output.iter().cloned());
    input.push(json!({"role": "user", "content": "And then?"}));
    let response = post(&gateway, &next).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let sent = upstream.requests().pop().unwrap().json;
    let sent = sent.to_string();
    assert!(!sent.contains(&REASONING.concat()), "{sent}");
    assert!(
        sent.contains("tok tok tok ") && sent.contains("And then?"),
        "{sent}"
    );
}

mod reasoning_stays_reasoning {
    use super::Kind;

    #[tokio::test]
    async fn openai() {
        super::reasoning_stays_reasoning(Kind::OpenAi).await;
    }

    #[tokio::test]
    async fn bedrock() {
        super::reasoning_stays_reasoning(Kind::Bedrock).await;
    }
}

/// `reasoning.effort` and a JSON `text.format` go upstream as chat's
/// `reasoning_effort` and `response_format` where the upstream takes them
/// (OpenAI-compatible servers), and the response repeats them; Bedrock
/// and TGI would answer without them, so each is a 400 that names it as
/// the client sent it.
async fn reasoning_and_json_formats_go_as_far_as_the_upstream_supports(kind: Kind) {
    let mock = match kind {
        Kind::OpenAi => kind.reasoning_mock(),
        Kind::Bedrock | Kind::Tgi => kind.mock(),
    };
    let upstream = mock.start().await;
    let gateway = start_for(kind, &upstream).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let format = json!({"type": "json_schema", "name": "place", "schema": schema, "strict": true});
    let mut both = ask(false);
    both["reasoning"] = json!({"effort": "low", "summary": "auto"});
    both["text"] = json!({"format": format});
    let response = post(&gateway, &both).await;
    match kind {
        Kind::OpenAi => {
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            check_type(&body, "response");
            assert_eq!(body["output"][0]["type"], "reasoning", "{body}");
            assert_eq!(body["text"]["format"], format);
            assert_eq!(body["reasoning"]["effort"], "low");
            let sent = upstream.single_request().json;
            assert_eq!(sent["reasoning_effort"], "low", "{sent}");
            assert_eq!(
                sent["response_format"],
                json!({"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": true}})
            );
        }
        Kind::Bedrock | Kind::Tgi => {
            let mut effort = ask(false);
            effort["reasoning"] = json!({"effort": "low"});
            let mut refusals = vec![(post(&gateway, &effort).await, "reasoning.effort")];
            if let Kind::Bedrock = kind {
                let mut json_format = ask(false);
                json_format["text"] = json!({"format": format});
                refusals.push((post(&gateway, &json_format).await, "text.format"));
            }
            for (response, param) in refusals {
                assert_eq!(response.status(), 400);
                let error = error_of(response).await;
                assert_eq!(error["param"], param, "{error}");
                assert!(message(&error).contains(&format!("`{param}`")), "{error}");
            }
            assert_eq!(upstream.hits(), 0);
        }
    }
}

for_each_kind!(reasoning_and_json_formats_go_as_far_as_the_upstream_supports);

/// Together's, Groq's and OpenAI's answers, each with its own way of
/// reporting usage, make the Responses event sequence and response object
/// with the upstream's counts; OpenAI is sent `max_completion_tokens`.
#[tokio::test]
async fn together_groq_and_openai_answers_become_responses_with_their_usage() {
    for recorded in RECORDED {
        let (upstream, gateway) = recorded.start().await;
        let kind = recorded.kind;
        let events = stream(&gateway, &ask(true)).await;
        check_events(&events);
        let (last, done) = events.last().unwrap();
        assert_eq!(last, "response.completed", "{kind}");
        let response = &done["response"];
        assert_eq!(
            response["output"][0]["content"][0]["text"], recorded.text,
            "{kind}"
        );
        let usage = &response["usage"];
        assert_eq!(usage["input_tokens"], recorded.input_tokens, "{kind}");
        assert_eq!(usage["output_tokens"], recorded.output_tokens, "{kind}");
        let sent = upstream.single_request().json;
        assert_eq!(sent[recorded.limit_field()], 16, "{kind}: {sent}");

        let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
        check_type(&body, "response");
        let (text, input, output) = recorded.whole_answer();
        assert_eq!(body["status"], "completed", "{kind}: {body}");
        assert_eq!(body["output"][0]["content"][0]["text"], text, "{kind}");
        assert_eq!(body["usage"]["input_tokens"], input, "{kind}");
        assert_eq!(body["usage"]["output_tokens"], output, "{kind}");
    }
}

#[tokio::test]
async fn the_simulated_backend_serves_responses_too() {
    let config = Config::new()
        .backend(Backend::simulated("sim").answers(0, 100_000, 4))
        .model(Model::new("chat").deployment(Deployment::new("sim", "m")));
    let gateway = start(&config).await;
    let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
    check_type(&body, "response");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["usage"]["output_tokens"], 4);
    let events = stream(&gateway, &ask(true)).await;
    check_events(&events);
    assert_eq!(events.last().unwrap().0, "response.completed");
    assert_eq!(
        events.last().unwrap().1["response"]["usage"]["output_tokens"],
        4
    );
    // Asked for effort, it reasons first: three quarters of its words at
    // high.
    let mut effort = ask(false);
    effort["reasoning"] = json!({"effort": "high"});
    let body: Value = post(&gateway, &effort).await.json().await.unwrap();
    let output = body["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning", "{body}");
    let words = |text: &Value| text.as_str().unwrap().split(' ').count();
    assert_eq!(words(&output[0]["content"][0]["text"]), 3);
    assert_eq!(words(&output[1]["content"][0]["text"]), 1);
}
