//! `POST /v1/embeddings` through the gateway, against the mock's
//! OpenAI-compatible `/embeddings` (vLLM's shapes) and the simulated
//! backend: served only by deployments that declare it, routed, failed
//! over, limited and metered like chat, priced per input token; bad input
//! is a 400 that names the field.

mod support;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{MockServer, MockUpstream};
use support::openai_mock::{CANNED_MODEL, EMBEDDING_DIMENSIONS};

/// Alias `embed` on `upstream` (embeddings only, $0.02 per million input
/// tokens) and alias `chat` on the same backend (the default endpoints).
fn config(upstream: &MockServer) -> Config {
    embed_alone(upstream, embedder(0.02).set("name", "embed/vllm"))
        .model(Model::new("chat").deployment(Deployment::new("vllm", "llama-3.1-8b")))
}

/// bge-m3 on backend `vllm`, serving embeddings only, at `usd_per_mtok`
/// of input.
fn embedder(usd_per_mtok: f64) -> Deployment {
    Deployment::new("vllm", "bge-m3")
        .set("endpoints", vec!["embeddings"])
        .price(usd_per_mtok, 0.0)
}

/// Alias `embed` on `upstream`, its one deployment `embedder`.
fn embed_alone(upstream: &MockServer, embedder: Deployment) -> Config {
    Config::new()
        .backend(Backend::new("vllm", "vllm", &url(upstream)))
        .model(Model::new("embed").deployment(embedder))
}

impl Gateway {
    async fn embed(&self, body: Value) -> reqwest::Response {
        self.post("/v1/embeddings")
            .bearer_auth("team-secret")
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn embeddings_are_forwarded_as_sent_and_priced_per_input_token() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = start(&config(&upstream).key(Key::new("team"))).await;
    let response = gateway
        .embed(json!({"model": "embed", "input": ["hello world", "second"]}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "vllm");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], CANNED_MODEL);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(
            item["embedding"].as_array().unwrap().len(),
            EMBEDDING_DIMENSIONS
        );
    }
    // "hello world" and "second": 3 and 2 tokens, as the mock counts.
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    let sent = upstream.single_request();
    assert!(sent.path.ends_with("/v1/embeddings"), "{}", sent.path);
    assert_eq!(sent.json["model"], "bge-m3");
    assert_eq!(sent.json["input"], json!(["hello world", "second"]));
    // Nothing a generation needs: no output limit, no stream options.
    for field in ["max_tokens", "stream", "stream_options"] {
        assert!(sent.json.get(field).is_none(), "{field}: {}", sent.json);
    }
    let labels = |direction| {
        [
            ("api", "embeddings"),
            ("alias", "embed"),
            ("backend", "vllm"),
            ("direction", direction),
            ("estimated", "false"),
        ]
    };
    gateway
        .eventually_metric("tollgate_tokens_total", &labels("input"), 5.0)
        .await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "tollgate_tokens_total", &labels("output")),
        None
    );
    let cost = metric(
        &text,
        "tollgate_cost_usd_total",
        &[
            ("alias", "embed"),
            ("deployment", "embed/vllm"),
            ("key", "team"),
        ],
    )
    .unwrap();
    assert!((cost - 5.0 * 0.02 / 1e6).abs() < 1e-12, "{cost}");
    // An alias that only embeds is a model clients can find.
    let model: Value = gateway
        .get("/v1/models/embed", Some("team-secret"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(model["endpoints"], json!(["embeddings"]));
}

/// A RAG ingest's batch: each input within the model's context window,
/// all of them together far past it.
#[tokio::test]
async fn a_batch_is_judged_by_its_longest_input_and_metered_whole() {
    let upstream = MockUpstream::openai().start().await;
    let config =
        embed_alone(&upstream, embedder(0.02).set("context_window", 8192)).key(Key::new("team"));
    let gateway = start(&config).await;
    // 2,000 inputs of 100 tokens each, as the mock counts: 200,000.
    let inputs = vec!["word ".repeat(80); 2_000];
    let response = gateway
        .embed(json!({"model": "embed", "input": inputs}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2_000);
    assert_eq!(body["usage"]["prompt_tokens"], 200_000);
    // The upstream's count is believed, not replaced by an estimate.
    let input = [
        ("api", "embeddings"),
        ("alias", "embed"),
        ("backend", "vllm"),
        ("direction", "input"),
        ("estimated", "false"),
    ];
    gateway
        .eventually_metric("tollgate_tokens_total", &input, 200_000.0)
        .await;
    let text = gateway.metrics().await;
    assert_eq!(metric(&text, "tollgate_usage_rejected_total", &[]), None);
    // One input past the window is still refused, before any upstream.
    let mut inputs = vec!["word ".to_owned(); 3];
    inputs.push("word ".repeat(8_000));
    let response = gateway
        .embed(json!({"model": "embed", "input": inputs}))
        .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(response).await["code"], "context_length_exceeded");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn token_arrays_base64_and_dimensions_reach_the_upstream() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = start(&config(&upstream).key(Key::new("team"))).await;
    let response = gateway
        .embed(json!({"model": "embed", "input": [[1, 2, 3], [4, 5]],
                      "encoding_format": "base64", "dimensions": 8, "user": "u-1"}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    // Eight little-endian f32s, base64: 32 bytes, 44 characters.
    assert_eq!(body["data"][1]["embedding"].as_str().unwrap().len(), 44);
    let sent = upstream.single_request().json;
    assert_eq!(sent["input"], json!([[1, 2, 3], [4, 5]]));
    assert_eq!(sent["encoding_format"], "base64");
    assert_eq!(sent["dimensions"], 8);
    assert_eq!(sent["user"], "u-1");
}

#[tokio::test]
async fn only_deployments_that_declare_an_endpoint_serve_it() {
    let chat_only = MockUpstream::openai().start().await;
    let embedder = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("chat-only", "vllm", &url(&chat_only)))
        .backend(Backend::new("embedder", "vllm", &url(&embedder)))
        .model(
            Model::new("mixed")
                .deployment(Deployment::named("mixed/chat", "chat-only"))
                .deployment(
                    Deployment::named("mixed/embed", "embedder")
                        .set("endpoints", vec!["embeddings"]),
                ),
        )
        .model(Model::new("chat").deployment(Deployment::named("chat/only", "chat-only")))
        .key(Key::new("team"));
    let gateway = start(&config).await;
    for _ in 0..3 {
        let embedded = gateway.embed(json!({"model": "mixed", "input": "x"})).await;
        assert_eq!(served_by(&embedded), ("embedder".into(), "1".into()));
        let chatted = gateway
            .chat_as(
                "team-secret",
                json!({"model": "mixed", "messages": user("hi")}),
            )
            .await;
        assert_eq!(served_by(&chatted), ("chat-only".into(), "1".into()));
    }
    assert_eq!(embedder.requests().len(), 3);
    assert_eq!(chat_only.requests().len(), 3);

    // A model none of whose deployments serves the endpoint: a 400 that
    // names the models that do.
    let refused = gateway.embed(json!({"model": "chat", "input": "x"})).await;
    assert_eq!(refused.status(), 400);
    let error = error_of(refused).await;
    assert_eq!(error["param"], "model");
    assert_eq!(
        message(&error),
        "model \"chat\" does not serve embeddings; models that do: mixed"
    );

    // /v1/models says what each alias serves.
    let models: Value = gateway
        .get("/v1/models", Some("team-secret"))
        .await
        .json()
        .await
        .unwrap();
    let served = |id: &str| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()["endpoints"]
            .clone()
    };
    assert_eq!(
        served("mixed"),
        json!(["chat", "completions", "embeddings"])
    );
    assert_eq!(served("chat"), json!(["chat", "completions"]));
}

#[tokio::test]
async fn embeddings_fail_over_and_count_against_the_keys_limits() {
    let broken = MockUpstream::openai()
        .error(
            500,
            json!({"error": {"message": "engine crashed", "type": "server_error"}}),
        )
        .start()
        .await;
    let good = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("broken", "vllm", &url(&broken)))
        .backend(Backend::new("good", "vllm", &url(&good)))
        .model(
            Model::new("embed")
                .deployment(
                    Deployment::named("embed/broken", "broken")
                        .set("endpoints", vec!["embeddings"]),
                )
                .deployment(
                    Deployment::named("embed/good", "good").set("endpoints", vec!["embeddings"]),
                ),
        )
        .key(Key::new("team").set("rpm", 2));
    let gateway = start(&config).await;
    for _ in 0..2 {
        let response = gateway
            .embed(json!({"model": "embed", "input": "hello"}))
            .await;
        assert_eq!(served_by(&response), ("good".into(), "2".into()));
    }
    let limited = gateway
        .embed(json!({"model": "embed", "input": "hello"}))
        .await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn bad_embeddings_requests_are_400s_that_name_the_field() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = start(&config(&upstream).key(Key::new("team"))).await;
    let too_many: Vec<&str> = vec!["x"; 2049];
    for (body, param, says) in [
        (json!({"model": "embed"}), "input", "input"),
        (
            json!({"model": "embed", "input": []}),
            "input",
            "empty array",
        ),
        (
            json!({"model": "embed", "input": ["a", ""]}),
            "input",
            "empty string",
        ),
        (
            json!({"model": "embed", "input": 7}),
            "input",
            "a string, an array of strings",
        ),
        (
            json!({"model": "embed", "input": too_many}),
            "input",
            "at most 2048",
        ),
        (
            json!({"model": "embed", "input": "a", "encoding_format": "int8"}),
            "encoding_format",
            "int8",
        ),
        (
            json!({"model": "embed", "input": "a", "dimensions": 0}),
            "dimensions",
            "at least 1",
        ),
    ] {
        let response = gateway.embed(body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let error = error_of(response).await;
        assert_eq!(error["param"], param, "{body}: {error}");
        assert!(message(&error).contains(says), "{body}: {error}");
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn the_simulated_backend_embeds_the_same_input_the_same_way() {
    let config =
        Config::new()
            .backend(Backend::simulated("sim"))
            .model(Model::new("embed").deployment(
                Deployment::new("sim", "sim-embed").set("endpoints", vec!["embeddings"]),
            ))
            .key(Key::new("team"));
    let gateway = start(&config).await;
    let embed = |input: &'static str| {
        let gateway = &gateway;
        async move {
            let body: Value = gateway
                .embed(json!({"model": "embed", "input": [input, "other"]}))
                .await
                .json()
                .await
                .unwrap();
            let vector: Vec<f64> = body["data"][0]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (vector, body["data"][1]["embedding"].clone())
        }
    };
    let (first, other) = embed("hello").await;
    assert_eq!(first.len(), 16);
    let norm: f64 = first.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    let (again, _) = embed("hello").await;
    assert_eq!(first, again);
    assert_ne!(json!(first), other);
}

/// 200 embeddings requests at once against a budget that pays for about
/// 40: each reserves its input's estimated cost (no output), so the key
/// never spends past its budget, and every request is served or refused
/// with 429. The mock counts tokens as the gateway estimates them; an
/// upstream whose tokenizer counts more passes the budget by the
/// difference (docs/metering.md).
#[tokio::test]
async fn a_budget_holds_with_200_embeddings_at_once() {
    let upstream = MockUpstream::openai().record(false).start().await;
    // 2,000 characters: 500 tokens at $20 per Mtok, $0.01 a request.
    let config = embed_alone(&upstream, embedder(20.0))
        .key(Key::new("team").set("budget_daily_usd", 0.4))
        .admin();
    let gateway = start(&config).await;
    let input = "x".repeat(2_000);
    let statuses = futures_util::future::join_all((0..200).map(|_| {
        let (gateway, input) = (&gateway, &input);
        async move {
            let response = gateway
                .embed(json!({"model": "embed", "input": input}))
                .await;
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            status
        }
    }))
    .await;
    let served = statuses.iter().filter(|&&s| s == 200).count();
    eprintln!("{served} of 200 served");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let spent = gateway.spend("?key=team").await["total"]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!(
        spent <= 0.4 + 1e-9,
        "${spent} spent of $0.40 by {served} requests"
    );
    assert!(
        served >= 1 && (spent - served as f64 * 0.01).abs() < 1e-9,
        "{served}: ${spent}"
    );
}
