//! OpenAI-compatible backends (vLLM, OpenAI, Together, Groq) through the
//! gateway, as a client sees them, against the mock upstream in
//! `support/mock.rs`. Everything runs on 127.0.0.1, on ports picked by the OS.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::certs::{ServerTls, TestCa};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{self, MockServer, MockUpstream};
use support::openai_mock;

/// Alias `alias` on `backend`'s model `m`.
fn on(alias: &str, backend: &str) -> Model {
    Model::new(alias).deployment(Deployment::new(backend, "m"))
}

/// Alias `alias` on a vLLM backend `vllm` at `upstream`.
fn vllm(upstream: &MockServer, alias: &str) -> Config {
    Config::new()
        .backend(Backend::upstream("vllm", "vllm", &url(upstream)))
        .model(on(alias, "vllm"))
}

/// The payloads of a fixture's events, as the upstream sent them.
fn fixture_payloads(name: &str) -> Vec<String> {
    mock::split_events(&mock::fixture(name))
        .iter()
        .map(|e| {
            std::str::from_utf8(e)
                .unwrap()
                .trim_end()
                .strip_prefix("data: ")
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `payloads` without the usage-only chunk.
fn without_usage_chunk(payloads: &[String]) -> Vec<String> {
    payloads
        .iter()
        .filter(|p| !is_usage_only(p))
        .cloned()
        .collect()
}

// ---- pass-through ---------------------------------------------------------

#[tokio::test]
async fn chat_passes_through_every_kind_with_only_model_and_credential_changed() {
    let kinds = [
        ("vllm", "/v1", "vllm_chat.json"),
        ("openai", "/v1", "vllm_chat.json"),
        ("together", "/v1", "together_chat.json"),
        ("groq", "/openai/v1", "vllm_chat.json"),
    ];
    let mut mocks = Vec::new();
    let mut config = Config::new();
    for (kind, prefix, body) in kinds {
        let upstream = MockUpstream::openai()
            .body(mock::fixture(body))
            .start()
            .await;
        let base_url = format!("{}{prefix}", upstream.base_url());
        config = config
            .backend(Backend::upstream(kind, kind, &base_url))
            .model(
                Model::new(kind)
                    .deployment(Deployment::new(kind, &format!("upstream/{kind}-model"))),
            );
        mocks.push(upstream);
    }
    let gateway = start(&config).await;

    for ((kind, prefix, fixture), upstream) in kinds.into_iter().zip(&mocks) {
        let sent = json!({
            "model": kind,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}], "name": "ann"},
            ],
            "temperature": 0.2,
            "top_k": 40,
            "max_tokens": 64,
            "stream": false,
            "stream_options": {"include_usage": true},
            "seed": 7,
            "logit_bias": {"128000": -100},
            "vendor_extension": {"nested": [1, {"deep": null, "list": ["a", 2.5]}], "flag": true},
        });
        let response = gateway.chat(sent.clone()).await;
        assert_eq!(response.status(), 200, "{kind}");
        assert_eq!(response.headers()["x-tollgate-backend"], kind);
        assert!(!response.headers()["x-request-id"].is_empty());
        let body = response.bytes().await.unwrap();
        if kind == "together" {
            let mut expected: Value = serde_json::from_slice(&mock::fixture(fixture)).unwrap();
            expected["choices"][0]["finish_reason"] = json!("stop");
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap(),
                expected,
                "Together's eos becomes stop, nothing else changes"
            );
        } else {
            assert_eq!(
                body,
                mock::fixture(fixture),
                "{kind}: the body is passed on byte for byte"
            );
        }

        let got = upstream.single_request();
        assert_eq!(got.method, "POST");
        assert_eq!(got.path, format!("{prefix}/chat/completions"), "{kind}");
        assert_eq!(
            got.header("authorization"),
            Some(&*format!("Bearer sk-test-{kind}"))
        );
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.json["model"], format!("upstream/{kind}-model"));
        assert!(
            got.json.get("stream_options").is_none(),
            "{kind}: a non-streaming call carries no stream_options"
        );
        let (mut expected, mut received) = (sent.clone(), got.json.clone());
        for object in [&mut expected, &mut received] {
            let object = object.as_object_mut().unwrap();
            object.remove("model");
            object.remove("stream_options");
        }
        assert_eq!(received, expected, "{kind}: every other field untouched");
    }
}

#[tokio::test]
async fn legacy_completions_pass_through_streaming_and_not() {
    let upstream = MockUpstream::openai()
        .body(mock::fixture("vllm_completions.json"))
        .stream("vllm_completions_usage.sse")
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
        .model(
            Model::new("llama")
                .deployment(Deployment::new("vllm", "meta-llama/Llama-3.1-8B-Instruct")),
        );
    let gateway = start(&config).await;

    let sent = json!({"model": "llama", "prompt": ["Once"], "max_tokens": 5, "echo": false, "best_of": 1, "suffix": null});
    let response = gateway
        .post("/v1/completions")
        .json(&sent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.bytes().await.unwrap(),
        mock::fixture("vllm_completions.json")
    );

    let (_, events) = gateway
        .stream(
            "/v1/completions",
            json!({"model": "llama", "prompt": "Once", "max_tokens": 5, "stream": true}),
        )
        .await;
    let fixture = fixture_payloads("vllm_completions_usage.sse");
    assert_eq!(events.rest().await, without_usage_chunk(&fixture));

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let (whole, streamed) = (&requests[0], &requests[1]);
    assert_eq!(whole.path, "/v1/completions");
    assert_eq!(whole.json["model"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(whole.json["suffix"], Value::Null);
    assert_eq!(whole.json["best_of"], 1);
    assert!(whole.json.get("stream_options").is_none());
    assert_eq!(
        streamed.json["stream_options"],
        json!({"include_usage": true})
    );
}

/// Legacy completions key their top log-probabilities by token, and a
/// model can write any word: `usage`, `error`, `x_groq`. Only a chunk's own
/// `usage` is its usage, so such a stream passes through as sent, is
/// metered by the upstream's count, and counts against no circuit.
#[tokio::test]
async fn log_probabilities_keyed_by_member_names_pass_through_and_only_a_chunks_own_usage_counts() {
    let chunk = |text: &str, tokens: &str| {
        format!(
            r#"{{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{{"index":0,"text":"{text}","logprobs":{{"tokens":["{text}"],"token_logprobs":[-0.5],"top_logprobs":[{tokens}]}},"finish_reason":null}}],"usage":null}}"#
        )
    };
    let payloads = [
        chunk("usage", r#"{"usage":-0.5}"#),
        chunk(":", r#"{":":-0.1,"error":-1.5,"x_groq":-4.0}"#),
        chunk(" text", r#"{" text":-0.2,"content":-2.0,"usage":{"a":-1.0}}"#)
            .replace(r#""finish_reason":null"#, r#""finish_reason":"length""#),
        r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}"#.to_owned(),
    ];
    let sse: String = payloads
        .iter()
        .map(|p| format!("data: {p}\n\n"))
        .chain(["data: [DONE]\n\n".to_owned()])
        .collect();
    let upstream = MockUpstream::openai().stream_bytes(sse).start().await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    // More requests than failures open a circuit: none is a failure.
    for _ in 0..6 {
        let (_, events) = gateway
            .stream(
                "/v1/completions",
                json!({"model": "chat", "prompt": "Run it with --help for", "logprobs": 2,
                       "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        let mut sent = payloads.to_vec();
        sent.push("[DONE]".to_owned());
        assert_eq!(events.rest().await, sent);
    }
    gateway
        .eventually_exact_output_tokens("completions", "chat", "vllm", 18)
        .await;
}

#[tokio::test]
async fn streams_ask_for_usage_and_drop_the_usage_chunk_unless_the_client_asked() {
    for (kind, fixture) in [
        ("vllm", "vllm_chat_usage.sse"),
        ("openai", "openai_chat_usage.sse"),
    ] {
        let upstream = MockUpstream::openai().stream(fixture).start().await;
        let config = Config::new()
            .backend(Backend::upstream(kind, kind, &url(&upstream)))
            .model(on("chat", kind));
        let gateway = start(&config).await;
        let payloads = fixture_payloads(fixture);
        assert!(
            payloads.iter().any(|p| is_usage_only(p)),
            "the fixture has a usage chunk"
        );

        for stream_options in [Value::Null, json!({"include_usage": false})] {
            let mut body = json!({"model": "chat", "stream": true, "messages": user("hi")});
            if !stream_options.is_null() {
                body["stream_options"] = stream_options;
            }
            let (_, events) = gateway.stream("/v1/chat/completions", body).await;
            assert_eq!(
                events.rest().await,
                without_usage_chunk(&payloads),
                "{kind}"
            );
        }

        let (_, events) = gateway
            .stream(
                "/v1/chat/completions",
                json!({"model": "chat", "stream": true, "messages": user("hi"),
                       "stream_options": {"include_usage": true, "include_obfuscation": false}}),
            )
            .await;
        assert_eq!(
            events.rest().await,
            payloads,
            "{kind}: kept, exactly as sent"
        );

        for request in upstream.requests() {
            let options = &request.json["stream_options"];
            assert_eq!(
                options["include_usage"], true,
                "{kind}: usage is always asked for"
            );
        }
        assert_eq!(
            upstream.requests()[2].json["stream_options"]["include_obfuscation"],
            false,
            "the client's other stream options go up untouched"
        );
    }
}

#[tokio::test]
async fn together_gets_no_stream_options_and_its_usage_is_turned_into_a_usage_chunk() {
    let upstream = MockUpstream::openai()
        .stream("together_chat.sse")
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("together", "together", &url(&upstream)))
        .model(Model::new("llama").deployment(Deployment::new(
            "together",
            "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
        )));
    let gateway = start(&config).await;
    let upstream_chunks: Vec<Value> = fixture_payloads("together_chat.sse")
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| parse(p))
        .collect();

    for include_usage in [false, true] {
        let (_, events) = gateway
            .stream(
                "/v1/chat/completions",
                json!({"model": "llama", "stream": true, "messages": user("hi"),
                       "stream_options": {"include_usage": include_usage}}),
            )
            .await;
        let mut payloads = events.rest().await;
        assert_eq!(payloads.pop().as_deref(), Some("[DONE]"));
        let chunks: Vec<Value> = payloads.iter().map(|p| parse(p)).collect();
        let (content, usage_chunk) = if include_usage {
            let (usage, content) = chunks.split_last().unwrap();
            (content, Some(usage))
        } else {
            (&chunks[..], None)
        };
        assert_eq!(content.len(), upstream_chunks.len());
        for (got, sent) in content.iter().zip(&upstream_chunks) {
            let mut expected = sent.clone();
            if expected["choices"][0]["finish_reason"] == "eos" {
                expected["choices"][0]["finish_reason"] = json!("stop");
            }
            assert_eq!(got, &expected, "chunks pass through, eos becomes stop");
        }
        assert!(!payloads.iter().any(|p| p.contains("\"eos\"")));
        if let Some(usage_chunk) = usage_chunk {
            let last = upstream_chunks.last().unwrap();
            assert_eq!(usage_chunk["choices"], json!([]));
            assert_eq!(
                usage_chunk["usage"],
                json!({"prompt_tokens": 25, "completion_tokens": 5, "total_tokens": 30})
            );
            assert_eq!(usage_chunk["id"], last["id"]);
            assert_eq!(usage_chunk["model"], last["model"]);
            assert_eq!(usage_chunk["object"], "chat.completion.chunk");
        }
    }
    for request in upstream.requests() {
        assert!(
            request.json.get("stream_options").is_none(),
            "Together is never sent stream_options: {}",
            request.json
        );
        assert_eq!(request.json["stream"], true);
    }
}

#[tokio::test]
async fn groq_usage_in_x_groq_is_metered_as_counted_and_offered_as_a_usage_chunk() {
    let upstream = MockUpstream::openai().stream("groq_chat.sse").start().await;
    let base_url = format!("{}/openai/v1", upstream.base_url());
    let config = Config::new()
        .backend(Backend::upstream("groq", "groq", &base_url))
        .model(Model::new("fast").deployment(Deployment::new("groq", "llama-3.1-8b-instant")));
    let gateway = start(&config).await;
    let payloads = fixture_payloads("groq_chat.sse");

    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "fast", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(
        events.rest().await,
        payloads,
        "nothing to remove: Groq sends no usage chunk"
    );
    let request = upstream.single_request();
    assert_eq!(request.path, "/openai/v1/chat/completions");
    assert_eq!(request.json["stream_options"]["include_usage"], true);

    let text = gateway.metrics().await;
    let tokens = |direction, estimated| {
        metric(
            &text,
            "tollgate_tokens_total",
            &[
                ("api", "chat"),
                ("alias", "fast"),
                ("backend", "groq"),
                ("direction", direction),
                ("estimated", estimated),
            ],
        )
    };
    assert_eq!(tokens("input", "false"), Some(40.0), "{text}");
    assert_eq!(tokens("output", "false"), Some(6.0), "{text}");
    assert_eq!(tokens("input", "true"), None, "nothing estimated");

    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "fast", "stream": true, "messages": user("hi"), "stream_options": {"include_usage": true}}),
        )
        .await;
    let mut got = events.rest().await;
    assert_eq!(got.pop().as_deref(), Some("[DONE]"));
    let usage_chunk = parse(&got.pop().unwrap());
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46})
    );
    assert_eq!(got, payloads[..payloads.len() - 1]);
}

#[tokio::test]
async fn every_stream_ends_with_done_even_when_the_upstream_omits_it() {
    let upstream = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .omit_done()
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "messages": user("hi")}),
        )
        .await;
    let got = events.rest().await;
    assert_eq!(
        got,
        without_usage_chunk(&fixture_payloads("vllm_chat_usage.sse"))
    );
    assert_eq!(got.last().map(String::as_str), Some("[DONE]"));
}

/// A streamed request for `n` answers to `path`, chat or legacy.
fn ask(path: &str, n: usize) -> Value {
    match path {
        "/v1/chat/completions" => {
            json!({"model": "chat", "stream": true, "n": n, "messages": user("hi")})
        }
        _ => json!({"model": "chat", "stream": true, "n": n, "prompt": "hi"}),
    }
}

/// The ledger's total once it has recorded one request.
async fn ledger_total(gateway: &Gateway) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let total = gateway.spend("").await["total"].clone();
        if total["requests"] == 1 {
            return total;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recorded: {total}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stream's payloads, read to its end, and the requests metered with
/// `status` for `alias` on backend `vllm`, once the request is recorded.
async fn stream_to_end(gateway: &Gateway, path: &str, body: Value, status: &str) -> Vec<String> {
    let (_, events) = gateway.stream(path, body.clone()).await;
    let got = events.rest().await;
    let api = if path.ends_with("/chat/completions") {
        "chat"
    } else {
        "completions"
    };
    let alias = body["model"].as_str().unwrap();
    let labels = [
        ("api", api),
        ("alias", alias),
        ("backend", "vllm"),
        ("status", status),
    ];
    gateway
        .eventually_metric("tollgate_requests_total", &labels, 1.0)
        .await;
    got
}

/// An upstream stream that ends, with `[DONE]` or its body closed cleanly,
/// before a `finish_reason` said how each answer finished was cut short:
/// the client gets what was sent, the gateway's error event and `[DONE]`,
/// as for any failure after the first byte, and the request is metered as
/// a 502 with the usage streamed, exact when the upstream sent it and
/// estimated when not.
#[tokio::test]
async fn a_stream_that_ends_before_each_answer_finished_is_an_error_not_a_whole_answer() {
    let one_of_two_finished = {
        let chunk = |index: u32, delta: Value, finish: Value| {
            let chunk = json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]});
            format!("data: {chunk}\n\n")
        };
        [
            chunk(0, json!({"role": "assistant", "content": "a"}), Value::Null),
            chunk(1, json!({"role": "assistant", "content": "b"}), Value::Null),
            chunk(0, json!({}), json!("stop")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat()
    };
    let cases = [
        ("[DONE]", MockUpstream::openai().omit_finish(), 1),
        (
            "closed",
            MockUpstream::openai().omit_finish().omit_done(),
            1,
        ),
        ("n=2", MockUpstream::openai().answers_of(3).omit_finish(), 2),
        (
            "one of n=2",
            MockUpstream::openai().stream_bytes(one_of_two_finished),
            2,
        ),
        ("no usage", mock::unfinished_stream(), 1),
    ];
    for (case, upstream, n) in cases {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let upstream = upstream.clone().start().await;
            let priced =
                Model::new("chat").deployment(Deployment::new("vllm", "m").price(1.0, 2.0));
            let config = Config::new()
                .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
                .model(priced)
                .admin();
            let gateway = start(&config).await;
            let got = stream_to_end(&gateway, path, ask(path, n), "502").await;
            let (last, error) = (&got[got.len() - 1], parse(&got[got.len() - 2]));
            assert_eq!(last, "[DONE]", "{case} {path}: {got:#?}");
            check_error_shape(&error);
            assert_eq!(
                error["error"]["code"], "upstream_invalid_response",
                "{case} {path}"
            );
            assert!(
                message(&error["error"]).contains("`finish_reason`"),
                "{case} {path}: {error}"
            );
            let content = got[..got.len() - 2].iter().map(|p| parse(p));
            assert!(
                content.clone().count() > 0,
                "{case} {path}: what was sent is passed on"
            );
            assert!(
                content
                    .flat_map(|c| c["choices"].as_array().unwrap().clone())
                    .all(|choice| choice["finish_reason"].is_null() || case == "one of n=2"),
                "{case} {path}: {got:#?}"
            );
            // Metered: the upstream's usage when it sent it, else an estimate.
            let estimated = if case == "no usage" || case == "one of n=2" {
                "true"
            } else {
                "false"
            };
            let labels = [
                (
                    "api",
                    if path.ends_with("/chat/completions") {
                        "chat"
                    } else {
                        "completions"
                    },
                ),
                ("alias", "chat"),
                ("backend", "vllm"),
                ("direction", "output"),
                ("estimated", estimated),
            ];
            let text = gateway.metrics().await;
            let output = metric(&text, "tollgate_tokens_total", &labels);
            assert!(
                output.is_some_and(|tokens| tokens > 0.0),
                "{case} {path}: {text}"
            );
            let spent = ledger_total(&gateway).await;
            assert_eq!(
                spent["output_tokens"],
                json!(output.unwrap() as u64),
                "{case} {path}: {spent}"
            );
            assert!(
                spent["cost_usd"].as_f64().unwrap() > 0.0,
                "{case} {path}: {spent}"
            );
        }
    }
}

/// Streams that say how each of their answers finished end with `[DONE]`
/// and are metered as 200s: a whole answer, with a usage chunk after its
/// finish chunk or usage on it (Groq's, Together's with its `eos`), each
/// of two answers, a tool call, a legacy completion.
#[tokio::test]
async fn streams_that_say_how_each_answer_finished_end_with_done() {
    let cases = [
        ("vllm_chat_usage.sse", "/v1/chat/completions", 1, false),
        ("openai_chat_usage.sse", "/v1/chat/completions", 1, false),
        ("groq_chat.sse", "/v1/chat/completions", 1, false),
        ("together_chat.sse", "/v1/chat/completions", 1, false),
        ("vllm_completions_usage.sse", "/v1/completions", 1, false),
        ("", "/v1/chat/completions", 2, false),
        ("", "/v1/completions", 2, false),
        ("", "/v1/chat/completions", 1, true),
    ];
    for (fixture, path, n, tools) in cases {
        let upstream = match fixture {
            "" => MockUpstream::openai().answers_of(3),
            fixture => MockUpstream::openai().stream(fixture),
        };
        let upstream = upstream.start().await;
        let calls = Model::new("chat").deployment(Deployment::new("vllm", "m").set("tools", true));
        let config = Config::new()
            .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
            .model(calls);
        let gateway = start(&config).await;
        let mut body = ask(path, n);
        body["stream_options"] = json!({"include_usage": true});
        if tools {
            body["tools"] = json!([{"type": "function", "function": {"name": openai_mock::TOOL_NAME, "parameters": {"type": "object"}}}]);
        }
        let got = stream_to_end(&gateway, path, body, "200").await;
        assert_eq!(
            got.last().map(String::as_str),
            Some("[DONE]"),
            "{fixture} {path} n={n}"
        );
        let chunks: Vec<Value> = got[..got.len() - 1].iter().map(|p| parse(p)).collect();
        assert!(chunks.iter().all(|c| c.get("error").is_none()), "{got:#?}");
        assert!(
            is_usage_only(&got[got.len() - 2]),
            "{fixture} {path}: the usage chunk last"
        );
        let finishes: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .map(|choice| &choice["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes.len(), n, "{fixture} {path}: {got:#?}");
        if tools {
            assert_eq!(finishes, [&json!("tool_calls")]);
        }
    }
}

#[tokio::test]
async fn events_cut_across_tcp_writes_come_out_whole() {
    let upstream = MockUpstream::openai()
        .stream("vllm_completions_usage.sse")
        .split_every(3)
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "llama")).await;
    let (_, events) = gateway
        .stream(
            "/v1/completions",
            json!({"model": "llama", "prompt": "Once", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(
        events.rest().await,
        fixture_payloads("vllm_completions_usage.sse")
    );
}

/// SSE lets an event's data span several `data` lines; each reaches the
/// client as one event of one line, the same JSON.
#[tokio::test]
async fn an_event_whose_data_spans_several_lines_comes_out_as_one() {
    let first = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","#;
    let rest =
        r#" "choices":[{"index":0,"delta":{"content":"Hi\nthere"},"finish_reason":"stop"}]}"#;
    let upstream = MockUpstream::openai()
        .stream_bytes(format!(
            "data: {first}\ndata: {rest}\n\ndata: {first}\r\ndata:{rest}\r\n\r\ndata: [DONE]\n\n"
        ))
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    let body = gateway
        .chat(json!({"model": "chat", "stream": true, "messages": user("hi")}))
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = body.lines().filter(|line| !line.is_empty()).collect();
    let whole = parse(&format!("{first}{rest}"));
    assert_eq!(lines.len(), 3, "{body}");
    for line in &lines[..2] {
        let data = line.strip_prefix("data: ").expect("a data line");
        assert_eq!(parse(data), whole, "{line}");
    }
    assert_eq!(lines[2], "data: [DONE]");
}

// ---- streaming behaviour ----------------------------------------------------

#[tokio::test]
async fn the_first_chunk_reaches_the_client_before_the_upstream_has_finished() {
    let upstream = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .hold_after(1)
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    let (_, mut events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "messages": user("hi")}),
        )
        .await;
    let payloads = fixture_payloads("vllm_chat_usage.sse");
    // The mock has sent one event and holds the rest until released.
    assert_eq!(events.next().await.as_ref(), Some(&payloads[0]));
    upstream.release();
    let mut got = vec![payloads[0].clone()];
    got.extend(events.rest().await);
    assert_eq!(got, without_usage_chunk(&payloads));
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_one_the_upstream_closed_costs_no_failover() {
    let upstream = MockUpstream::openai()
        .chunked()
        .idle_timeout(Duration::from_millis(200))
        .start()
        .await;
    // No engine scraping: every connection the mock counts is a request's.
    let config = Config::new()
        .backend(
            Backend::upstream("vllm", "vllm", &url(&upstream)).engine_metrics("enabled", false),
        )
        .model(on("chat", "vllm"));
    let gateway = start(&config).await;
    let ask = |stream: bool| json!({"model": "chat", "stream": stream, "messages": user("hi")});
    // Streams end at `[DONE]` before their chunked body does: the rest is
    // read so their connection is kept too.
    for stream in [false, true, true, false, true] {
        let response = gateway.chat(ask(stream)).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert_eq!(upstream.connections(), 1, "one connection, kept alive");
    // The upstream closes the idle connection; the next request goes on a
    // new one, with no error and no second attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for stream in [true, false] {
        let response = gateway.chat(ask(stream)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-tollgate-attempts"], "1");
        response.bytes().await.unwrap();
    }
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn an_upstream_that_holds_its_body_open_after_done_is_closed_within_the_drain() {
    // Every event, `[DONE]` included, then the body's end held back.
    let upstream = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .hold_after(usize::MAX)
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    let started = std::time::Instant::now();
    let response = gateway
        .chat(json!({"model": "chat", "stream": true, "messages": user("hi")}))
        .await;
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the client is answered at [DONE], not after the drain"
    );
    assert!(
        upstream.wait_peer_closed(1, Duration::from_secs(3)).await,
        "the gateway gave up on the body's end after its drain"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// One chat request on `vllm` is metered as its client's leaving (499).
async fn metered_as_the_client_leaving(gateway: &Gateway) {
    let labels = [
        ("api", "chat"),
        ("alias", "chat"),
        ("backend", "vllm"),
        ("status", "499"),
    ];
    gateway
        .eventually_metric("tollgate_requests_total", &labels, 1.0)
        .await;
}

/// A client that stays connected but stops reading holds its stream, its
/// upstream connection and its share of the backend's load until
/// `send_timeout_ms` passes with none of the answer taken.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
    use tokio::io::AsyncWriteExt;
    // Twice what the gateway's send buffer can grow to (4 MB at Linux's
    // defaults) and the client's receive buffer hold, in few events.
    let upstream = MockUpstream::openai().bulky_answers_of(4_000).start().await;
    let config = vllm(&upstream, "chat").set("server", "send_timeout_ms", 300);
    let gateway = start(&config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = gateway.base.trim_start_matches("http://").parse().unwrap();
    let mut client = socket.connect(addr).await.unwrap();
    let body = json!({"model": "chat", "stream": true, "messages": user("hi")}).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(body.as_bytes()).await.unwrap();
    // Never read: the gateway gives up on the client, and the upstream.
    assert!(
        upstream.wait_peer_closed(1, WAIT).await,
        "the gateway closed the upstream connection of a client that stopped reading"
    );
    metered_as_the_client_leaving(&gateway).await;
    drop(client);
}

/// The same over HTTP/2, from a client that answers the gateway's pings
/// while it takes nothing more: hyper never polls the stream's body again.
#[tokio::test]
async fn an_http2_client_that_stops_reading_is_let_go_after_the_send_timeout() {
    // Far more than the client's window (HTTP/2's default, 64 KB) and
    // the stream's buffer.
    let upstream = MockUpstream::openai().bulky_answers_of(400).start().await;
    let config = vllm(&upstream, "chat").set("server", "send_timeout_ms", 300);
    let gateway = start(&config).await;
    let answer = http2_stream(&gateway.base).await;
    assert_eq!(answer.status(), 200);
    // Never read: the connection lives on, its pings answered.
    assert!(
        upstream.wait_peer_closed(1, WAIT).await,
        "the gateway closed the upstream connection of a client that stopped reading"
    );
    metered_as_the_client_leaving(&gateway).await;
    drop(answer);
}

/// The send timeout runs only while the client has no room for more: an
/// HTTP/2 answer whose upstream is slower than it is not cut.
#[tokio::test]
async fn an_http2_answer_waiting_on_its_upstream_outlasts_the_send_timeout() {
    use http_body_util::BodyExt;
    let upstream = MockUpstream::openai()
        .stream_bytes(mock::stream_without_usage(["a", "b", "c"], "stop"))
        .event_delay(Duration::from_millis(400))
        .start()
        .await;
    let config = vllm(&upstream, "chat").set("server", "send_timeout_ms", 250);
    let gateway = start(&config).await;
    let answer = http2_stream(&gateway.base).await;
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains(r#"{"content":"c"}"#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_closes_the_upstream_connection() {
    let upstream = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .hold_after(2)
        .start()
        .await;
    let gateway = start(&vllm(&upstream, "chat")).await;
    let (_, mut events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert!(events.next().await.is_some());
    assert_eq!(
        upstream.peer_closed(),
        0,
        "the upstream stream is still open"
    );
    drop(events);
    assert!(
        upstream.wait_peer_closed(1, WAIT).await,
        "the gateway closed the upstream connection after the client left"
    );
    metered_as_the_client_leaving(&gateway).await;
}

#[tokio::test]
async fn a_slow_but_steady_stream_is_not_cut_by_the_idle_timeout() {
    // Each gap (60 ms) is well inside idle_ms (250 ms); the whole stream
    // (about 600 ms) is not, so the timer must restart on every chunk.
    let upstream = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .first_byte_after(Duration::from_millis(60))
        .event_delay(Duration::from_millis(60))
        .start()
        .await;
    let config = Config::new()
        .backend(
            Backend::upstream("vllm", "vllm", &url(&upstream))
                .first_byte_ms(2_000)
                .idle_ms(250),
        )
        .model(on("chat", "vllm"));
    let gateway = start(&config).await;
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(
        events.rest().await,
        without_usage_chunk(&fixture_payloads("vllm_chat_usage.sse"))
    );
}

// ---- upstream failures --------------------------------------------------------

/// Some upstreams and proxies quote the credential they were sent in their
/// errors. The gateway holds it: no error it passes on, whole or streamed,
/// carries it.
#[tokio::test]
async fn an_upstream_that_quotes_the_gateways_credential_has_it_redacted() {
    // `Backend::upstream` sends `sk-test-<name>`.
    const KEY: &str = "sk-test-quoting";
    let quoted = json!({"error": {"message": format!("Incorrect API key provided: Bearer {KEY}"),
        "type": "invalid_request_error", "param": format!("Bearer {KEY}"), "code": KEY}});
    let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
    // Each upstream, and whether it fails whole requests too or streams
    // only.
    let upstreams = [
        (MockUpstream::openai().error(400, quoted.clone()), true),
        (MockUpstream::openai().error(500, quoted.clone()), true),
        (
            MockUpstream::openai().stream_bytes(format!("data: {quoted}\n\n")),
            false,
        ),
        (
            MockUpstream::openai().stream_bytes(format!("data: {chunk}\n\ndata: {quoted}\n\n")),
            false,
        ),
    ];
    for (i, (upstream, whole)) in upstreams.into_iter().enumerate() {
        let upstream = upstream.start().await;
        let config = Config::new()
            .backend(Backend::upstream("quoting", "openai", &url(&upstream)))
            .model(on("chat", "quoting"));
        let gateway = start(&config).await;
        for stream in [true, false].into_iter().filter(|&stream| stream || whole) {
            let response = gateway
                .chat(json!({"model": "chat", "stream": stream, "messages": user("hi")}))
                .await;
            let text = response.text().await.unwrap();
            assert!(!text.contains(KEY), "case {i}, stream {stream}: {text}");
            assert!(
                text.contains("[redacted]"),
                "case {i}, stream {stream}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn upstream_failures_before_the_first_byte_become_http_errors() {
    let refused = mock::refused_base_url().await;
    let silent = MockUpstream::openai()
        .first_byte_after(Duration::from_secs(60))
        .start()
        .await;
    let headers_only = MockUpstream::openai()
        .body_after(Duration::from_secs(60))
        .start()
        .await;
    let rejecting = MockUpstream::openai()
        .error(400, json!({"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens. Please reduce the length of the messages or completion.", "type": "BadRequestError", "param": null, "code": 400}))
        .start()
        .await;
    let picky = MockUpstream::openai()
        .error(400, json!({"error": {"message": "Invalid value for 'temperature': must be at most 2.", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}))
        .start()
        .await;
    let unauthorised = MockUpstream::openai()
        .error(401, json!({"error": {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}}))
        .start()
        .await;
    let limited = MockUpstream::openai()
        .error(429, json!({"error": {"message": "Rate limit reached for model llama-3.1-8b-instant", "type": "tokens", "code": "rate_limit_exceeded"}}))
        .header("retry-after", "7")
        .start()
        .await;
    let crashing = MockUpstream::openai()
        .status(500)
        .body("Internal Server Error")
        .start()
        .await;
    let garbled = MockUpstream::openai()
        .body(r#"{"id": "chatcmpl-1", "choices": ["#)
        .start()
        .await;
    let mut config = Config::new()
        .backend(Backend::upstream(
            "refused",
            "vllm",
            &format!("{refused}/v1"),
        ))
        .backend(Backend::upstream("silent", "vllm", &url(&silent)).first_byte_ms(150))
        .backend(
            Backend::upstream("headers-only", "openai", &url(&headers_only)).first_byte_ms(150),
        );
    for (name, kind, mock) in [
        ("rejecting", "vllm", &rejecting),
        ("picky", "openai", &picky),
        ("unauthorised", "groq", &unauthorised),
        ("limited", "groq", &limited),
        ("crashing", "together", &crashing),
        ("garbled", "vllm", &garbled),
    ] {
        config = config.backend(Backend::upstream(name, kind, &url(mock)));
    }
    for name in [
        "refused",
        "silent",
        "headers-only",
        "rejecting",
        "picky",
        "unauthorised",
        "limited",
        "crashing",
        "garbled",
    ] {
        config = config.model(on(name, name));
    }
    let gateway = start(&config).await;
    let call = |alias: &'static str, stream: bool| {
        gateway.chat(json!({"model": alias, "stream": stream, "messages": user("hi")}))
    };

    let response = call("refused", false).await;
    assert_eq!(response.status(), 502);
    assert!(!response.headers()["x-request-id"].is_empty());
    let error = error_of(response).await;
    assert_eq!(error["code"], "upstream_unavailable");
    assert!(
        message(&error).contains("could not connect to backend \"refused\""),
        "{error}"
    );

    for stream in [false, true] {
        let response = call("silent", stream).await;
        assert_eq!(response.status(), 504, "no head within first_byte_ms");
        assert_eq!(error_of(response).await["code"], "upstream_timeout");
        let response = call("headers-only", stream).await;
        assert_eq!(
            response.status(),
            504,
            "a head but no body within first_byte_ms"
        );
        assert_eq!(error_of(response).await["code"], "upstream_timeout");
    }

    let response = call("rejecting", true).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert!(
        message(&error).contains("maximum context length is 8192 tokens"),
        "{error}"
    );

    let error = error_of(call("picky", false).await).await;
    assert_eq!(error["param"], "temperature");
    assert_eq!(error["code"], "invalid_value");
    assert!(
        message(&error).contains("Invalid value for 'temperature'"),
        "{error}"
    );

    let response = call("unauthorised", false).await;
    assert_eq!(
        response.status(),
        502,
        "the gateway's own credential was refused"
    );
    assert_eq!(
        response.headers()["x-should-retry"],
        "false",
        "only the operator can fix it"
    );
    let body = response.text().await.unwrap();
    assert!(!body.contains("sk-test-"), "no secret in the error: {body}");
    let error = parse(&body)["error"].clone();
    assert_eq!(error["code"], "upstream_auth_failed");
    assert!(message(&error).contains("credential"), "{error}");

    let response = call("limited", false).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert!(message(&error).contains("Rate limit reached"), "{error}");

    let response = call("crashing", false).await;
    assert_eq!(response.status(), 502);
    assert!(message(&error_of(response).await).contains("Internal Server Error"));

    let response = call("garbled", false).await;
    assert_eq!(
        response.status(),
        502,
        "a body that is not JSON is not passed on"
    );
    assert_eq!(
        error_of(response).await["code"],
        "upstream_invalid_response"
    );
}

/// Reads a stream that fails after `good` events: those events, then an
/// error event, then `[DONE]`. Returns the error object.
async fn stream_failing_after(gateway: &Gateway, alias: &str, fixture: &str, good: usize) -> Value {
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": alias, "stream": true, "messages": user("hi")}),
        )
        .await;
    let got = events.rest().await;
    assert_eq!(got.len(), good + 2, "{got:#?}");
    assert_eq!(got[..good], fixture_payloads(fixture)[..good]);
    assert_eq!(got[good + 1], "[DONE]");
    let error = parse(&got[good]);
    check_error_shape(&error);
    error["error"].clone()
}

#[tokio::test]
async fn failures_after_the_first_byte_end_the_stream_with_an_error_event() {
    let reset = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .reset_after(3)
        .start()
        .await;
    let stalled = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .hold_after(3)
        .start()
        .await;
    let first = &fixture_payloads("vllm_chat_usage.sse")[0];
    let malformed = MockUpstream::openai()
        .stream_bytes(format!(
            "data: {first}\n\ndata: {{\"id\":\"chatcmpl-1\",\"choices\":[{{\"delta\":{{\"content\":\"oops\"\n\ndata: [DONE]\n\n"
        ))
        .start()
        .await;
    let upstream_error = r#"{"error":{"object":"error","message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}"#;
    let erroring = MockUpstream::openai()
        .stream_bytes(format!(
            "data: {first}\n\ndata: {upstream_error}\n\ndata: [DONE]\n\n"
        ))
        .start()
        .await;
    let flat_error = r#"{"object":"error","message":"Engine loop has died","type":"InternalServerError","param":null,"code":500}"#;
    let erroring_flat = MockUpstream::openai()
        .stream_bytes(format!("data: {first}\n\ndata: {flat_error}\n\n"))
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("reset", "vllm", &url(&reset)))
        .backend(Backend::upstream("stalled", "vllm", &url(&stalled)).idle_ms(150))
        .backend(Backend::upstream("malformed", "vllm", &url(&malformed)))
        .backend(Backend::upstream("erroring", "vllm", &url(&erroring)))
        .backend(Backend::upstream(
            "erroring-flat",
            "vllm",
            &url(&erroring_flat),
        ))
        .model(on("reset", "reset"))
        .model(on("stalled", "stalled"))
        .model(on("malformed", "malformed"))
        .model(on("erroring", "erroring"))
        .model(on("erroring-flat", "erroring-flat"));
    let gateway = start(&config).await;

    let error = stream_failing_after(&gateway, "reset", "vllm_chat_usage.sse", 3).await;
    assert_eq!(error["code"], "upstream_disconnected", "{error}");
    let error = stream_failing_after(&gateway, "stalled", "vllm_chat_usage.sse", 3).await;
    assert_eq!(error["code"], "upstream_timeout", "{error}");
    assert!(message(&error).contains("150 ms"), "{error}");
    let error = stream_failing_after(&gateway, "malformed", "vllm_chat_usage.sse", 1).await;
    assert_eq!(error["code"], "upstream_invalid_response", "{error}");
    let error = stream_failing_after(&gateway, "erroring", "vllm_chat_usage.sse", 1).await;
    assert_eq!(error["code"], "upstream_error", "{error}");
    assert!(
        message(&error).contains("CUDA out of memory"),
        "the upstream's own message is passed on: {error}"
    );
    let error = stream_failing_after(&gateway, "erroring-flat", "vllm_chat_usage.sse", 1).await;
    assert!(
        message(&error).contains("Engine loop has died"),
        "older vLLM's flat error object is understood: {error}"
    );

    let text = gateway.metrics().await;
    for (alias, status) in [
        ("reset", "502"),
        ("stalled", "504"),
        ("malformed", "502"),
        ("erroring", "502"),
        ("erroring-flat", "502"),
    ] {
        let labels = [
            ("api", "chat"),
            ("alias", alias),
            ("backend", alias),
            ("status", status),
        ];
        assert_eq!(
            metric(&text, "tollgate_requests_total", &labels),
            Some(1.0),
            "{alias}: {text}"
        );
    }
}

#[tokio::test]
async fn retriable_failures_fail_over_to_the_next_deployment_and_a_400_does_not() {
    let unavailable = MockUpstream::openai()
        .error(
            503,
            json!({"error": {"message": "Service Unavailable", "type": "server_error"}}),
        )
        .start()
        .await;
    let rejecting = MockUpstream::openai()
        .error(
            400,
            json!({"error": {"message": "bad prompt", "type": "BadRequestError", "code": 400}}),
        )
        .start()
        .await;
    let refused = mock::refused_base_url().await;
    let spare_a = MockUpstream::openai().start().await;
    let spare_b = MockUpstream::openai().start().await;
    let spare_c = MockUpstream::openai().start().await;
    let then = |alias: &str, first: &str, spare: &str| {
        Model::new(alias)
            .deployment(Deployment::new(first, "m1"))
            .deployment(Deployment::new(spare, "m2"))
    };
    let config = Config::new()
        .backend(Backend::upstream("unavailable", "vllm", &url(&unavailable)))
        .backend(Backend::upstream(
            "refused",
            "vllm",
            &format!("{refused}/v1"),
        ))
        .backend(Backend::upstream("rejecting", "vllm", &url(&rejecting)))
        .backend(Backend::upstream("spare-a", "together", &url(&spare_a)))
        .backend(Backend::upstream("spare-b", "groq", &url(&spare_b)))
        .backend(Backend::upstream("spare-c", "openai", &url(&spare_c)))
        .model(then("after-503", "unavailable", "spare-a"))
        .model(then("after-refused", "refused", "spare-b"))
        .model(then("after-400", "rejecting", "spare-c"));
    let gateway = start(&config).await;

    let response = gateway
        .chat(json!({"model": "after-503", "messages": user("hi")}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "spare-a");
    assert_eq!((unavailable.hits(), spare_a.hits()), (1, 1));
    assert_eq!(spare_a.single_request().json["model"], "m2");

    let (head, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "after-refused", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(head["x-tollgate-backend"], "spare-b");
    assert_eq!(
        events.rest().await.last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(spare_b.hits(), 1);

    let response = gateway
        .chat(json!({"model": "after-400", "messages": user("hi")}))
        .await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-tollgate-backend"], "rejecting");
    assert!(message(&error_of(response).await).contains("bad prompt"));
    assert_eq!(
        (rejecting.hits(), spare_c.hits()),
        (1, 0),
        "a 400 is not retried elsewhere"
    );

    let text = gateway.metrics().await;
    let attempts = |backend, outcome| {
        metric(
            &text,
            "tollgate_upstream_attempts_total",
            &[("backend", backend), ("outcome", outcome)],
        )
    };
    assert_eq!(
        attempts("unavailable", "upstream_error"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(attempts("refused", "upstream_error"), Some(1.0), "{text}");
    assert_eq!(attempts("spare-a", "ok"), Some(1.0), "{text}");
}

#[tokio::test]
async fn errors_sent_with_a_200_and_a_wrong_model_id_fail_over_before_the_first_byte() {
    // vLLM can answer 200 and then send an error object as the first event.
    let first_event_error = r#"{"object":"error","message":"Engine is overloaded","type":"ServiceUnavailableError","param":null,"code":503}"#;
    let overloaded = MockUpstream::openai()
        .stream_bytes(format!("data: {first_event_error}\n\ndata: [DONE]\n\n"))
        .start()
        .await;
    let missing = MockUpstream::openai()
        .error(404, json!({"object": "error", "message": "The model `m1` does not exist.", "type": "NotFoundError", "param": null, "code": 404}))
        .start()
        .await;
    let garbled = MockUpstream::openai()
        .body("<html>502 Bad Gateway</html>")
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("overloaded", "vllm", &url(&overloaded)))
        .backend(Backend::upstream("missing", "vllm", &url(&missing)))
        .backend(Backend::upstream("garbled", "openai", &url(&garbled)))
        .backend(Backend::upstream("spare", "openai", &url(&spare)))
        .model(Model::new("overloaded").deployment(Deployment::new("overloaded", "m1")))
        .model(Model::new("missing").deployment(Deployment::new("missing", "m1")))
        .model(
            Model::new("stream-with-spare")
                .deployment(Deployment::new("overloaded", "m1"))
                .deployment(Deployment::new("missing", "m1"))
                .deployment(Deployment::new("spare", "m2")),
        )
        .model(
            Model::new("with-spare")
                .deployment(Deployment::new("missing", "m1"))
                .deployment(Deployment::new("garbled", "m1"))
                .deployment(Deployment::new("spare", "m2")),
        );
    let gateway = start(&config).await;

    let response = gateway
        .chat(json!({"model": "overloaded", "stream": true, "messages": user("hi")}))
        .await;
    assert_eq!(
        response.status(),
        503,
        "an error as the first event is still an HTTP error"
    );
    assert!(message(&error_of(response).await).contains("Engine is overloaded"));

    let response = gateway
        .chat(json!({"model": "missing", "messages": user("hi")}))
        .await;
    assert_eq!(
        response.status(),
        502,
        "a wrong upstream model id is the operator's fault"
    );
    let error = error_of(response).await;
    assert_eq!(error["code"], "upstream_not_found");
    assert!(message(&error).contains("does not exist"), "{error}");

    let (head, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "stream-with-spare", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(head["x-tollgate-backend"], "spare");
    assert_eq!(
        events.rest().await.last().map(String::as_str),
        Some("[DONE]")
    );
    let response = gateway
        .chat(json!({"model": "with-spare", "messages": user("hi")}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "spare");
    assert_eq!(spare.hits(), 2);
    assert_eq!(
        (overloaded.hits(), missing.hits(), garbled.hits()),
        (2, 3, 1)
    );
}

#[tokio::test]
async fn large_bodies_that_come_in_many_reads_arrive_whole_both_ways() {
    // About 300 KB in, 80 KB out, each side read 16 KB at a time: read in
    // many pieces, gathered into one buffer by their declared length, or
    // joined at their end when chunked.
    let prompt: String = (0..50_000).map(|i| format!("{i} ")).collect();
    for chunked in [false, true] {
        let upstream = MockUpstream::openai().answers_of(20_000);
        let upstream = if chunked {
            upstream.chunked()
        } else {
            upstream
        };
        let upstream = upstream.start().await;
        let config = Config::new()
            .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
            .model(
                Model::new("chat")
                    .deployment(Deployment::new("vllm", "m").set("context_window", 1_000_000)),
            )
            .set("server", "max_body_bytes", 8 << 20);
        let gateway = start(&config).await;
        let response = gateway
            .chat(json!({"model": "chat", "messages": user(&prompt), "max_tokens": 20_000}))
            .await;
        assert_eq!(response.status(), 200, "chunked: {chunked}");
        let body: Value = response.json().await.unwrap();
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content, "tok ".repeat(20_000), "chunked: {chunked}");
        let sent = &upstream.single_request().json["messages"][0]["content"];
        assert_eq!(sent.as_str(), Some(prompt.as_str()), "chunked: {chunked}");
    }
}

// ---- client errors ----------------------------------------------------------------

#[tokio::test]
async fn bad_requests_are_refused_before_any_upstream_call() {
    let upstream = MockUpstream::openai().start().await;
    let config =
        vllm(&upstream, "chat")
            .model(on("code", "vllm"))
            .set("server", "max_body_bytes", 4096);
    let gateway = start(&config).await;
    let gateway = &gateway;
    let raw = move |body: &'static str| async move {
        gateway
            .post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    };

    let response = raw(r#"{"model": "chat", "messages": ["#).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert!(message(&error).contains("not valid JSON"), "{error}");
    assert!(
        message(&error).contains("line 1 column"),
        "says where: {error}"
    );

    let response = raw(r#"{"model": "chat", "messages": [{"role": "user", "content": 5}]}"#).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "messages[0].content", "{error}");
    assert!(message(&error).contains("messages[0].content"), "{error}");

    let response = raw(r#"{"model": "chat", "max_tokens": "ten", "messages": [{"role": "user", "content": "hi"}]}"#).await;
    assert_eq!(error_of(response).await["param"], "max_tokens");

    // Two limits, of which upstreams read one or the other: OpenAI refuses
    // it, and a budget would reserve the smaller while TGI writes the larger.
    let response = raw(r#"{"model": "chat", "max_completion_tokens": 1, "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]}"#).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "max_tokens");
    assert!(message(&error).contains("at the same time"), "{error}");

    let big = json!({"model": "chat", "messages": user(&"x".repeat(8_000))});
    let response = gateway.chat(big.clone()).await;
    assert_eq!(response.status(), 413);
    assert_eq!(error_of(response).await["code"], "request_too_large");
    // The same without a content-length: the limit holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = serde_json::to_vec(&big)
        .unwrap()
        .chunks(1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = gateway
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    let response = gateway
        .chat(json!({"model": "gpt-5", "messages": user("hi")}))
        .await;
    assert_eq!(response.status(), 404);
    let error = error_of(response).await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    assert!(message(&error).contains("\"gpt-5\""), "{error}");
    assert!(
        message(&error).contains("chat, code"),
        "names the models that exist: {error}"
    );

    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn api_keys_decide_who_may_call_and_which_models_they_see() {
    let upstream = MockUpstream::openai().start().await;
    let config = vllm(&upstream, "chat")
        .model(on("code", "vllm"))
        .key(Key::new("team").models(&["chat"]))
        .key(Key::new("admin"));
    let gateway = start(&config).await;
    let gateway = &gateway;
    let chat = move |key: Option<&'static str>, alias: &'static str| async move {
        let mut request = gateway
            .post("/v1/chat/completions")
            .json(&json!({"model": alias, "messages": user("hi")}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.unwrap()
    };

    for key in [None, Some("wrong-secret")] {
        let response = chat(key, "chat").await;
        assert_eq!(response.status(), 401, "{key:?}");
        assert!(!response.headers()["x-request-id"].is_empty());
        assert_eq!(error_of(response).await["code"], "invalid_api_key");
    }
    // Non-browsers reach the pipeline straight, browsers through the
    // router and CORS: every inference path refuses a missing or wrong key
    // either way, before anything goes upstream.
    for (path, body) in [
        ("/v1/chat/completions", json!({"messages": user("hi")})),
        ("/v1/chat/completions/", json!({"messages": user("hi")})),
        ("/v1/completions", json!({"prompt": "hi"})),
        ("/v1/embeddings/", json!({"input": "hi"})),
        (
            "/v1/messages",
            json!({"max_tokens": 16, "messages": user("hi")}),
        ),
        ("/v1/responses", json!({"input": "hi"})),
    ] {
        let with_model = |model: &str| {
            let mut body = body.clone();
            body["model"] = json!(model);
            body
        };
        for origin in [None, Some("https://app.example")] {
            for key in [None, Some("wrong-secret")] {
                let mut request = gateway.post(path).json(&with_model("chat"));
                if let Some(origin) = origin {
                    request = request.header("origin", origin);
                }
                if let Some(key) = key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 401, "{path} {origin:?} {key:?}");
            }
        }
        let response = gateway
            .post(path)
            .header("origin", "https://app.example")
            .bearer_auth("team-secret")
            .json(&with_model("code"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            403,
            "{path}: a model the key may not use"
        );
    }
    let response = chat(Some("team-secret"), "code").await;
    assert_eq!(response.status(), 403);
    let error = error_of(response).await;
    assert_eq!(error["code"], "model_not_allowed");
    assert!(message(&error).contains("\"team\""), "{error}");
    assert_eq!(upstream.hits(), 0);

    assert_eq!(chat(Some("team-secret"), "chat").await.status(), 200);
    assert_eq!(chat(Some("admin-secret"), "code").await.status(), 200);
    for request in upstream.requests() {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer sk-test-vllm"),
            "the client's key never goes upstream"
        );
    }

    let ids = |key| async move {
        let response = gateway.get("/v1/models", key).await;
        assert_eq!(response.status(), 200);
        let list: Value = response.json().await.unwrap();
        assert_eq!(list["object"], "list");
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(Some("team-secret")).await, ["chat"]);
    assert_eq!(ids(Some("admin-secret")).await, ["chat", "code"]);
    let response = gateway.get("/v1/models", None).await;
    assert_eq!(response.status(), 401);
    assert!(!response.headers()["x-request-id"].is_empty());
}

// ---- request ids and metrics -----------------------------------------------------------

#[tokio::test]
async fn every_response_carries_a_request_id_and_successes_name_the_backend() {
    let upstream = MockUpstream::openai().start().await;
    let refused = mock::refused_base_url().await;
    let config = Config::new()
        .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
        .backend(Backend::upstream("down", "vllm", &format!("{refused}/v1")))
        .model(on("chat", "vllm"))
        .model(on("down", "down"));
    let gateway = start(&config).await;
    let gateway = &gateway;
    let with_id = move |id: &'static str, body: Value| async move {
        gateway
            .post("/v1/chat/completions")
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
            .unwrap()
    };

    let response = with_id(
        "req-whole-1",
        json!({"model": "chat", "messages": user("hi")}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-whole-1");
    assert_eq!(response.headers()["x-tollgate-backend"], "vllm");
    assert_eq!(
        upstream.requests()[0].header("x-request-id"),
        Some("req-whole-1"),
        "passed upstream"
    );

    let response = with_id(
        "req-stream-2",
        json!({"model": "chat", "stream": true, "messages": user("hi")}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-stream-2");
    assert_eq!(response.headers()["x-tollgate-backend"], "vllm");
    assert_eq!(
        Events::new(response)
            .rest()
            .await
            .last()
            .map(String::as_str),
        Some("[DONE]")
    );

    for (body, status) in [
        (json!({"model": "nope", "messages": user("hi")}), 404),
        (json!({"model": "down", "messages": user("hi")}), 502),
    ] {
        let response = with_id("req-error-3", body).await;
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["x-request-id"], "req-error-3");
    }

    let mut generated = Vec::new();
    for body in [
        json!({"model": "chat", "messages": user("hi")}),
        json!({"model": "nope", "messages": user("hi")}),
    ] {
        let response = gateway.chat(body).await;
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(id.len() >= 16, "a generated id: {id:?}");
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1]);
    assert_eq!(
        upstream.requests()[2].header("x-request-id"),
        Some(&*generated[0])
    );

    // A client's id is kept up to 256 visible ASCII characters; a longer
    // one, or one with a space, is replaced by one the gateway makes.
    let long = "t".repeat(256);
    for (id, kept) in [
        (long.as_str(), true),
        (&*"t".repeat(257), false),
        ("with space", false),
    ] {
        let response = gateway
            .post("/v1/chat/completions")
            .header("x-request-id", id)
            .json(&json!({"model": "chat", "messages": user("hi")}))
            .send()
            .await
            .unwrap();
        let answered = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(answered == id, kept, "{id:?} -> {answered:?}");
        if !kept {
            assert_eq!(answered.len(), 32, "a generated id: {answered:?}");
        }
    }

    let response = gateway.get("/v1/no-such-route", None).await;
    assert_eq!(response.status(), 404);
    assert!(
        response.headers().contains_key("x-request-id"),
        "even a wrong path gets one"
    );
    check_error_shape(&response.json().await.unwrap());
    let response = gateway
        .post("/v1/models")
        .header("x-request-id", "req-method-4")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["x-request-id"], "req-method-4");
    let response = gateway.get("/v1/chat/completions", None).await;
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key("x-request-id"));
    // A browser's request goes through the router (for CORS) rather than
    // straight to the pipeline, and keeps its id all the same.
    let response = gateway
        .post("/v1/chat/completions")
        .header("x-request-id", "req-browser-5")
        .header("origin", "https://app.example")
        .json(&json!({"model": "chat", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-browser-5");
    assert_eq!(
        upstream.requests().last().unwrap().header("x-request-id"),
        Some("req-browser-5")
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = gateway.get(path, None).await;
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("x-request-id"), "{path}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_alias_backend_and_status() {
    let upstream = MockUpstream::openai().start().await;
    let failing = MockUpstream::openai().status(500).start().await;
    let config = Config::new()
        .backend(Backend::upstream("vllm", "vllm", &url(&upstream)))
        .backend(Backend::upstream("broken", "vllm", &url(&failing)))
        .model(on("chat", "vllm"))
        .model(on("flaky", "broken"));
    let gateway = start(&config).await;
    for _ in 0..2 {
        assert_eq!(
            gateway
                .chat(json!({"model": "chat", "messages": user("hi")}))
                .await
                .status(),
            200
        );
    }
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "messages": user("hi")}),
        )
        .await;
    events.rest().await;
    assert_eq!(
        gateway
            .chat(json!({"model": "flaky", "messages": user("hi")}))
            .await
            .status(),
        502
    );
    assert_eq!(
        gateway
            .chat(json!({"model": "nope", "messages": user("hi")}))
            .await
            .status(),
        404
    );

    let text = gateway.metrics().await;
    let requests = |alias, backend, status| {
        metric(
            &text,
            "tollgate_requests_total",
            &[
                ("api", "chat"),
                ("alias", alias),
                ("backend", backend),
                ("status", status),
            ],
        )
    };
    assert_eq!(requests("chat", "vllm", "200"), Some(3.0), "{text}");
    assert_eq!(requests("flaky", "broken", "502"), Some(1.0), "{text}");
    assert_eq!(requests("none", "none", "404"), Some(1.0), "{text}");
    let tokens = metric(
        &text,
        "tollgate_tokens_total",
        &[
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "vllm"),
            ("direction", "input"),
            ("estimated", "false"),
        ],
    );
    assert_eq!(
        tokens,
        Some(3.0 * openai_mock::CANNED_PROMPT_TOKENS as f64),
        "{text}"
    );
}

// ---- the mock itself -------------------------------------------------------------------

/// Sends one streaming request to the mock over a raw socket and returns
/// every byte of the answer, to the close.
async fn raw_exchange(upstream: &MockServer) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(upstream.addr())
        .await
        .unwrap();
    let body = r#"{"model":"m","stream":true}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer))
        .await
        .expect("the mock ends the exchange")
        .expect("reads");
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn the_mock_cuts_events_into_separate_chunks_and_resets_without_a_chunked_end() {
    let events = mock::split_events(&mock::fixture("vllm_chat_usage.sse"));
    let cut = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .split_every(3)
        .start()
        .await;
    let answer = raw_exchange(&cut).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(body.ends_with("0\r\n\r\n"), "a clean end: {body:?}");
    let sizes: Vec<&str> = body.split("\r\n").step_by(2).collect();
    assert!(
        sizes[..sizes.len() - 2]
            .iter()
            .all(|s| *s == "3" || *s == "2" || *s == "1"),
        "every write is at most 3 bytes: {sizes:?}"
    );

    let reset = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .reset_after(2)
        .start()
        .await;
    let answer = raw_exchange(&reset).await;
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    for (i, event) in events.iter().enumerate() {
        let event = std::str::from_utf8(event).unwrap();
        assert_eq!(
            body.contains(event),
            i < 2,
            "event {i} sent only before the reset"
        );
    }
    assert!(!body.ends_with("0\r\n\r\n"), "no clean end: {body:?}");
    assert_eq!(
        reset.peer_closed(),
        0,
        "the mock's own reset is not the peer's close"
    );
}

// ---- TLS ------------------------------------------------------------------

/// A self-hosted backend behind HTTPS with a private CA: reached, whole
/// and streamed, and its engine scraped, with `ca_file` naming that CA;
/// without it the system's roots do not know the CA, so nothing is sent
/// and the client gets a 502 that names the backend.
#[tokio::test]
async fn a_backend_whose_certificate_a_private_ca_signed_is_reached_with_its_ca_file() {
    let ca = TestCa::new("upstream");
    let upstream = MockUpstream::openai()
        .tls(ServerTls::Server(&ca))
        .start()
        .await;
    assert!(url(&upstream).starts_with("https://127.0.0.1:"));
    let config = |ca_file: Option<&std::path::Path>| {
        let mut backend =
            Backend::upstream("vllm", "vllm", &url(&upstream)).engine_metrics("interval_ms", 100);
        if let Some(file) = ca_file {
            backend = backend.set("ca_file", file.to_str().unwrap());
        }
        Config::new().backend(backend).model(on("chat", "vllm"))
    };
    let ask = |stream: bool| json!({"model": "chat", "stream": stream, "messages": user("hi")});

    let gateway = start(&config(Some(&ca.ca_file()))).await;
    let response = gateway.chat(ask(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    let (_, events) = gateway.stream("/v1/chat/completions", ask(true)).await;
    let events = events.rest().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let deadline = std::time::Instant::now() + WAIT;
    while upstream.scrapes() == 0 {
        assert!(std::time::Instant::now() < deadline, "never scraped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.hits(), 2);

    let unverified = start(&config(None)).await;
    let response = unverified.chat(ask(false)).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    check_error_shape(&body);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("backend \"vllm\""), "{message}");
    assert_eq!(upstream.hits(), 2, "nothing reached the upstream");
}

/// A backend that asks for a client certificate (mutual TLS) is reached
/// with the `cert_file` and `key_file` its CA signed, and refused without
/// them: nothing is served, and the client gets a 502.
#[tokio::test]
async fn a_backend_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let ca = TestCa::new("mutual");
    let upstream = MockUpstream::openai()
        .tls(ServerTls::ClientsCertified(&ca))
        .start()
        .await;
    let config = |with_certificate: bool| {
        let mut backend = Backend::upstream("vllm", "vllm", &url(&upstream))
            .engine_metrics("enabled", false)
            .set("ca_file", ca.ca_file().to_str().unwrap());
        if with_certificate {
            let client = ca.client();
            backend = backend
                .set("cert_file", client.cert.to_str().unwrap())
                .set("key_file", client.key.to_str().unwrap());
        }
        Config::new().backend(backend).model(on("chat", "vllm"))
    };
    let ask = json!({"model": "chat", "messages": user("hi")});
    let gateway = start(&config(true)).await;
    assert_eq!(gateway.chat(ask.clone()).await.status(), 200);
    let anonymous = start(&config(false)).await;
    assert_eq!(anonymous.chat(ask).await.status(), 502);
    assert_eq!(upstream.hits(), 1);
}
