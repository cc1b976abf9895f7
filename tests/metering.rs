//! Metering as finance sees it: exact cost and counterfactual cost per
//! request, usage estimated (and marked) when a stream is cut, the spend
//! ledger behind `/admin/spend`, budgets that hold under concurrency, and
//! spend that survives a crash of the process.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{self, MockUpstream};
use support::process::{Process, serve_file};

/// Two per-token deployments of one alias, `a` at these prices and `b` at
/// those (input, output per Mtok), and the key `team`.
fn priced(a: &str, b: &str, prices: [(f64, f64); 2], team: Key) -> Config {
    let [(a_in, a_out), (b_in, b_out)] = prices;
    Config::new()
        .backend(Backend::upstream("api-a", "openai", a))
        .backend(Backend::upstream("api-b", "openai", b))
        .model(
            Model::new("chat")
                .deployment(Deployment::new("api-a", "m").price(a_in, a_out))
                .deployment(Deployment::new("api-b", "m").price(b_in, b_out)),
        )
        .key(team)
        .admin()
}

/// `priced`'s usual prices: `cost` picks the cheaper `a`.
const PRICES: [(f64, f64); 2] = [(1.0, 2.0), (3.0, 4.0)];

async fn chat_as_team(gateway: &Gateway, body: Value) -> reqwest::Response {
    gateway.chat_as("team-secret", body).await
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn each_request_is_priced_with_its_counterfactuals_and_lands_in_the_ledger() {
    let (a, b) = (
        MockUpstream::openai().start().await,
        MockUpstream::openai().start().await,
    );
    let gateway = start(&priced(&url(&a), &url(&b), PRICES, Key::new("team"))).await;
    let response = chat_as_team(&gateway, json!({"model": "chat", "messages": user("hi")})).await;
    assert_eq!(response.status(), 200);
    let usage = response.json::<Value>().await.unwrap()["usage"].clone();
    let (input, output) = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    let on_a = (input * 1.0 + output * 2.0) / 1e6;
    let on_b = (input * 3.0 + output * 4.0) / 1e6;

    let text = gateway.metrics().await;
    let cost = metric(
        &text,
        "tollgate_cost_usd_total",
        &[
            ("alias", "chat"),
            ("deployment", "chat/api-a"),
            ("key", "team"),
        ],
    )
    .unwrap();
    assert!(close(cost, on_a), "{cost} != {on_a}");
    let counterfactual = |d| {
        metric(
            &text,
            "tollgate_counterfactual_cost_usd_total",
            &[("alias", "chat"), ("deployment", d)],
        )
        .unwrap()
    };
    assert!(close(counterfactual("chat/api-a"), on_a));
    assert!(
        close(counterfactual("chat/api-b"), on_b),
        "what the same tokens would have cost on b"
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_tokens_total",
            &[
                ("api", "chat"),
                ("alias", "chat"),
                ("backend", "api-a"),
                ("direction", "output"),
                ("estimated", "false")
            ]
        ),
        Some(output)
    );

    let report = gateway.spend("?key=team").await;
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report:#}");
    assert_eq!(rows[0]["deployment"], "chat/api-a");
    assert_eq!(rows[0]["requests"], 1);
    assert_eq!(rows[0]["input_tokens"].as_f64(), Some(input));
    assert!(close(rows[0]["cost_usd"].as_f64().unwrap(), on_a));
    assert!(close(report["total"]["cost_usd"].as_f64().unwrap(), on_a));
    let none = gateway
        .spend("?key=team&from=2000-01-01&to=2000-12-31")
        .await;
    assert_eq!(none["rows"], json!([]));
    let refused = |query: &'static str| {
        let request = gateway
            .http
            .get(format!("{}/admin/spend{query}", gateway.base))
            .bearer_auth(ADMIN_TOKEN)
            .send();
        async move {
            let response = request.await.unwrap();
            assert_eq!(response.status(), 400, "{query}");
            error_of(response).await
        }
    };
    let bad = refused("?from=yesterday").await;
    assert!(message(&bad).contains("YYYY-MM-DD"), "{bad}");
    let backwards = refused("?from=2026-12-01&to=2026-11-30").await;
    assert_eq!(backwards["param"], "to");
    assert!(
        message(&backwards).contains("`to` is before `from`"),
        "{backwards}"
    );
    // One day is a range of its own.
    let one_day = gateway.spend("?from=2000-01-01&to=2000-01-01").await;
    assert_eq!(one_day["rows"], json!([]));
}

#[tokio::test]
async fn each_inbound_api_is_a_ledger_row_and_a_series_of_its_own() {
    let upstream = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("api", "openai", &url(&upstream)))
        .model(
            Model::new("chat").deployment(
                Deployment::new("api", "m")
                    .price(1.0, 2.0)
                    .set("endpoints", vec!["chat", "completions", "embeddings"]),
            ),
        )
        .key(Key::new("team"))
        .admin();
    let gateway = start(&config).await;
    let asks = [
        (
            "chat/completions",
            json!({"model": "chat", "messages": user("hi")}),
        ),
        ("completions", json!({"model": "chat", "prompt": "hi"})),
        ("embeddings", json!({"model": "chat", "input": "hi"})),
        (
            "messages",
            json!({"model": "chat", "max_tokens": 8, "messages": user("hi")}),
        ),
        ("responses", json!({"model": "chat", "input": "hi"})),
    ];
    for (path, body) in &asks {
        for _ in 0..2 {
            let response = gateway
                .post(&format!("/v1/{path}"))
                .bearer_auth("team-secret")
                .json(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{path}");
        }
    }
    let report = gateway.spend("?key=team").await;
    let mut apis: Vec<(&str, u64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["api"].as_str().unwrap(), r["requests"].as_u64().unwrap()))
        .collect();
    apis.sort();
    let every = [
        ("chat", 2),
        ("completions", 2),
        ("embeddings", 2),
        ("messages", 2),
        ("responses", 2),
    ];
    assert_eq!(apis, every, "{report:#}");
    let text = gateway.metrics().await;
    for (api, _) in every {
        let labels = [
            ("api", api),
            ("alias", "chat"),
            ("backend", "api"),
            ("status", "200"),
        ];
        assert_eq!(
            metric(&text, "tollgate_requests_total", &labels),
            Some(2.0),
            "{api}"
        );
        let input = [
            ("api", api),
            ("alias", "chat"),
            ("backend", "api"),
            ("direction", "input"),
            ("estimated", "false"),
        ];
        assert!(
            metric(&text, "tollgate_tokens_total", &input).is_some_and(|n| n > 0.0),
            "{api}"
        );
    }
    // A refusal before routing is counted under the API it came through.
    let refused = gateway
        .post("/v1/messages")
        .bearer_auth("team-secret")
        .json(&json!({"model": "nope", "max_tokens": 8, "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let labels = [
        ("api", "messages"),
        ("alias", "none"),
        ("backend", "none"),
        ("status", "404"),
    ];
    assert_eq!(
        metric(&gateway.metrics().await, "tollgate_requests_total", &labels),
        Some(1.0)
    );
}

/// With more keys than `[metrics] top_keys`, only the opted-in keys and
/// the biggest spenders this month have series of their own; the rest are
/// counted under `(other)`, and a key that falls out of the top loses its
/// series at the next scrape, so `/metrics` stays bounded.
#[tokio::test]
async fn per_key_series_are_the_opted_in_and_the_top_spenders_and_the_rest_are_other() {
    let (a, b) = (
        MockUpstream::openai().start().await,
        MockUpstream::openai().start().await,
    );
    let config = priced(&url(&a), &url(&b), PRICES, Key::new("alpha"))
        .key(
            Key::new("beta")
                .set("metrics", true)
                .set("budget_daily_usd", 5.0),
        )
        .key(Key::new("gamma").set("budget_daily_usd", 5.0))
        .key(Key::new("delta").set("budget_daily_usd", 5.0))
        .set("metrics", "top_keys", 1);
    let gateway = start(&config).await;
    let spend = |key: &'static str, times: usize| {
        let gateway = &gateway;
        async move {
            for _ in 0..times {
                let response = gateway
                    .chat_as(
                        &format!("{key}-secret"),
                        json!({"model": "chat", "messages": user("hi")}),
                    )
                    .await;
                assert_eq!(response.status(), 200);
            }
        }
    };
    let cost = |text: &str, key: &str| {
        metric(
            text,
            "tollgate_cost_usd_total",
            &[
                ("alias", "chat"),
                ("deployment", "chat/api-a"),
                ("key", key),
            ],
        )
    };
    // Nobody has spent: the top one is the first name, alpha.
    spend("gamma", 1).await;
    spend("beta", 1).await;
    let text = gateway.metrics().await;
    assert!(cost(&text, "(other)").is_some_and(|c| c > 0.0), "{text}");
    assert!(cost(&text, "gamma").is_none(), "{text}");
    assert!(cost(&text, "beta").is_some(), "opted in");
    // That scrape ranked gamma first: its spend now has its own series.
    spend("gamma", 1).await;
    let text = gateway.metrics().await;
    assert!(cost(&text, "gamma").is_some(), "{text}");
    let remaining = |text: &str, key: &str| {
        metric(
            text,
            "tollgate_budget_remaining_usd",
            &[("key", key), ("period", "daily")],
        )
    };
    assert!(remaining(&text, "gamma").is_some());
    assert!(remaining(&text, "beta").is_some());
    assert!(remaining(&text, "delta").is_none(), "no series of its own");
    // Delta outspends gamma: at the next scrape gamma's series goes.
    spend("delta", 3).await;
    let _ = gateway.metrics().await;
    let text = gateway.metrics().await;
    assert!(cost(&text, "gamma").is_none(), "{text}");
    assert!(
        cost(&text, "delta").is_none(),
        "its spend so far is (other)'s"
    );
    spend("delta", 1).await;
    let text = gateway.metrics().await;
    assert!(cost(&text, "delta").is_some(), "{text}");
    assert!(remaining(&text, "delta").is_some());
    assert!(remaining(&text, "gamma").is_none());
    // The ledger names every key, whatever its series.
    let report = gateway.spend("?key=gamma").await;
    assert_eq!(report["total"]["requests"], 2, "{report:#}");
}

#[tokio::test]
async fn a_stream_the_client_cuts_is_metered_once_with_estimated_usage() {
    let held = MockUpstream::openai().hold_after(3).start().await;
    let failing = MockUpstream::openai().status(500).start().await;
    let config = priced(&url(&held), &url(&failing), PRICES, Key::new("team"));
    let gateway = start(&config).await;
    let response = chat_as_team(
        &gateway,
        json!({"model": "chat", "stream": true, "messages": user("hello there")}),
    )
    .await;
    let mut events = Events::new(response);
    assert!(events.next().await.is_some());
    assert!(events.next().await.is_some());
    drop(events);
    let text = answered_by_a(&gateway, "499", 1.0).await;
    let estimated = |direction| {
        metric(
            &text,
            "tollgate_tokens_total",
            &[
                ("api", "chat"),
                ("alias", "chat"),
                ("backend", "api-a"),
                ("direction", direction),
                ("estimated", "true"),
            ],
        )
    };
    assert!(estimated("input").unwrap() > 0.0, "{text}");
    assert!(
        estimated("output").unwrap() > 0.0,
        "the text that passed through"
    );
    let report = gateway.spend("").await;
    assert_eq!(report["total"]["requests"], 1, "metered exactly once");
    assert!(report["total"]["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn budgets_hold_under_concurrency_and_refusals_say_which_budget_and_when_it_resets() {
    // Requests overlap: each upstream call takes 50 ms.
    let a = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(50))
        .start()
        .await;
    let b = MockUpstream::openai().start().await;
    let config = priced(
        &url(&a),
        &url(&b),
        [(10.0, 10.0), (20.0, 20.0)],
        Key::new("team").set("budget_daily_usd", 0.005),
    );
    let gateway = start(&config).await;
    let body = json!({"model": "chat", "max_tokens": 100, "messages": user("hi")});
    // Each may cost up to (prompt + 100 tokens) × $20/Mtok on the dearer b,
    // about $0.0021, which is reserved; each actually costs about $0.00014.
    let responses =
        futures_util::future::join_all((0..60).map(|_| chat_as_team(&gateway, body.clone()))).await;
    let served = responses.iter().filter(|r| r.status() == 200).count();
    let refused: Vec<_> = responses
        .into_iter()
        .filter(|r| r.status() == 429)
        .collect();
    assert!(served > 0);
    assert_eq!(
        served + refused.len(),
        60,
        "every request is served or refused"
    );
    let mut last_refusal = None;
    for _ in 0..100 {
        let response = chat_as_team(&gateway, body.clone()).await;
        if response.status() == 429 {
            last_refusal = Some(response);
            break;
        }
    }
    let refusal = last_refusal.expect("the budget runs out");
    assert_eq!(refusal.headers()["x-should-retry"], "false");
    let error = error_of(refusal).await;
    assert_eq!(error["code"], "insufficient_quota");
    assert_eq!(error["type"], "insufficient_quota");
    let text = message(&error);
    assert!(text.contains("key \"team\""), "{text}");
    assert!(text.contains("daily budget of $0.005,"), "{text}");
    assert!(text.contains("00:00 UTC"), "says when it resets: {text}");

    let spent = gateway.spend("?key=team").await["total"]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!(
        spent <= 0.005 + 0.0021,
        "spent ${spent}: at most one estimate over the budget"
    );
    let remaining = metric(
        &gateway.metrics().await,
        "tollgate_budget_remaining_usd",
        &[("key", "team"), ("period", "daily")],
    )
    .unwrap();
    assert!(close(remaining, (0.005 - spent).max(0.0)), "{remaining}");
}

// ---- usage reports the gateway does not believe ----------------------------

/// A whole chat completion with this `usage`.
fn answer_with_usage(usage: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "twelve chars"},
                        "finish_reason": "stop"}],
           "usage": usage})
}

/// The metrics page once `requests` chat requests answered by `api-a`
/// with `status` are counted: each is metered as its body ends.
async fn answered_by_a(gateway: &Gateway, status: &str, requests: f64) -> String {
    gateway
        .eventually_metric(
            "tollgate_requests_total",
            &[
                ("api", "chat"),
                ("alias", "chat"),
                ("backend", "api-a"),
                ("status", status),
            ],
            requests,
        )
        .await;
    gateway.metrics().await
}

fn tokens(text: &str, backend: &str, direction: &str, estimated: &str) -> f64 {
    metric(
        text,
        "tollgate_tokens_total",
        &[
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", backend),
            ("direction", direction),
            ("estimated", estimated),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn usage_without_a_total_or_in_integral_floats_is_taken_as_reported() {
    let usage = json!({"prompt_tokens": 11.0, "completion_tokens": 3});
    let upstream = MockUpstream::openai()
        .json(answer_with_usage(usage.clone()))
        .stream_bytes(format!(
            "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}),
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [], "usage": usage}),
        ))
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = priced(&url(&upstream), &url(&spare), PRICES, Key::new("team"));
    let gateway = start(&config).await;
    let response = chat_as_team(&gateway, json!({"model": "chat", "messages": user("hi")})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response).0, "api-a", "no failover");
    let stream = json!({"model": "chat", "messages": user("hi"), "stream": true});
    let events = Events::new(chat_as_team(&gateway, stream).await)
        .rest()
        .await;
    assert!(events.iter().all(|e| !e.contains("error")), "{events:?}");
    assert_eq!(spare.hits(), 0);
    let text = answered_by_a(&gateway, "200", 2.0).await;
    assert_eq!(tokens(&text, "api-a", "output", "false"), 6.0, "{text}");
    assert_eq!(tokens(&text, "api-a", "input", "false"), 22.0);
    assert_eq!(tokens(&text, "api-a", "output", "true"), 0.0);
}

#[tokio::test]
async fn output_is_estimated_from_the_text_however_the_json_is_spaced() {
    // No usage, spaced and escaped as a pretty-printing server writes it:
    // "héllo wörld\n" is 14 bytes of text, 4 tokens at 4 bytes a token.
    let upstream = MockUpstream::openai()
        .stream_bytes(
            "data: {\"id\": \"c\", \"choices\": [{\"index\": 0, \"delta\": {\"content\" : \"h\\u00e9llo \"}}]}\n\n\
             data: {\"id\": \"c\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"w\u{f6}rld\\n\"}, \"finish_reason\": \"stop\"}]}\n\n\
             data: [DONE]\n\n",
        )
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = priced(&url(&upstream), &url(&spare), PRICES, Key::new("team"));
    let gateway = start(&config).await;
    let stream = json!({"model": "chat", "messages": user("hi"), "stream": true});
    let events = Events::new(chat_as_team(&gateway, stream).await)
        .rest()
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text = answered_by_a(&gateway, "200", 1.0).await;
    assert_eq!(tokens(&text, "api-a", "output", "true"), 4.0, "{text}");
}

#[tokio::test]
async fn a_tool_calls_arguments_are_output_estimated_as_text_is() {
    // No usage: two calls' arguments, 33 bytes streamed in four pieces
    // (two in one chunk, as vLLM sends parallel calls) and 33 whole, are
    // 9 tokens each at 4 bytes a token, rounded up.
    let piece = |calls: &str| {
        format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{calls}]}}}}]}}\n\n"
        )
    };
    let call = |index: u8, arguments: &str| {
        format!("{{\"index\":{index},\"function\":{{\"arguments\":{arguments:?}}}}}")
    };
    let stream = [
        piece(&call(0, "{\"city\": \"Paris\"")),
        piece(&format!("{},{}", call(0, "}"), call(1, "{\"city\": "))),
        piece(&call(1, "\"Rome\"}")),
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n"
            .to_owned(),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let whole = json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": null, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "b", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        "finish_reason": "tool_calls"}]});
    let upstream = MockUpstream::openai()
        .stream_bytes(stream)
        .json(whole)
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = priced(&url(&upstream), &url(&spare), PRICES, Key::new("team"));
    let gateway = start(&config).await;
    for streamed in [true, false] {
        let body = json!({"model": "chat", "messages": user("hi"), "stream": streamed});
        let response = chat_as_team(&gateway, body).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let text = answered_by_a(&gateway, "200", 2.0).await;
    assert_eq!(tokens(&text, "api-a", "output", "true"), 18.0, "{text}");
}

#[tokio::test]
async fn usage_that_cannot_be_true_is_estimated_counted_and_never_reaches_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let upstream = MockUpstream::openai()
        .json(answer_with_usage(json!({
            "prompt_tokens": 11, "completion_tokens": 18_446_744_073_709_551_615_u64,
            "total_tokens": 18_446_744_073_709_551_615_u64})))
        .start()
        .await;
    let negative = MockUpstream::openai()
        .json(answer_with_usage(
            json!({"prompt_tokens": -1, "completion_tokens": 3}),
        ))
        .start()
        .await;
    let text = Config::new()
        .backend(Backend::upstream("huge", "openai", &url(&upstream)))
        .backend(Backend::upstream("negative", "openai", &url(&negative)))
        .model(Model::new("chat").deployment(Deployment::new("huge", "m").price(1.0, 2.0)))
        .model(Model::new("other").deployment(Deployment::new("negative", "m").price(1.0, 2.0)))
        .key(Key::new("team").set("budget_daily_usd", 1.0))
        .set(
            "ledger",
            "data_dir",
            dir.path().join("data").to_str().unwrap(),
        )
        .set("ledger", "flush_interval_ms", 100)
        .set("admin", "token_env", "TOLLGATE_TEST_ADMIN")
        .to_toml();
    std::fs::write(&config, text).unwrap();
    let env = [
        ("TOLLGATE_TEST_ADMIN", ADMIN_TOKEN),
        ("KEY_TEAM", "team-secret"),
        ("UPSTREAM_KEY_HUGE", "k"),
        ("UPSTREAM_KEY_NEGATIVE", "k"),
    ];
    let first = serve_file(&config, &env);
    let client = reqwest::Client::new();
    let ask = |model: &'static str| {
        client
            .post(format!("{}/v1/chat/completions", first.base))
            .bearer_auth("team-secret")
            .json(&json!({"model": model, "messages": user("hi")}))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(ask("chat").await.unwrap().status(), 200);
    }
    assert_eq!(ask("other").await.unwrap().status(), 200);
    first.logged("the upstream's usage report is not believable");
    let page = first.metrics().await;
    let rejected = |backend, reason| {
        metric(
            &page,
            "tollgate_usage_rejected_total",
            &[("backend", backend), ("reason", reason)],
        )
    };
    assert_eq!(rejected("huge", "over_context_window"), Some(2.0), "{page}");
    assert_eq!(rejected("negative", "not_a_count"), Some(1.0));
    // Estimated instead: "hi" is 5 prompt tokens, "twelve chars" 3 output.
    let before = total_spend(&first.base).await;
    assert_eq!(before["requests"], 3);
    assert_eq!(before["output_tokens"], 9);
    // Flushed, then killed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(first);

    // The gateway starts again on its own ledger, with the same totals.
    let second = serve_file(&config, &env);
    assert_eq!(total_spend(&second.base).await, before);
}

// ---- a crash of the process ------------------------------------------------

fn serve(config: &std::path::Path) -> Process {
    serve_file(config, &[("TOLLGATE_TEST_ADMIN", ADMIN_TOKEN)])
}

async fn total_spend(base: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}/admin/spend"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["total"]
        .clone()
}

#[tokio::test]
async fn spend_survives_a_crash_losing_at_most_one_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let data_dir = dir.path().join("data");
    let text = Config::new()
        .backend(Backend::simulated("sim").answers(1, 10_000, 20))
        .model(Model::new("chat").deployment(Deployment::new("sim", "m").price(5.0, 15.0)))
        .set(
            "ledger",
            "data_dir",
            data_dir.to_str().expect("a UTF-8 path"),
        )
        .set("ledger", "flush_interval_ms", 100)
        .set("admin", "token_env", "TOLLGATE_TEST_ADMIN")
        .to_toml();
    std::fs::write(&config, text).unwrap();
    let mut first = serve(&config);
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client
            .post(format!("{}/v1/chat/completions", first.base))
            .json(&json!({"model": "chat", "messages": user("hello")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let before = total_spend(&first.base).await;
    assert_eq!(before["requests"], 3);
    // Longer than one flush interval, then SIGKILL: no graceful flush.
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = serve(&config);
    let after = total_spend(&second.base).await;
    assert_eq!(after, before, "every total is restored after a crash");
}

/// Many requests at once, streamed and whole, through the gateway's two
/// ways of reading a stream (events whole in each read, and events cut
/// across reads), with a quarter of the clients leaving after the first
/// event: every request is recorded exactly once, with exact usage unless
/// its client left.
#[tokio::test]
async fn concurrent_requests_some_cut_by_their_clients_are_each_metered_once() {
    const REQUESTS: usize = 80;
    const TOKENS: usize = 100;
    let whole_reads = MockUpstream::openai()
        .answers_of(TOKENS)
        .event_delay(Duration::from_millis(1))
        .start()
        .await;
    let cut_reads = MockUpstream::openai()
        .answers_of(TOKENS)
        .event_delay(Duration::from_millis(1))
        .split_every(7)
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("whole", "openai", &url(&whole_reads)))
        .backend(Backend::upstream("cut", "openai", &url(&cut_reads)))
        .model(Model::new("a").deployment(Deployment::new("whole", "m").price(1.0, 2.0)))
        .model(Model::new("b").deployment(Deployment::new("cut", "m").price(1.0, 2.0)))
        .key(Key::new("team"))
        .admin();
    let gateway = start(&config).await;
    let requests = (0..REQUESTS).map(|i| {
        let gateway = &gateway;
        async move {
            // Each alias gets every kind: streamed, left, whole.
            let alias = if (i / 4) % 2 == 0 { "a" } else { "b" };
            let stream = i % 4 != 3;
            let body = json!({"model": alias, "stream": stream, "messages": user("hello there")});
            let response = chat_as_team(gateway, body).await;
            assert_eq!(response.status(), 200);
            if !stream {
                response.bytes().await.unwrap();
                return;
            }
            let mut events = Events::new(response);
            if i % 4 == 2 {
                // Leaves after the first event.
                assert!(events.next().await.is_some());
                return;
            }
            while events.next().await.is_some() {}
        }
    });
    futures_util::future::join_all(requests).await;
    let (left, answered) = (REQUESTS / 4, REQUESTS - REQUESTS / 4);
    let series = |alias, backend, status| {
        [
            ("api", "chat"),
            ("alias", alias),
            ("backend", backend),
            ("status", status),
        ]
    };
    for (alias, backend) in [("a", "whole"), ("b", "cut")] {
        gateway
            .eventually_metric(
                "tollgate_requests_total",
                &series(alias, backend, "499"),
                (left / 2) as f64,
            )
            .await;
        gateway
            .eventually_metric(
                "tollgate_requests_total",
                &series(alias, backend, "200"),
                (answered / 2) as f64,
            )
            .await;
    }
    // A moment later, still once each.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = gateway.metrics().await;
    let exact_output: f64 = [("a", "whole"), ("b", "cut")]
        .iter()
        .map(|(alias, backend)| {
            metric(
                &text,
                "tollgate_tokens_total",
                &[
                    ("api", "chat"),
                    ("alias", alias),
                    ("backend", backend),
                    ("direction", "output"),
                    ("estimated", "false"),
                ],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(exact_output, (answered * TOKENS) as f64, "{text}");
    for (alias, backend) in [("a", "whole"), ("b", "cut")] {
        for (status, count) in [("200", answered / 2), ("499", left / 2)] {
            let recorded = metric(
                &text,
                "tollgate_requests_total",
                &series(alias, backend, status),
            );
            assert_eq!(recorded, Some(count as f64), "{alias} {status}: {text}");
        }
    }
    let report = gateway.spend("").await;
    assert_eq!(report["total"]["requests"], REQUESTS, "{report:#}");
}

/// A self-hosted pool's utilisation and effective price count the tokens
/// it computed: a prompt token its engine read from its prefix cache took
/// no GPU time, and is charged nothing.
#[tokio::test]
async fn a_self_hosted_pool_counts_the_tokens_it_computed_not_those_its_cache_served() {
    let upstream = MockUpstream::openai()
        .json(json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                      "prompt_tokens_details": {"cached_tokens": 900}}}))
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream("gpu", "vllm", &url(&upstream)).pool(3.6, 2, 1000))
        .model(Model::new("chat").deployment(Deployment::new("gpu", "m")));
    let gateway = start(&config).await;
    assert_eq!(
        gateway
            .chat(json!({"model": "chat", "messages": user("hi")}))
            .await
            .status(),
        200
    );
    // In one scrape, the cost so far over the effective price per token
    // is the tokens computed.
    let labels = [("backend", "gpu")];
    let computed = loop {
        let text = gateway.metrics().await;
        let cost = metric(&text, "tollgate_selfhosted_cost_usd_total", &labels);
        let price = metric(&text, "tollgate_selfhosted_effective_usd_per_mtok", &labels);
        if let (Some(cost), Some(price)) = (cost, price) {
            break cost / price * 1e6;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!((computed - 110.0).abs() < 1e-6, "{computed}");
}

/// An upstream that reports no usage is charged the estimate of its text,
/// at most the limit it was sent, but never fewer tokens than the chunks
/// of text it sent: one that ignores its limit is charged what it is
/// known to have written past it.
#[tokio::test]
async fn an_upstream_past_its_limit_without_usage_is_charged_a_token_a_chunk_at_least() {
    let sse = mock::stream_without_usage(["a"; 300], "stop");
    let upstream = MockUpstream::openai().stream_bytes(sse).start().await;
    let config = Config::new()
        .backend(Backend::upstream("api", "openai", &url(&upstream)))
        .model(Model::new("chat").deployment(Deployment::new("api", "m").price(1.0, 1.0)));
    let gateway = start(&config).await;
    let (_, events) = gateway
        .stream(
            "/v1/chat/completions",
            json!({"model": "chat", "stream": true, "max_tokens": 100, "messages": user("hi")}),
        )
        .await;
    assert_eq!(
        events.rest().await.len(),
        303,
        "the role, 300 chunks of text, the end and [DONE]"
    );
    let labels = [
        ("api", "chat"),
        ("alias", "chat"),
        ("backend", "api"),
        ("direction", "output"),
        ("estimated", "true"),
    ];
    gateway
        .eventually_metric("tollgate_tokens_total", &labels, 300.0)
        .await;
}
