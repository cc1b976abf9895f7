//! `POST /v1/messages`, Anthropic's Messages API, served by every backend
//! kind through one translation each way: answers whole and streamed with
//! the event order and field shapes of Anthropic's own recordings
//! (`tests/fixtures/anthropic/`), a tool call out and its result back in,
//! errors in Anthropic's shape before and after the first byte, metering
//! exactly once; then what does not depend on the backend: auth by
//! `x-api-key`, bad input, the EU licence rule for images, `count_tokens`.

mod support;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::kinds::{COMPLETION_TOKENS, Kind, REASONING, RECORDED, for_each_kind, start_for};
use support::mock::{MockServer, MockUpstream, unfinished_stream};
use support::openai_mock::{CANNED_PROMPT_TOKENS, TOOL_CALL_ID, TOOL_NAME};

/// An Anthropic recording's events.
fn reference(name: &str) -> Vec<(String, Value)> {
    let path = format!(
        "{}/tests/fixtures/anthropic/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    named_events(&std::fs::read_to_string(path).unwrap())
}

/// Members the recordings lack that Messages may carry: usage's cache
/// and cumulative fields.
const OPTIONAL: &[&str] = &[
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
];

/// That each of our events has the shape of the recording's event of the
/// same name and delta type.
fn check_against(ours: &[(String, Value)], recording: &[(String, Value)]) {
    let kind = |(name, data): &(String, Value)| {
        let sub = data["delta"]["type"]
            .as_str()
            .or(data["content_block"]["type"].as_str());
        format!("{name}/{}", sub.unwrap_or(""))
    };
    for event in ours {
        let theirs = recording
            .iter()
            .find(|r| kind(r) == kind(event))
            .unwrap_or_else(|| panic!("no {} in the recording", kind(event)));
        check_shape(&event.1, &theirs.1, OPTIONAL, &kind(event));
    }
}

/// Event names with repeats of one name in a row counted once.
fn names(events: &[(String, Value)]) -> Vec<&str> {
    let mut names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    names
}

fn ask(stream: bool) -> Value {
    json!({"model": "chat", "max_tokens": 16, "stream": stream,
        "system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}]})
}

fn with_tools(mut body: Value) -> Value {
    body["tools"] = json!([{"name": TOOL_NAME, "description": "Weather by city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    body
}

async fn post(gateway: &Gateway, body: &Value) -> reqwest::Response {
    gateway
        .post("/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A streamed Messages answer that must start: its events.
async fn stream(gateway: &Gateway, body: &Value) -> Vec<(String, Value)> {
    let response = post(gateway, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    named_events(&response.text().await.unwrap())
}

fn text_of(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect()
}

async fn a_whole_answer_is_a_message_with_exact_usage(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let response = post(&gateway, &ask(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "up");
    let body: Value = response.json().await.unwrap();
    let recorded = &reference("basic_response.sse")[0].1["message"];
    check_shape(&body, recorded, OPTIONAL, "message");
    assert!(body["id"].as_str().unwrap().starts_with("msg_"), "{body}");
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "tok tok tok "}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["stop_sequence"], Value::Null);
    assert_eq!(
        body["usage"],
        json!({"input_tokens": CANNED_PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS})
    );
    gateway
        .eventually_exact_output_tokens("messages", "chat", "up", COMPLETION_TOKENS)
        .await;
    assert_eq!(upstream.hits(), 1);
}

async fn a_stream_is_anthropics_event_sequence(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let events = stream(&gateway, &ask(true)).await;
    let recording = reference("basic_response.sse");
    assert_eq!(names(&events), names(&recording));
    check_against(&events, &recording);
    assert_eq!(text_of(&events), "tok tok tok ");
    assert!(events.iter().all(|(name, data)| data["type"] == *name));
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], COMPLETION_TOKENS);
    assert_eq!(delta["usage"]["input_tokens"], CANNED_PROMPT_TOKENS);
    gateway
        .eventually_exact_output_tokens("messages", "chat", "up", COMPLETION_TOKENS)
        .await;
}

async fn a_tool_call_goes_out_and_its_result_comes_back_in(kind: Kind) {
    let upstream = kind.mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let body: Value = post(&gateway, &with_tools(ask(false)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["stop_reason"], "tool_use", "{body}");
    let call = json!({"type": "tool_use", "id": TOOL_CALL_ID, "name": TOOL_NAME, "input": {"city": "Paris"}});
    assert_eq!(body["content"], json!([call]));

    let events = stream(&gateway, &with_tools(ask(true))).await;
    let recording = reference("tool_use_response.sse");
    check_against(&events, &recording);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[1].1;
    assert_eq!(start["index"], 0);
    assert_eq!(
        start["content_block"],
        json!({"type": "tool_use", "id": TOOL_CALL_ID, "name": TOOL_NAME, "input": {}})
    );
    let partial: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );

    // The result goes back in, with the call it answers.
    let mut next = with_tools(ask(false));
    next["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_CALL_ID,
            "content": [{"type": "text", "text": "18C and sunny"}]}]}
    ]);
    let response = post(&gateway, &next).await;
    assert_eq!(response.status(), 200);
    let sent = upstream.requests().pop().unwrap().json;
    match kind {
        Kind::Bedrock => {
            let turns = &sent["messages"];
            assert_eq!(turns[1]["content"][0]["toolUse"]["toolUseId"], TOOL_CALL_ID);
            assert_eq!(
                turns[1]["content"][0]["toolUse"]["input"],
                json!({"city": "Paris"})
            );
            let result = &turns[2]["content"][0]["toolResult"];
            assert_eq!(result["toolUseId"], TOOL_CALL_ID);
            assert_eq!(result["content"][0]["text"], "18C and sunny");
            assert!(result.get("status").is_none(), "{result}");
            assert_eq!(sent["system"][0]["text"], "Be brief.");
        }
        Kind::OpenAi | Kind::Tgi => {
            let turns = &sent["messages"];
            assert_eq!(turns[0], json!({"role": "system", "content": "Be brief."}));
            assert_eq!(turns[2]["tool_calls"][0]["id"], TOOL_CALL_ID);
            assert_eq!(
                turns[3],
                json!({"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": "18C and sunny"})
            );
        }
    }

    // A failed tool: Bedrock is told the result is an error; chat has no
    // such field, so the others get the content alone.
    next["messages"][2]["content"][0]["is_error"] = json!(true);
    next["messages"][2]["content"][0]["content"] = json!("city not found");
    let response = post(&gateway, &next).await;
    assert_eq!(response.status(), 200);
    let sent = upstream.requests().pop().unwrap().json;
    match kind {
        Kind::Bedrock => {
            let result = &sent["messages"][2]["content"][0]["toolResult"];
            assert_eq!(result["status"], "error", "{result}");
            assert_eq!(result["content"][0]["text"], "city not found");
        }
        Kind::OpenAi | Kind::Tgi => assert_eq!(
            sent["messages"][3],
            json!({"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": "city not found"})
        ),
    }
}

async fn upstream_errors_are_anthropic_errors(kind: Kind) {
    let limited = kind.rate_limited(kind.mock()).start().await;
    let gateway = start_for(kind, &limited).await;
    for streamed in [false, true] {
        let response = post(&gateway, &ask(streamed)).await;
        assert_eq!(response.status(), 429, "stream: {streamed}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        assert!(body["error"]["message"].is_string());
    }
    let (mock, status) = kind.rejecting(kind.mock());
    let rejecting = mock.start().await;
    let gateway = start_for(kind, &rejecting).await;
    let response = post(&gateway, &ask(false)).await;
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bad input words")
    );
}

/// The labels of a Messages request on `up` that failed upstream.
const FAILED_UPSTREAM: [(&str, &str); 4] = [
    ("api", "messages"),
    ("alias", "chat"),
    ("backend", "up"),
    ("status", "502"),
];

async fn a_stream_cut_mid_way_is_an_error_event_and_metered_once(kind: Kind) {
    let upstream = kind.mock().reset_after(2).start().await;
    let gateway = start_for(kind, &upstream).await;
    let events = stream(&gateway, &ask(true)).await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert_eq!(events[0].0, "message_start");
    assert!(!events.iter().any(|(n, _)| n == "message_stop"));
    gateway.recorded_once(&FAILED_UPSTREAM).await;
}

#[tokio::test]
async fn a_stream_the_upstream_ends_unfinished_is_an_error_event_not_an_answer() {
    let upstream = unfinished_stream().start().await;
    let gateway = start_for(Kind::OpenAi, &upstream).await;
    let events = stream(&gateway, &ask(true)).await;
    assert_eq!(text_of(&events), "Hello");
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert!(
        !events
            .iter()
            .any(|(n, _)| n == "message_delta" || n == "message_stop"),
        "no stop_reason is made up: {events:?}"
    );
    gateway.recorded_once(&FAILED_UPSTREAM).await;
}

for_each_kind!(
    a_whole_answer_is_a_message_with_exact_usage,
    a_stream_is_anthropics_event_sequence,
    a_tool_call_goes_out_and_its_result_comes_back_in,
    upstream_errors_are_anthropic_errors,
    a_stream_cut_mid_way_is_an_error_event_and_metered_once,
);

/// A gateway with keys, in front of a vLLM mock.
async fn keyed(upstream: &MockServer) -> Gateway {
    let config = Config::new()
        .backend(Backend::upstream("up", "vllm", &url(upstream)))
        .model(Model::new("chat").deployment(Deployment::new("up", "m")))
        .key(Key::new("team"));
    start(&config).await
}

#[tokio::test]
async fn a_key_comes_as_x_api_key_or_bearer_and_errors_are_anthropic_shaped() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = keyed(&upstream).await;
    let send = |auth: Option<(&'static str, &'static str)>| {
        let mut request = gateway
            .post("/v1/messages")
            .header("anthropic-version", "2023-06-01")
            .json(&ask(false));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        request.send()
    };
    let ok = send(Some(("x-api-key", "team-secret"))).await.unwrap();
    assert_eq!(ok.status(), 200);
    let ok = send(Some(("authorization", "Bearer team-secret")))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for auth in [None, Some(("x-api-key", "wrong"))] {
        let refused = send(auth).await.unwrap();
        assert_eq!(refused.status(), 401);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
}

#[tokio::test]
async fn bad_input_is_a_clear_anthropic_error_never_a_panic() {
    let upstream = MockUpstream::openai().start().await;
    let config = Config::new()
        .set("server", "max_body_bytes", 4096)
        .backend(Backend::upstream("up", "vllm", &url(&upstream)))
        .model(Model::new("chat").deployment(Deployment::new("up", "m")));
    let gateway = start(&config).await;
    let send = |body: String| gateway.post("/v1/messages").body(body).send();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let cases = [
        (
            r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            "{not json".to_owned(),
            400,
            "invalid_request_error",
            "not valid JSON",
        ),
        (
            r#"{"model":"chat","max_tokens":"many","messages":[]}"#.to_owned(),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            r#"{"model":"chat","max_tokens":0,"messages":[{"role":"user","content":"hi"}]}"#
                .to_owned(),
            400,
            "invalid_request_error",
            "`max_tokens` must be at least 1",
        ),
        (
            r#"{"model":"chat","max_tokens":8,"messages":[]}"#.to_owned(),
            400,
            "invalid_request_error",
            "messages",
        ),
        (
            r#"{"model":"chat","max_tokens":8,"messages":[{"role":"system","content":"hi"}]}"#
                .to_owned(),
            400,
            "invalid_request_error",
            "messages[0].role",
        ),
        (
            format!(r#"{{"model":"chat","max_tokens":8,"messages":{deep}}}"#),
            413,
            "request_too_large",
            "larger",
        ),
        (
            format!(
                r#"{{"model":"chat","max_tokens":8,"messages":[{{"role":"user","content":{}{}}}]}}"#,
                "[".repeat(1000),
                "]".repeat(1000)
            ),
            400,
            "invalid_request_error",
            "recursion limit",
        ),
        (
            r#"{"model":"nope","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#
                .to_owned(),
            404,
            "not_found_error",
            "nope",
        ),
    ];
    for (body, status, kind, says) in cases {
        let response = send(body.clone()).await.unwrap();
        assert_eq!(response.status(), status, "{body:.80}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{says}: {message}");
    }
    // Outside the one method and path the gateway serves, still Anthropic's
    // shape: the batches API is not served, and a GET is not a request.
    for (method, path, status, kind) in [
        ("GET", "/v1/messages", 405, "invalid_request_error"),
        ("PUT", "/v1/messages/", 405, "invalid_request_error"),
        ("POST", "/v1/messages/batches", 404, "not_found_error"),
    ] {
        let response = gateway
            .http
            .request(method.parse().unwrap(), format!("{}{path}", gateway.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error", "{method} {path}: {error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
    }
    let openai: Value = gateway
        .get("/v1/messagesx", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(openai["error"]["type"], "invalid_request_error", "{openai}");
    assert_eq!(openai.get("type"), None, "{openai}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn an_image_from_the_eu_is_refused_a_multimodal_llama() {
    let upstream = MockUpstream::openai().start().await;
    let config = Config::new()
        .admin()
        .backend(Backend::upstream("up", "vllm", &url(&upstream)))
        .model(
            Model::new("vision").deployment(
                Deployment::new("up", "meta-llama/Llama-4-Maverick-17B-128E-Instruct")
                    .set("licence", "llama")
                    .multimodal(&["text", "image"]),
            ),
        );
    let gateway = start(&config).await;
    let body = json!({"model": "vision", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_base64(640, 480)}},
        {"type": "text", "text": "What is this?"}]}]});
    let refused = gateway
        .post("/v1/messages")
        .header("x-tollgate-region", "eu")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 451);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "permission_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Llama licence"),
        "{error}"
    );
    // Explain reads the Messages body the same way.
    for (region, status) in [("eu", 451), ("us", 200)] {
        let explained = gateway
            .explain(json!({"request": body, "api": "messages", "region": region}))
            .await;
        assert_eq!(explained["status"], status, "{explained}");
    }
    let served = gateway
        .post("/v1/messages")
        .header("x-tollgate-region", "us")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let sent = upstream.single_request().json;
    assert_eq!(
        sent["messages"][0]["content"][0]["image_url"]["url"],
        png(640, 480)
    );
}

#[tokio::test]
async fn count_tokens_answers_the_gateways_estimate() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = keyed(&upstream).await;
    let response = gateway
        .post("/v1/messages/count_tokens")
        .header("x-api-key", "team-secret")
        .json(&json!({"model": "chat", "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hello there, how are you today?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let tokens = body["input_tokens"].as_u64().unwrap();
    assert!((5..40).contains(&tokens), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1);
    let refused = gateway
        .post("/v1/messages/count_tokens")
        .json(&json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(upstream.hits(), 0);
}

/// Reasoning is a `thinking` block, never text, whole and streamed.
async fn reasoning_stays_reasoning(kind: Kind) {
    let upstream = kind.reasoning_mock().start().await;
    let gateway = start_for(kind, &upstream).await;
    let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
    assert_eq!(
        body["content"],
        json!([{"type": "thinking", "thinking": REASONING.concat(), "signature": ""},
            {"type": "text", "text": "tok tok tok "}]),
        "{body}"
    );
    let events = stream(&gateway, &ask(true)).await;
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"])
        .collect();
    assert_eq!(starts[0]["type"], "thinking");
    assert_eq!(starts[1]["type"], "text");
    let thinking: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["thinking"].as_str())
        .collect();
    assert_eq!(thinking, REASONING.concat());
    assert_eq!(text_of(&events), "tok tok tok ");
    assert!(
        events
            .iter()
            .all(|(_, d)| d["delta"]["type"] != "text_delta" || d["index"] == 1)
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

#[tokio::test]
async fn images_reach_bedrock_as_bytes_and_a_url_is_a_clear_400() {
    let upstream = Kind::Bedrock.mock().start().await;
    let config = Config::new()
        .backend(Kind::Bedrock.backend("up", &upstream))
        .model(
            Model::new("vision").deployment(
                Deployment::new("up", "us.meta.llama3-2-11b-instruct-v1:0")
                    .multimodal(&["text", "image"]),
            ),
        );
    let gateway = start(&config).await;
    let image = |source: Value| {
        json!({"model": "vision", "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "image", "source": source}, {"type": "text", "text": "What is this?"}]}]})
    };
    let inline =
        image(json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}));
    let response = post(&gateway, &inline).await;
    assert_eq!(response.status(), 200);
    let sent = upstream.single_request().json;
    assert_eq!(
        sent["messages"][0]["content"][0],
        json!({"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}})
    );
    let linked = image(json!({"type": "url", "url": "https://example.com/a.png"}));
    let response = post(&gateway, &linked).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data URL"),
        "{error}"
    );
}

/// `thinking` goes upstream as the effort of its budget where the
/// upstream takes one (OpenAI-compatible servers); Bedrock and TGI would
/// answer without it, so it is a 400 that names `thinking`, as the client
/// sent it, and nothing goes upstream.
async fn thinking_goes_as_far_as_the_upstream_supports(kind: Kind) {
    let mock = match kind {
        Kind::OpenAi => kind.reasoning_mock(),
        Kind::Bedrock | Kind::Tgi => kind.mock(),
    };
    let upstream = mock.start().await;
    let gateway = start_for(kind, &upstream).await;
    let mut thinking = ask(false);
    thinking["max_tokens"] = json!(8000);
    thinking["thinking"] = json!({"type": "enabled", "budget_tokens": 4096});
    let response = post(&gateway, &thinking).await;
    match kind {
        Kind::OpenAi => {
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["content"][0]["type"], "thinking", "{body}");
            let sent = upstream.single_request().json;
            assert_eq!(sent["reasoning_effort"], "high", "{sent}");
            assert!(sent.get("thinking").is_none(), "{sent}");
        }
        Kind::Bedrock | Kind::Tgi => {
            assert_eq!(response.status(), 400);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            let says = body["error"]["message"].as_str().unwrap();
            assert!(says.contains("`thinking`"), "{says}");
            assert!(!says.contains("reasoning_effort"), "{says}");
            assert_eq!(upstream.hits(), 0);
        }
    }
    thinking["thinking"] = json!({"type": "disabled"});
    assert_eq!(post(&gateway, &thinking).await.status(), 200);
}

for_each_kind!(thinking_goes_as_far_as_the_upstream_supports);

/// Together, Groq and OpenAI share the OpenAI-compatible provider but not
/// its details: Together's recorded answers end with `eos` and its stream
/// has usage on the last chunk (it takes no `stream_options`), Groq's
/// carries usage in `x_groq`, OpenAI takes `max_completion_tokens`. Each
/// still makes Anthropic's event sequence and message, with the
/// upstream's own counts.
#[tokio::test]
async fn together_groq_and_openai_answers_become_messages_with_their_usage() {
    for recorded in RECORDED {
        let (upstream, gateway) = recorded.start().await;
        let kind = recorded.kind;
        let events = stream(&gateway, &ask(true)).await;
        assert_eq!(
            names(&events),
            names(&reference("basic_response.sse")),
            "{kind}"
        );
        let sent = upstream.single_request().json;
        assert_eq!(sent[recorded.limit_field()], 16, "{kind}: {sent}");
        // Together takes no stream_options; the others are asked for usage.
        assert_eq!(
            sent.get("stream_options").is_some(),
            kind != "together",
            "{kind}: {sent}"
        );
        assert_eq!(text_of(&events), recorded.text, "{kind}");
        let (_, end) = &events[events.len() - 2];
        assert_eq!(end["delta"]["stop_reason"], "end_turn", "{kind}: {end}");
        assert_eq!(
            end["usage"]["output_tokens"], recorded.output_tokens,
            "{kind}"
        );
        assert_eq!(
            end["usage"]["input_tokens"], recorded.input_tokens,
            "{kind}"
        );

        let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
        let (text, input, output) = recorded.whole_answer();
        assert_eq!(
            body["content"],
            json!([{"type": "text", "text": text}]),
            "{kind}"
        );
        assert_eq!(body["stop_reason"], "end_turn", "{kind}: {body}");
        assert_eq!(
            body["usage"],
            json!({"input_tokens": input, "output_tokens": output}),
            "{kind}"
        );
    }
}

/// Converse says an answer stopped on a stop sequence but not which: with
/// one stop sequence sent, Messages names it, whole and streamed; with
/// several it cannot, and says `end_turn`.
#[tokio::test]
async fn bedrock_names_the_stop_sequence_when_the_request_sent_one() {
    let usage = json!({"inputTokens": 11, "outputTokens": 2, "totalTokens": 13});
    let delta = |text: &str| {
        support::bedrock_mock::event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": text}}),
        )
    };
    let frames = vec![
        support::bedrock_mock::event("messageStart", json!({"role": "assistant"})),
        delta("tok "),
        delta("tok"),
        support::bedrock_mock::event("contentBlockStop", json!({"contentBlockIndex": 0})),
        support::bedrock_mock::event("messageStop", json!({"stopReason": "stop_sequence"})),
        support::bedrock_mock::event(
            "metadata",
            json!({"usage": usage, "metrics": {"latencyMs": 9}}),
        ),
    ];
    let upstream = bedrock_mock_with_token()
        .events(frames)
        .json(
            json!({"output": {"message": {"role": "assistant", "content": [{"text": "tok tok"}]}},
            "stopReason": "stop_sequence", "usage": usage, "metrics": {"latencyMs": 9}}),
        )
        .start()
        .await;
    let gateway = start_for(Kind::Bedrock, &upstream).await;
    for (stops, reason, sequence) in [
        (json!(["END"]), "stop_sequence", json!("END")),
        (json!(["END", "STOP"]), "end_turn", Value::Null),
    ] {
        let mut whole = ask(false);
        whole["stop_sequences"] = stops.clone();
        let body: Value = post(&gateway, &whole).await.json().await.unwrap();
        assert_eq!(body["stop_reason"], reason, "{stops}: {body}");
        assert_eq!(body["stop_sequence"], sequence, "{stops}");
        whole["stream"] = json!(true);
        let events = stream(&gateway, &whole).await;
        let (_, end) = &events[events.len() - 2];
        assert_eq!(end["delta"]["stop_reason"], reason, "{stops}: {end}");
        assert_eq!(end["delta"]["stop_sequence"], sequence, "{stops}");
    }
}

#[tokio::test]
async fn the_simulated_backend_serves_messages_too() {
    let config = Config::new()
        .backend(Backend::simulated("sim").answers(0, 100_000, 4))
        .model(Model::new("chat").deployment(Deployment::new("sim", "m")));
    let gateway = start(&config).await;
    let body: Value = post(&gateway, &ask(false)).await.json().await.unwrap();
    assert_eq!(body["type"], "message", "{body}");
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["usage"]["output_tokens"], 4);
    let events = stream(&gateway, &ask(true)).await;
    assert_eq!(names(&events), names(&reference("basic_response.sse")));
    assert_eq!(events[events.len() - 2].1["usage"]["output_tokens"], 4);
    // Asked to think, it reasons first: half its words at medium effort.
    let mut thinking = ask(false);
    thinking["max_tokens"] = json!(3000);
    thinking["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
    let body: Value = post(&gateway, &thinking).await.json().await.unwrap();
    let blocks: Vec<(&str, usize)> = body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let kind = b["type"].as_str().unwrap();
            (kind, b[kind].as_str().unwrap().split(' ').count())
        })
        .collect();
    assert_eq!(blocks, [("thinking", 2), ("text", 2)], "{body}");
    assert_eq!(body["usage"]["output_tokens"], 4);
    thinking["stream"] = json!(true);
    let events = stream(&gateway, &thinking).await;
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["type"].as_str())
        .collect();
    assert_eq!(
        deltas,
        [
            "thinking_delta",
            "thinking_delta",
            "text_delta",
            "text_delta"
        ]
    );
}

/// A budgeted stream from vLLM carries vLLM's usage so far in every
/// chunk; a Messages client gets Anthropic's events as ever, with the
/// usage counted once, at the end, and a Responses client likewise.
#[tokio::test]
async fn a_budgeted_stream_with_vllms_running_usage_reads_the_same_on_every_api() {
    let upstream = MockUpstream::openai()
        .answers_of(12)
        .token_text("token ")
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("up", "vllm", &url(&upstream)))
        .model(Model::new("chat").deployment(Deployment::new("up", "m").price(1.0, 10.0)))
        .key(Key::new("team").set("budget_daily_usd", 10.0));
    let gateway = start(&config).await;
    let messages = gateway
        .post("/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "team-secret")
        .json(&ask(true))
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    let events = named_events(&messages.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(text_of(&events), "token ".repeat(12));
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["usage"]["output_tokens"], 12, "{delta}");
    assert_eq!(delta["delta"]["stop_reason"], "end_turn", "{delta}");

    let responses = gateway
        .post_as(
            "team-secret",
            "/v1/responses",
            json!({"model": "chat", "stream": true, "input": "Hello"}),
        )
        .await;
    assert_eq!(responses.status(), 200);
    let events = named_events(&responses.text().await.unwrap());
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    assert_eq!(done["response"]["usage"]["output_tokens"], 12, "{done}");
    let sent: Vec<Value> = upstream.requests().iter().map(|r| r.json.clone()).collect();
    for request in &sent {
        assert_eq!(
            request["stream_options"]["continuous_usage_stats"], true,
            "{request}"
        );
    }
}
