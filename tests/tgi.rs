//! TGI deployments through the gateway, against the mock TGI in
//! `support/tgi_mock.rs`: chat through the Messages API, legacy
//! completions through `/generate` and `/generate_stream`, and TGI's
//! errors. What every backend kind shares is in `client_behaviour.rs`.

mod support;

use bytes::Bytes;
use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::*;
use support::mock::{self, MockServer, MockUpstream};
use support::openai_mock::CANNED_PROMPT_TOKENS;
use support::tgi_mock::{self, GENERATED};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Backend `tgi` on the mock TGI at `upstream`.
fn tgi(upstream: &MockServer) -> Backend {
    Backend::upstream("tgi", "tgi", &upstream.base_url())
}

async fn one_backend(upstream: &MockServer) -> Gateway {
    let config = Config::new()
        .backend(tgi(upstream))
        .model(Model::new("chat").deployment(Deployment::new("tgi", MODEL)));
    start(&config).await
}

fn legacy(stream: bool, include_usage: bool) -> Value {
    json!({"model": "chat", "prompt": "Once upon", "max_tokens": 8, "temperature": 0.5, "stop": "\n",
           "stream": stream, "stream_options": if stream { json!({"include_usage": include_usage}) } else { Value::Null }})
}

/// `GENERATED` and the end-of-sequence token.
fn generate_usage() -> Value {
    let completion = GENERATED.len() as u64 + 1;
    json!({"prompt_tokens": CANNED_PROMPT_TOKENS, "completion_tokens": completion,
           "total_tokens": CANNED_PROMPT_TOKENS + completion})
}

#[tokio::test]
async fn chat_goes_to_the_messages_api_and_its_usage_chunk_gets_the_stream_id() {
    let upstream = MockUpstream::tgi().start().await;
    let gateway = one_backend(&upstream).await;
    let body = json!({"model": "chat", "messages": user("Hi"), "stream": true, "stream_options": {"include_usage": true}});
    let (_, events) = gateway.stream("/v1/chat/completions", body).await;
    let payloads = events.rest().await;
    let usage = parse(&payloads[payloads.len() - 2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["id"], "chatcmpl-mock", "TGI's empty id is replaced");
    let request = upstream.single_request();
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.json["model"], MODEL);
    assert_eq!(request.json["stream_options"]["include_usage"], true);
    assert_eq!(request.header("authorization"), Some("Bearer sk-test-tgi"));
}

#[tokio::test]
async fn a_chat_error_event_carries_tgis_status() {
    let events = vec![
        Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n"),
        Bytes::from_static(b"data: {\"error\":{\"message\":\"Input validation error: too long\",\"http_status_code\":422}}\n\n"),
    ];
    let upstream = MockUpstream::tgi().events(events).start().await;
    let gateway = one_backend(&upstream).await;
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "messages": user("Hi"), "stream": true}),
        )
        .await;
    let payloads = events.rest().await;
    assert_eq!(payloads.len(), 3, "{payloads:#?}");
    let error = parse(&payloads[1]);
    assert_eq!(
        error["error"]["type"], "invalid_request_error",
        "422 is the request's fault: {error}"
    );
    assert!(message(&error["error"]).contains("too long"));
}

#[tokio::test]
async fn legacy_completions_use_generate_with_details_and_exact_usage() {
    let upstream = MockUpstream::tgi().start().await;
    let gateway = one_backend(&upstream).await;
    let response = gateway.completion(legacy(false, false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["text"], GENERATED.concat());
    assert_eq!(
        body["choices"][0]["finish_reason"], "stop",
        "eos_token is stop"
    );
    assert_eq!(body["usage"], generate_usage());
    let request = upstream.single_request();
    assert_eq!(request.path, "/generate");
    assert_eq!(
        request.json,
        json!({"inputs": "Once upon", "parameters": {"details": true, "max_new_tokens": 8, "temperature": 0.5, "stop": ["\n"]}})
    );
}

#[tokio::test]
async fn legacy_streams_use_generate_stream_with_the_usage_chunk_on_request() {
    let upstream = MockUpstream::tgi().start().await;
    let gateway = one_backend(&upstream).await;
    for include_usage in [true, false] {
        let (_, events) = gateway
            .stream("/v1/completions", legacy(true, include_usage))
            .await;
        let mut payloads = events.rest().await;
        assert_eq!(payloads.pop().as_deref(), Some("[DONE]"));
        let chunks: Vec<Value> = payloads.iter().map(|p| parse(p)).collect();
        if include_usage {
            let usage = chunks.last().unwrap();
            assert_eq!(usage["choices"], json!([]));
            assert_eq!(usage["usage"], generate_usage());
        } else {
            assert!(chunks.iter().all(|c| c["usage"].is_null()), "{chunks:#?}");
        }
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, GENERATED.concat(), "the special token is not text");
        let finish: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finish, ["stop"]);
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"])
        );
    }
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.path == "/generate_stream")
    );
    gateway
        .eventually_exact_output_tokens("completions", "chat", "tgi", 8)
        .await;
}

#[tokio::test]
async fn an_error_event_on_generate_stream_is_an_http_error_first_and_an_sse_error_event_later() {
    let failed = tgi_mock::error_event(
        "Request failed during generation: CUDA out of memory",
        "generation",
    );
    let first = MockUpstream::tgi()
        .events(vec![failed.clone()])
        .start()
        .await;
    let gateway = one_backend(&first).await;
    let response = gateway.completion(legacy(true, false)).await;
    assert_eq!(
        response.status(),
        502,
        "a generation failure is the upstream's"
    );
    assert!(message(&error_of(response).await).contains("CUDA out of memory"));

    let mut events = mock::split_events(b"data:{\"index\":1,\"token\":{\"id\":1,\"text\":\"tok \",\"logprob\":-0.1,\"special\":false},\"generated_text\":null,\"details\":null}\n\n");
    events.push(failed);
    let later = MockUpstream::tgi().events(events).start().await;
    let gateway = one_backend(&later).await;
    let (_, events) = gateway.stream("/v1/completions", legacy(true, false)).await;
    let payloads = events.rest().await;
    assert_eq!(payloads.len(), 3, "{payloads:#?}");
    assert_eq!(parse(&payloads[0])["choices"][0]["text"], "tok ");
    assert!(message(&parse(&payloads[1])["error"]).contains("CUDA out of memory"));
}

#[tokio::test]
async fn tgi_error_statuses_map_to_client_statuses_and_failover() {
    // (TGI's status and error type, the client's status, whether the
    // next deployment is tried)
    let cases = [
        (422, "validation", 422, false),
        (424, "generation", 502, true),
        (429, "overloaded", 429, true),
        (500, "incomplete_generation", 502, true),
    ];
    for (status, kind, client, fails_over) in cases {
        let failing = MockUpstream::tgi()
            .error(
                status,
                json!({"error": format!("{kind} went wrong"), "error_type": kind}),
            )
            .start()
            .await;
        let backup = MockUpstream::openai().start().await;
        let config = Config::new()
            .backend(tgi(&failing))
            .backend(Backend::upstream("vllm", "vllm", &url(&backup)))
            .model(
                Model::new("chat")
                    .deployment(Deployment::new("tgi", MODEL))
                    .deployment(Deployment::new("vllm", "llama")),
            )
            .model(Model::new("alone").deployment(Deployment::new("tgi", MODEL)));
        let gateway = start(&config).await;
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let body = json!({"model": "alone", "messages": user("Hi"), "prompt": "Hi"});
            let response = gateway.post(path).json(&body).send().await.unwrap();
            assert_eq!(response.status(), client, "{kind} on {path}");
            assert!(
                message(&error_of(response).await).contains("went wrong"),
                "{kind}"
            );
        }
        let response = gateway
            .chat(json!({"model": "chat", "messages": user("Hi")}))
            .await;
        let served_by = response.headers()["x-tollgate-backend"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(served_by == "vllm", fails_over, "{kind}");
    }
}

#[tokio::test]
async fn prompts_tgi_cannot_take_are_refused_before_any_upstream_call() {
    let upstream = MockUpstream::tgi().start().await;
    let gateway = one_backend(&upstream).await;
    let response = gateway
        .completion(json!({"model": "chat", "prompt": ["one", "two"]}))
        .await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "prompt");
    assert!(message(&error).contains("one prompt"));
    assert_eq!(upstream.hits(), 0);
}
