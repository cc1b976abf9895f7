//! TTFT hedging: a first deployment slow to its first byte is raced by
//! the next one in the plan that fits the alias's allowance; the first to
//! answer serves and the other is cancelled and charged its prompt. No
//! hedge goes beyond the allowance, to a budget's cost, or after the
//! client has a byte.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{Gateway, metric, url};
use support::mock::{MockServer, MockUpstream};

const SLOW: Duration = Duration::from_millis(1_500);

/// Alias `chat` on `first` (cheaper, so the cost strategy tries it
/// first) and `second`, both Llama, hedged after 100 ms with `allowance`
/// dollars.
fn two(first: &MockServer, second: &MockServer, allowance: f64) -> Config {
    Config::new()
        .admin()
        .backend(Backend::upstream("first", "openai", &url(first)))
        .backend(Backend::upstream("second", "openai", &url(second)))
        .model(
            Model::new("chat")
                .hedge_after(100, allowance)
                .deployment(
                    Deployment::named("chat/first", "first")
                        .price(1.0, 2.0)
                        .set("licence", "llama"),
                )
                .deployment(
                    Deployment::named("chat/second", "second")
                        .price(3.0, 6.0)
                        .set("licence", "llama"),
                ),
        )
}

fn hi(max_tokens: u32) -> Value {
    json!({"model": "chat", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello there"}]})
}

async fn hedges(gateway: &Gateway, outcome: &str) -> Option<f64> {
    let text = gateway.metrics().await;
    metric(
        &text,
        "tollgate_hedges_total",
        &[("alias", "chat"), ("outcome", outcome)],
    )
}

fn cost(text: &str, deployment: &str) -> Option<f64> {
    metric(
        text,
        "tollgate_cost_usd_total",
        &[
            ("alias", "chat"),
            ("deployment", deployment),
            ("key", "none"),
        ],
    )
}

#[tokio::test]
async fn a_slow_first_byte_is_hedged_the_hedge_serves_and_the_first_is_cancelled_and_charged_its_prompt()
 {
    let first = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let second = MockUpstream::openai().start().await;
    let gateway = support::gateway::start(&two(&first, &second, 0.01)).await;
    let started = std::time::Instant::now();
    let response = gateway.chat(hi(50)).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < SLOW,
        "served by the hedge, not the first"
    );
    assert_eq!(response.headers()["x-tollgate-backend"], "second");
    assert_eq!(response.headers()["x-tollgate-attempts"], "2");
    let body: Value = response.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert!(
        first.wait_peer_closed(1, Duration::from_secs(2)).await,
        "the first attempt is cancelled: its connection closed"
    );
    assert_eq!(hedges(&gateway, "hedge_won").await, Some(1.0));
    gateway
        .recorded_once(&[
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "second"),
            ("status", "200"),
        ])
        .await;
    let text = gateway.metrics().await;
    // The cancelled attempt had the prompt: it is charged the gateway's
    // estimate of it at the first deployment's input price, estimated.
    let prompt = metric(
        &text,
        "tollgate_tokens_total",
        &[
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "first"),
            ("direction", "input"),
            ("estimated", "true"),
        ],
    )
    .expect("the cancelled attempt's prompt is counted, estimated");
    let charged = cost(&text, "chat/first").unwrap();
    assert!(
        (charged - prompt * 1.0 / 1e6).abs() < 1e-12,
        "{charged} for {prompt} tokens"
    );
    // The request's one record in the ledger holds both costs.
    let usage = &body["usage"];
    let served = (usage["prompt_tokens"].as_f64().unwrap() * 3.0
        + usage["completion_tokens"].as_f64().unwrap() * 6.0)
        / 1e6;
    let spend = gateway.spend("").await;
    let total = spend["total"]["cost_usd"].as_f64().unwrap();
    assert!(
        (total - (served + charged)).abs() < 1e-9,
        "{total} vs {served} + {charged}: {spend}"
    );
    assert_eq!(spend["total"]["requests"], 1, "{spend}");
    // And so does the licence report's spend.
    let licence = gateway.admin("/admin/licence").await;
    let served = &licence["months"][0]["served"];
    let licensed: f64 = served
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(
        (licensed - total).abs() < 1e-9,
        "{licensed} vs {total}: {licence}"
    );
}

#[tokio::test]
async fn the_first_to_answer_wins_and_the_slower_hedge_is_cancelled() {
    let first = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(400))
        .start()
        .await;
    let second = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let gateway = support::gateway::start(&two(&first, &second, 0.01)).await;
    let response = gateway.chat(hi(50)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "first");
    assert_eq!(response.headers()["x-tollgate-attempts"], "2");
    assert_eq!(second.hits(), 1, "the hedge went out");
    assert!(second.wait_peer_closed(1, Duration::from_secs(2)).await);
    assert_eq!(hedges(&gateway, "first_won").await, Some(1.0));
}

#[tokio::test]
async fn a_stream_is_hedged_before_its_first_chunk_only() {
    // The first chunk comes at once and the rest slowly: the client has a
    // byte long before the hedge's wait, so there is no hedge.
    let first = MockUpstream::openai()
        .event_delay(Duration::from_millis(150))
        .start()
        .await;
    let second = MockUpstream::openai().start().await;
    let gateway = support::gateway::start(&two(&first, &second, 0.01)).await;
    let mut body = hi(50);
    body["stream"] = json!(true);
    let (headers, events) = gateway.stream("/v1/chat/completions", body.clone()).await;
    assert_eq!(headers["x-tollgate-backend"], "first");
    assert!(events.rest().await.len() >= 3);
    assert_eq!(second.hits(), 0, "no hedge once the client has a byte");
    assert_eq!(hedges(&gateway, "hedge_won").await, None);

    // A stream slow to its first chunk is hedged, and served by the hedge.
    let slow = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let gateway = support::gateway::start(&two(&slow, &second, 0.01)).await;
    let (headers, events) = gateway.stream("/v1/chat/completions", body).await;
    assert_eq!(headers["x-tollgate-backend"], "second");
    assert_eq!(
        events.rest().await.last().map(String::as_str),
        Some("[DONE]")
    );
    assert!(slow.wait_peer_closed(1, Duration::from_secs(2)).await);
    assert_eq!(hedges(&gateway, "hedge_won").await, Some(1.0));
}

/// Asserts that `body`, whose first deployment is slow to answer, is not
/// hedged: its worst case on the second is over a $0.01 allowance.
async fn not_hedged_over_the_allowance(body: Value) {
    let first = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(400))
        .start()
        .await;
    let second = MockUpstream::openai().start().await;
    let gateway = support::gateway::start(&two(&first, &second, 0.01)).await;
    let response = gateway.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "first");
    assert_eq!(response.headers()["x-tollgate-attempts"], "1");
    assert_eq!(second.hits(), 0);
    assert_eq!(hedges(&gateway, "over_allowance").await, Some(1.0));
}

/// The output limit the hedge of `body`, which sets none, is sent with
/// at a $0.01 allowance; the first attempt is sent without one.
async fn hedge_limit(body: Value) -> u64 {
    let slow = MockUpstream::openai()
        .first_byte_after(SLOW)
        .record(true)
        .start()
        .await;
    let second = MockUpstream::openai().record(true).start().await;
    let gateway = support::gateway::start(&two(&slow, &second, 0.01)).await;
    let response = gateway.chat(body).await;
    assert_eq!(response.headers()["x-tollgate-backend"], "second");
    let first_sent: Value = serde_json::from_slice(&slow.single_request().body).unwrap();
    assert!(
        first_sent.get("max_tokens").is_none() && first_sent.get("max_completion_tokens").is_none()
    );
    let sent: Value = serde_json::from_slice(&second.single_request().body).unwrap();
    sent["max_completion_tokens"]
        .as_u64()
        .or(sent["max_tokens"].as_u64())
        .unwrap_or_else(|| panic!("the hedge carries an output limit: {sent}"))
}

#[tokio::test]
async fn no_hedge_goes_beyond_the_allowance() {
    // At $6 per Mtok of output, 2,000 output tokens alone cost $0.012.
    not_hedged_over_the_allowance(hi(2_000)).await;
    // Without max_tokens, the hedge is sent with the output limit the
    // allowance pays for: ($0.01 − the most the prompt can be, 91 tokens
    // at $3) / $6 per Mtok.
    let hello = json!({"model": "chat", "messages": [{"role": "user", "content": "hello there"}]});
    let limit = hedge_limit(hello.clone()).await;
    assert_eq!(limit, 1_621);
    // With four answers, a quarter of that each; and a limit of 500 each
    // is 2,000 tokens, over the allowance.
    let mut four = hello;
    four["n"] = json!(4);
    let limit = hedge_limit(four).await;
    assert_eq!(limit, 405);
    let mut four_of_500 = hi(500);
    four_of_500["n"] = json!(4);
    not_hedged_over_the_allowance(four_of_500).await;
}

#[tokio::test]
async fn a_failed_hedge_leaves_the_first_to_answer_and_a_failed_first_the_hedge() {
    let first = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(400))
        .start()
        .await;
    let failing = MockUpstream::openai()
        .error(
            503,
            json!({"error": {"message": "overloaded", "type": "server_error"}}),
        )
        .start()
        .await;
    let gateway = support::gateway::start(&two(&first, &failing, 0.01)).await;
    let response = gateway.chat(hi(50)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "first");
    assert_eq!(failing.hits(), 1);
    assert_eq!(hedges(&gateway, "first_won").await, Some(1.0));
    // Nothing was cancelled, so nothing but the answer is charged.
    let text = gateway.metrics().await;
    assert_eq!(cost(&text, "chat/second"), None);

    let slow_failure = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(300))
        .error(
            503,
            json!({"error": {"message": "overloaded", "type": "server_error"}}),
        )
        .start()
        .await;
    let slow_answer = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(600))
        .start()
        .await;
    let gateway = support::gateway::start(&two(&slow_failure, &slow_answer, 0.01)).await;
    let response = gateway.chat(hi(50)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "second");
    assert_eq!(hedges(&gateway, "hedge_won").await, Some(1.0));
}

#[tokio::test]
async fn a_budget_holds_the_hedge_allowance_and_is_never_overrun() {
    let first = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let second = MockUpstream::openai().start().await;
    // Enough for the first attempt's worst case (the most the prompt can
    // be, 91 tokens at $3 per Mtok, and 50 output tokens at $6: $0.000573)
    // and a hedge's allowance.
    let config = two(&first, &second, 0.000_6).key(
        Key::new("team")
            .set("budget_daily_usd", 0.001_2)
            .models(&["chat"]),
    );
    let gateway = support::gateway::start(&config).await;
    let response = gateway.chat_as("team-secret", hi(50)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "second");
    gateway
        .recorded_once(&[
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "second"),
            ("status", "200"),
        ])
        .await;
    let spend = gateway.spend("").await;
    let spent = spend["total"]["cost_usd"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 0.001_2, "{spend}");

    // A budget with room for the first attempt's worst case but not the
    // allowance beside it: the first attempt runs whole, and no hedge.
    let first = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(400))
        .start()
        .await;
    let second = MockUpstream::openai().start().await;
    let config = two(&first, &second, 0.01).key(
        Key::new("team")
            .set("budget_daily_usd", 0.000_6)
            .models(&["chat"]),
    );
    let gateway = support::gateway::start(&config).await;
    let response = gateway.chat_as("team-secret", hi(50)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "first");
    assert_eq!(second.hits(), 0);
    assert_eq!(hedges(&gateway, "over_allowance").await, Some(1.0));
}

#[tokio::test]
async fn explain_shows_the_wait_and_where_a_hedge_would_go() {
    let first = MockUpstream::openai().start().await;
    let second = MockUpstream::openai().start().await;
    let config = Config::new()
        .admin()
        .backend(Backend::upstream("first", "openai", &url(&first)))
        .backend(Backend::upstream("second", "openai", &url(&second)))
        .model(
            Model::new("chat")
                .hedge("after_quantile", 0.9)
                .hedge("max_extra_usd_per_request", 0.01)
                .deployment(Deployment::named("chat/first", "first").price(1.0, 2.0))
                .deployment(Deployment::named("chat/second", "second").price(3.0, 6.0)),
        );
    let gateway = support::gateway::start(&config).await;
    let ask = json!({"request": hi(50)});
    let explained = gateway.explain(ask.clone()).await;
    let hedge = &explained["hedge"];
    assert_eq!(hedge["after_quantile"], 0.9);
    assert_eq!(
        hedge["after_ms"],
        Value::Null,
        "too few first bytes measured: {hedge}"
    );
    assert_eq!(hedge["to"], "chat/second");
    let worst = hedge["worst_usd"].as_f64().unwrap();
    assert!(worst > 50.0 * 6.0 / 1e6 && worst < 0.01, "{hedge}");
    for _ in 0..20 {
        assert_eq!(gateway.chat(hi(50)).await.status(), 200);
    }
    let explained = gateway.explain(ask).await;
    let after = explained["hedge"]["after_ms"]
        .as_f64()
        .expect("measured now");
    assert!(after > 0.0 && after < 1_000.0, "{explained}");
}

#[test]
fn a_hedge_needs_one_wait_an_allowance_and_a_second_deployment() {
    use toml::Value::{Float, Integer};
    let problems = |deployments: usize, hedge: &[(&str, toml::Value)]| {
        let mut model = Model::new("chat");
        for (key, value) in hedge {
            model = model.hedge(key, value.clone());
        }
        for name in ["a", "b"].into_iter().take(deployments) {
            model = model.deployment(Deployment::named(name, "sim"));
        }
        let toml = Config::new()
            .backend(Backend::simulated("sim"))
            .model(model)
            .to_toml();
        tollgate::config::parse(&toml, &|_| None)
            .err()
            .map(|problems| problems.to_string())
    };
    let allowance = ("max_extra_usd_per_request", Float(0.01));
    let cases = [
        (
            1,
            vec![("after_ms", Integer(100)), allowance.clone()],
            Some("models[0].hedge: a hedge goes to a second deployment"),
        ),
        (
            2,
            vec![
                ("after_ms", Integer(100)),
                ("after_quantile", Float(0.95)),
                allowance.clone(),
            ],
            Some("models[0].hedge: give exactly one of after_ms"),
        ),
        (
            2,
            vec![("after_ms", Integer(100))],
            Some("models[0].hedge.max_extra_usd_per_request: required"),
        ),
        (
            2,
            vec![("after_quantile", Float(0.2)), allowance.clone()],
            Some("models[0].hedge.after_quantile: must be between 0.5 and 0.999"),
        ),
        (2, vec![("after_ms", Integer(800)), allowance], None),
    ];
    for (deployments, hedge, expected) in cases {
        let found = problems(deployments, &hedge);
        match expected {
            Some(expected) => assert!(
                found.as_deref().is_some_and(|f| f.contains(expected)),
                "{hedge:?}: {found:?}"
            ),
            None => assert_eq!(found, None, "{hedge:?}"),
        }
    }
}

#[tokio::test]
async fn concurrent_hedged_requests_never_overrun_a_budget() {
    let first = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let second = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(50))
        .answers_of(50)
        .start()
        .await;
    let budget = 0.005;
    // An allowance that pays for a hedge's worst case, $0.000573.
    let config = two(&first, &second, 0.000_6).key(
        Key::new("team")
            .set("budget_daily_usd", budget)
            .models(&["chat"]),
    );
    let gateway = support::gateway::start(&config).await;
    let requests = (0..40).map(|_| gateway.chat_as("team-secret", hi(50)));
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served > 0 && statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    gateway
        .eventually_metric(
            "tollgate_requests_total",
            &[
                ("api", "chat"),
                ("alias", "chat"),
                ("backend", "second"),
                ("status", "200"),
            ],
            served as f64,
        )
        .await;
    let spent = gateway.spend("").await["total"]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!(spent <= budget, "spent {spent} of {budget}");
    let text = gateway.metrics().await;
    let cancelled = metric(
        &text,
        "tollgate_cost_usd_total",
        &[
            ("alias", "chat"),
            ("deployment", "chat/first"),
            ("key", "team"),
        ],
    );
    assert!(
        cancelled.is_some_and(|c| c > 0.0),
        "the cancelled first attempts are charged"
    );
}

#[tokio::test]
async fn a_client_that_leaves_with_both_in_flight_is_charged_both_prompts() {
    let first = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let second = MockUpstream::openai().first_byte_after(SLOW).start().await;
    let gateway = support::gateway::start(&two(&first, &second, 0.01)).await;
    let gone = gateway
        .post("/v1/chat/completions")
        .json(&hi(50))
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up");
    assert!(first.wait_peer_closed(1, Duration::from_secs(2)).await);
    assert!(second.wait_peer_closed(1, Duration::from_secs(2)).await);
    gateway
        .eventually_metric(
            "tollgate_requests_total",
            &[
                ("api", "chat"),
                ("alias", "chat"),
                ("backend", "first"),
                ("status", "499"),
            ],
            1.0,
        )
        .await;
    let text = gateway.metrics().await;
    for deployment in ["chat/first", "chat/second"] {
        assert!(
            cost(&text, deployment).is_some_and(|c| c > 0.0),
            "{deployment}: {text}"
        );
    }
}
