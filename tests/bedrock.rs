//! Bedrock deployments through the gateway, against the mock Bedrock in
//! `support/bedrock_mock.rs`, which re-derives every request's SigV4
//! signature from its own copy of the secret and answers in real
//! event-stream frames. What every backend kind shares is in
//! `client_behaviour.rs`; this file holds what is Bedrock's own.

mod support;

use std::time::Duration;

use bytes::Bytes;
use hyper::HeaderMap;
use serde_json::{Value, json};
use support::bedrock_mock::{self, Auth, Expect};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::*;
use support::mock::{MockServer, MockUpstream};
use support::sigv4;

const LLAMA_33: &str = "us.meta.llama3-3-70b-instruct-v1:0";
const LLAMA_31: &str = "meta.llama3-1-8b-instruct-v1:0";

/// Backend `bedrock-us` on the mock at `upstream`, with no credentials.
fn bedrock_us(upstream: &MockServer) -> Backend {
    Backend::bedrock("bedrock-us", &upstream.base_url())
}

/// Backend `bedrock-us` on the mock at `upstream`, signing as
/// `bedrock_mock_with_token` expects.
fn signed(upstream: &MockServer) -> Backend {
    bedrock_us(upstream).sigv4_with_token()
}

/// Alias `alias` on `model_id` of backend `bedrock-us`.
fn on_bedrock(alias: &str, model_id: &str) -> Model {
    Model::new(alias).deployment(Deployment::new("bedrock-us", model_id))
}

/// A gateway where alias `chat` is `model_id` on `bedrock`.
async fn one_backend(bedrock: Backend, model_id: &str) -> Gateway {
    let config = Config::new()
        .backend(bedrock)
        .model(on_bedrock("chat", model_id));
    start(&config).await
}

/// Alias `chat` on a Bedrock vision model, so requests with images may
/// reach it.
async fn vision_backend(upstream: &MockServer) -> Gateway {
    let vision = Deployment::new("bedrock-us", "us.meta.llama3-2-90b-instruct-v1:0")
        .multimodal(&["text", "image"]);
    let config = Config::new()
        .backend(signed(upstream))
        .model(Model::new("chat").deployment(vision));
    start(&config).await
}

/// A gateway where alias `chat` is served by `bedrock` then by a vLLM
/// mock (returned, to count its hits), and alias `alone` by `bedrock` only.
async fn with_backup(bedrock: &MockServer) -> (Gateway, MockServer) {
    let backup = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(signed(bedrock))
        .backend(Backend::upstream("vllm", "vllm", &url(&backup)))
        .model(
            Model::new("chat")
                .deployment(Deployment::new("bedrock-us", LLAMA_33))
                .deployment(Deployment::new("vllm", "llama")),
        )
        .model(on_bedrock("alone", LLAMA_33));
    (start(&config).await, backup)
}

fn chat(stream: bool) -> Value {
    json!({"model": "chat", "messages": user("Hello"), "stream": stream})
}

#[test]
fn the_mock_verifier_accepts_the_golden_vector_and_no_other_secret() {
    // PROTOCOLS.md 4.7, computed there with botocore and aws-sigv4.
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert(
        "host",
        "bedrock-runtime.us-east-1.amazonaws.com".parse().unwrap(),
    );
    headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
    headers.insert("authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=57369b61c2f182ee97acdb5d1e03f7b072896a1137b7fcce28438cbfb59dc5cc".parse().unwrap());
    let body = br#"{"messages":[{"role":"user","content":[{"text":"Hello"}]}],"inferenceConfig":{"maxTokens":64}}"#;
    let path = "/model/meta.llama3-3-70b-instruct-v1%3A0/converse";
    let creds = |secret| sigv4::Credentials {
        access_key_id: "AKIDEXAMPLE",
        secret_access_key: secret,
        session_token: None,
        region: "us-east-1",
        service: "bedrock",
    };
    let canonical = sigv4::canonical_request(
        "POST",
        path,
        "",
        &headers,
        "content-type;host;x-amz-date",
        body,
    );
    assert!(
        canonical.contains("\n/model/meta.llama3-3-70b-instruct-v1%253A0/converse\n"),
        "{canonical}"
    );
    sigv4::verify(
        &creds("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        "POST",
        path,
        "",
        &headers,
        body,
    )
    .unwrap();
    assert!(sigv4::verify(&creds("another"), "POST", path, "", &headers, body).is_err());
}

#[tokio::test]
async fn requests_are_signed_with_the_session_token_and_model_ids_with_a_colon_are_encoded() {
    let upstream = bedrock_mock_with_token().start().await;
    let config = Config::new()
        .backend(signed(&upstream))
        .model(on_bedrock("llama-3.3", LLAMA_33))
        .model(on_bedrock("llama-3.1", LLAMA_31));
    let gateway = start(&config).await;
    for (alias, stream) in [("llama-3.3", false), ("llama-3.1", true)] {
        let response = gateway
            .chat(json!({"model": alias, "messages": user("Hello"), "stream": stream}))
            .await;
        assert_eq!(
            response.status(),
            200,
            "{alias}: {}",
            response.text().await.unwrap()
        );
        response.bytes().await.unwrap();
    }
    let requests = upstream.requests();
    assert_eq!(
        requests[0].path,
        "/model/us.meta.llama3-3-70b-instruct-v1%3A0/converse"
    );
    assert_eq!(
        requests[1].path,
        "/model/meta.llama3-1-8b-instruct-v1%3A0/converse-stream"
    );
    for request in &requests {
        assert_eq!(request.header("x-amz-security-token"), Some(AWS_TOKEN));
        let authorization = request.header("authorization").unwrap();
        assert!(
            authorization.contains("/us-east-1/bedrock/aws4_request"),
            "{authorization}"
        );
        assert!(
            authorization.contains("x-amz-security-token"),
            "{authorization}"
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
}

#[tokio::test]
async fn a_refused_signature_is_the_operators_problem_not_the_clients() {
    let upstream = bedrock_mock_with_token().start().await;
    let wrong_secret = signed(&upstream).set("aws_secret_access_key_env", "AWS_WRONG_SECRET_TEST");
    let gateway = one_backend(wrong_secret, LLAMA_33).await;
    for stream in [false, true] {
        let response = gateway.chat(chat(stream)).await;
        assert_eq!(response.status(), 502);
        let error = error_of(response).await;
        assert_eq!(error["code"], "upstream_auth_failed");
        let text = message(&error);
        assert!(
            text.contains("refused the gateway's own AWS credentials"),
            "{text}"
        );
        assert!(text.contains("InvalidSignatureException"), "{text}");
        assert!(
            !text.contains("not/the/secret") && !text.contains(AWS_TOKEN),
            "no secret in {text}"
        );
    }
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_bedrock_api_key_is_sent_as_a_bearer_token_without_sigv4() {
    let upstream = MockUpstream::bedrock(Expect {
        region: "us-east-1".into(),
        auth: Auth::ApiKey(BEDROCK_API_KEY.into()),
    })
    .start()
    .await;
    let with_api_key = bedrock_us(&upstream).set("api_key_env", "BEDROCK_API_KEY_TEST");
    let gateway = one_backend(with_api_key, LLAMA_33).await;
    let response = gateway.chat(chat(false)).await;
    assert_eq!(response.status(), 200);
    let request = upstream.single_request();
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {BEDROCK_API_KEY}").as_str())
    );
    assert_eq!(request.header("x-amz-date"), None);
}

#[tokio::test]
async fn a_chat_request_becomes_a_converse_request() {
    let upstream = bedrock_mock_with_token().start().await;
    let gateway = vision_backend(&upstream).await;
    let response = gateway
        .chat(json!({"model": "chat", "max_completion_tokens": 100, "temperature": 0.2, "top_p": 0.9,
            "stop": ["\n\n"], "user": "u-1", "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": "What is this?"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}}]},
        ]}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.single_request().json,
        json!({
            "messages": [{"role": "user", "content": [{"text": "What is this?"},
                {"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQSkZJRg=="}}}]}],
            "system": [{"text": "Answer briefly."}, {"text": "Use French."}],
            "inferenceConfig": {"maxTokens": 100, "temperature": 0.2, "topP": 0.9, "stopSequences": ["\n\n"]},
        })
    );
}

#[tokio::test]
async fn what_bedrock_cannot_take_is_refused_before_any_upstream_call() {
    let upstream = bedrock_mock_with_token().start().await;
    let gateway = vision_backend(&upstream).await;
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]);
    let response = gateway
        .chat(json!({"model": "chat", "messages": image}))
        .await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "messages[0].content[0].image_url.url");
    assert!(
        message(&error).contains("Bedrock needs images inline"),
        "{error}"
    );

    let response = gateway
        .completion(json!({"model": "chat", "prompt": "Once upon"}))
        .await;
    assert_eq!(response.status(), 400);
    assert!(message(&error_of(response).await).contains("serves chat only"));
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn parameters_bedrock_cannot_honour_are_a_400_naming_them_unless_the_backend_drops_them() {
    let upstream = bedrock_mock_with_token().start().await;
    let gateway = one_backend(signed(&upstream), LLAMA_33).await;
    let schema = json!({"type": "json_schema", "json_schema": {"name": "answer",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    for (param, value) in [("response_format", schema), ("logprobs", json!(true))] {
        let mut request = chat(false);
        request[param] = value;
        let response = gateway.chat(request).await;
        assert_eq!(response.status(), 400, "{param}");
        let error = error_of(response).await;
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], param);
        assert!(
            message(&error).starts_with(&format!("Bedrock cannot honour `{param}`; leave it out")),
            "{error}"
        );
    }
    assert_eq!(upstream.hits(), 0, "refused before any upstream call");

    // What asks for nothing passes.
    let mut request = chat(false);
    request["logprobs"] = json!(false);
    request["response_format"] = json!({"type": "text"});
    request["presence_penalty"] = json!(0);
    assert_eq!(gateway.chat(request).await.status(), 200);

    let dropping = bedrock_mock_with_token().start().await;
    let backend = signed(&dropping).set("drop_params", vec!["logprobs", "seed"]);
    let gateway = one_backend(backend, LLAMA_33).await;
    let mut request = chat(false);
    request["logprobs"] = json!(true);
    request["seed"] = json!(7);
    assert_eq!(gateway.chat(request.clone()).await.status(), 200);
    assert!(dropping.single_request().json.get("logprobs").is_none());
    request["presence_penalty"] = json!(1);
    let error = error_of(gateway.chat(request).await).await;
    assert_eq!(error["param"], "presence_penalty");

    // An alias with a deployment that can honour it serves it there.
    let bedrock = bedrock_mock_with_token().start().await;
    let (gateway, backup) = with_backup(&bedrock).await;
    let mut request = chat(false);
    request["logprobs"] = json!(true);
    let response = gateway.chat(request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response).0, "vllm");
    assert_eq!(backup.single_request().json["logprobs"], true);
    assert_eq!(bedrock.hits(), 0);
}

#[test]
fn the_mock_refuses_tool_blocks_without_a_tool_config_as_bedrock_does() {
    let history = json!({"messages": [
        {"role": "user", "content": [{"text": "Weather?"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "c1", "name": "get_weather", "input": {}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "c1", "content": [{"text": "18C"}]}}]},
    ]});
    assert_eq!(
        bedrock_mock::check_converse(&history),
        Err("The toolConfig field must be defined when using toolUse and toolResult content blocks.".into())
    );
    let mut with_config = history;
    with_config["toolConfig"] = json!({"tools": [{"toolSpec": {"name": "get_weather",
        "inputSchema": {"json": {"type": "object"}}}}]});
    assert_eq!(bedrock_mock::check_converse(&with_config), Ok(()));
}

#[tokio::test]
async fn tool_history_without_tools_offers_bedrock_the_tools_it_called() {
    let upstream = bedrock_mock_with_token().start().await;
    let gateway = one_backend(signed(&upstream), LLAMA_33).await;
    let response = gateway
        .chat(json!({"model": "chat", "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "Say it in French."},
        ]}))
        .await;
    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await.unwrap());
    assert_eq!(
        upstream.single_request().json["toolConfig"],
        json!({"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}]})
    );
}

#[tokio::test]
async fn frames_cut_across_tcp_writes_come_out_whole() {
    let upstream = bedrock_mock_with_token().split_every(5).start().await;
    let gateway = one_backend(signed(&upstream), LLAMA_33).await;
    let body = json!({"model": "chat", "messages": user("Hello"), "stream": true, "stream_options": {"include_usage": true}});
    let (_, events) = gateway.stream("/v1/chat/completions", body).await;
    let payloads = events.rest().await;
    let text: String = payloads
        .iter()
        .filter(|p| *p != "[DONE]")
        .filter_map(|p| {
            parse(p)["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "tok tok tok ");
    assert_eq!(
        parse(&payloads[payloads.len() - 2])["usage"]["total_tokens"],
        14
    );
}

#[tokio::test]
async fn an_exception_frame_is_an_http_error_first_and_an_sse_error_event_later() {
    let throttled =
        bedrock_mock::exception("throttlingException", "Too many requests, please wait.");
    // First: the client still gets an HTTP error, and failover is possible.
    let first = bedrock_mock_with_token()
        .events(vec![throttled.clone()])
        .start()
        .await;
    let (gateway, _backup) = with_backup(&first).await;
    let (headers, events) = gateway.stream("/v1/chat/completions", chat(true)).await;
    assert_eq!(headers["x-tollgate-backend"], "vllm");
    events.rest().await;
    let response = gateway
        .chat(json!({"model": "alone", "messages": user("Hi"), "stream": true}))
        .await;
    assert_eq!(response.status(), 429);
    // Bedrock says no wait: the gateway's own backoff's first step.
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(message(&error_of(response).await).contains("Too many requests"));

    // After the first chunk: an SSE error event, then [DONE].
    let mut frames = bedrock_mock::frames(false);
    frames.truncate(2);
    frames.push(throttled);
    let later = bedrock_mock_with_token().events(frames).start().await;
    let gateway = one_backend(signed(&later), LLAMA_33).await;
    let (_, events) = gateway.stream("/v1/chat/completions", chat(true)).await;
    let payloads = events.rest().await;
    assert_eq!(payloads.len(), 4, "{payloads:#?}");
    assert_eq!(
        parse(&payloads[1])["choices"][0]["delta"]["content"],
        "tok "
    );
    let error = parse(&payloads[2]);
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(payloads[3], "[DONE]");
}

#[tokio::test]
async fn bedrock_errors_map_to_client_statuses_and_failover() {
    let bedrock_error = |status: u16, name: &str| {
        bedrock_mock_with_token()
            .error(status, json!({"message": format!("{name} says no")}))
            .header(
                "x-amzn-errortype",
                &format!("{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            )
    };
    // (Bedrock's status and error, the client's status, whether the next
    // deployment is tried)
    let cases = [
        (429, "ThrottlingException", 429, true),
        (429, "ModelNotReadyException", 503, true),
        (503, "ServiceUnavailableException", 503, true),
        (408, "ModelTimeoutException", 504, true),
        (400, "ValidationException", 400, false),
        (403, "AccessDeniedException", 502, false),
    ];
    for (status, name, client, fails_over) in cases {
        let failing = bedrock_error(status, name).start().await;
        let (gateway, backup) = with_backup(&failing).await;
        let response = gateway
            .chat(json!({"model": "alone", "messages": user("Hi")}))
            .await;
        assert_eq!(response.status(), client, "{name}");
        assert!(message(&error_of(response).await).contains(name), "{name}");
        let response = gateway.chat(chat(false)).await;
        let served_by = response.headers()["x-tollgate-backend"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(served_by == "vllm", fails_over, "{name}");
        assert_eq!(backup.hits(), usize::from(fails_over), "{name}");
    }
}

#[tokio::test]
async fn a_stream_cut_inside_a_frame_is_an_error_not_a_silent_end() {
    let mut frames = bedrock_mock::frames(false);
    frames.truncate(3);
    let cut = frames.pop().unwrap();
    frames.push(Bytes::copy_from_slice(&cut[..cut.len() / 2]));
    let upstream = bedrock_mock_with_token()
        .events(frames)
        .event_delay(Duration::from_millis(5))
        .start()
        .await;
    let gateway = one_backend(signed(&upstream), LLAMA_33).await;
    let (_, events) = gateway.stream("/v1/chat/completions", chat(true)).await;
    let payloads = events.rest().await;
    let error = parse(&payloads[payloads.len() - 2]);
    assert!(
        message(&error["error"]).contains("middle of an event-stream frame"),
        "{payloads:#?}"
    );
}

/// A reasoning model's reasoning, streamed: `reasoningContent` deltas
/// become chunks with `reasoning_content` (where vLLM streams it), never
/// `content`; a signature delta has no chunk; the answer follows.
#[tokio::test]
async fn reasoning_deltas_stream_as_reasoning_content_not_text() {
    let delta = |index: u32, delta: Value| {
        bedrock_mock::event(
            "contentBlockDelta",
            json!({"contentBlockIndex": index, "delta": delta}),
        )
    };
    let frames = vec![
        bedrock_mock::event("messageStart", json!({"role": "assistant"})),
        delta(
            0,
            json!({"reasoningContent": {"text": "The user greets; "}}),
        ),
        delta(0, json!({"reasoningContent": {"text": "answer briefly."}})),
        delta(
            0,
            json!({"reasoningContent": {"signature": "c2lnbmF0dXJl"}}),
        ),
        bedrock_mock::event("contentBlockStop", json!({"contentBlockIndex": 0})),
        delta(1, json!({"text": "Hello!"})),
        bedrock_mock::event("contentBlockStop", json!({"contentBlockIndex": 1})),
        bedrock_mock::event("messageStop", json!({"stopReason": "end_turn"})),
        bedrock_mock::event(
            "metadata",
            json!({"usage": {"inputTokens": 9, "outputTokens": 12, "totalTokens": 21},
                   "metrics": {"latencyMs": 80}}),
        ),
    ];
    let upstream = bedrock_mock_with_token().events(frames).start().await;
    let gateway = one_backend(signed(&upstream), LLAMA_33).await;
    let (_, events) = gateway.stream("/v1/chat/completions", chat(true)).await;
    let deltas: Vec<Value> = events
        .rest()
        .await
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| parse(p)["choices"][0]["delta"].clone())
        .collect();
    let reasoning: Vec<&str> = deltas
        .iter()
        .filter_map(|d| d["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, ["The user greets; ", "answer briefly."]);
    let text: Vec<&str> = deltas
        .iter()
        .filter_map(|d| d["content"].as_str())
        .collect();
    assert_eq!(text.concat(), "Hello!");
    gateway
        .eventually_exact_output_tokens("chat", "chat", "bedrock-us", 12)
        .await;
}
