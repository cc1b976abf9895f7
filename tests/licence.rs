//! The Llama licence's bookkeeping on a running gateway: distinct end
//! users of `llama` deployments, named by every inbound API or a header,
//! counted once each and only for Llama; `x-built-with: Llama` on whole
//! and streamed answers of every API; `GET /admin/licence` with what each
//! licence served and the EU multimodal refusals; and the same evidence
//! read back from the ledger by `tollgate licence-report`, and the traffic
//! by `tollgate simulate --from-ledger`, after the gateway wrote it.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::*;
use support::process::run_ok;

/// `llama` on a Llama deployment, `qwen` on a Qwen one, `vision` a
/// multimodal Llama; requests come from the EU unless they say otherwise.
fn config(attribution: bool) -> Config {
    let answers = |b: Backend| b.answers(1, 10_000, 4);
    Config::new()
        .backend(answers(Backend::simulated("sim")))
        .model(
            Model::new("llama")
                .deployment(Deployment::new("sim", "llama-3.3-70b").set("licence", "llama")),
        )
        .model(
            Model::new("qwen")
                .deployment(Deployment::new("sim", "qwen-2.5").set("licence", "qwen")),
        )
        .model(
            Model::new("vision").deployment(
                Deployment::new("sim", "llama-4")
                    .set("licence", "llama")
                    .set("multimodal", true)
                    .set("modalities", vec!["text", "image"]),
            ),
        )
        .admin()
        .set("licence", "user_header", "x-end-user")
        .set("licence", "attribution_header", attribution)
        .set("policy", "default_region", "eu")
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A request to `path` that must succeed: its `x-built-with`, if any.
async fn built_with(
    gateway: &Gateway,
    path: &str,
    body: Value,
    header: Option<&str>,
) -> Option<String> {
    let mut post = gateway.post(path).json(&body);
    if let Some(user) = header {
        post = post.header("x-end-user", user);
    }
    let response = post.send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let built = response
        .headers()
        .get("x-built-with")
        .map(|v| v.to_str().unwrap().to_owned());
    response.bytes().await.unwrap();
    built
}

async fn eventually_users(gateway: &Gateway, users: f64) {
    gateway
        .eventually_metric("tollgate_licence_monthly_active_users", &[], users)
        .await;
}

#[tokio::test]
async fn end_users_of_llama_deployments_are_counted_once_each_from_every_api_and_the_header() {
    let gateway = start(&config(false)).await;
    let mut body = chat("llama");
    body["user"] = "alice".into();
    built_with(&gateway, "/v1/chat/completions", body.clone(), None).await;
    // Alice again, streamed: still one user.
    body["stream"] = true.into();
    built_with(&gateway, "/v1/chat/completions", body, None).await;
    built_with(
        &gateway,
        "/v1/messages",
        json!({"model": "llama", "max_tokens": 8, "metadata": {"user_id": "bob"},
               "messages": [{"role": "user", "content": "hi"}]}),
        None,
    )
    .await;
    built_with(
        &gateway,
        "/v1/responses",
        json!({"model": "llama", "input": "hi", "user": "carol"}),
        None,
    )
    .await;
    built_with(
        &gateway,
        "/v1/completions",
        json!({"model": "llama", "prompt": "hi", "max_tokens": 4}),
        Some("dave"),
    )
    .await;
    // The operator's header wins over the body's user.
    let mut named = chat("llama");
    named["user"] = "alice".into();
    built_with(&gateway, "/v1/chat/completions", named, Some("erin")).await;
    // No user named: not counted. Users of a Qwen deployment: not Llama's.
    built_with(&gateway, "/v1/chat/completions", chat("llama"), None).await;
    let mut qwen = chat("qwen");
    qwen["user"] = "frank".into();
    built_with(&gateway, "/v1/chat/completions", qwen, Some("grace")).await;
    eventually_users(&gateway, 5.0).await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, "tollgate_licence_mau_alert_users", &[]),
        Some(560_000_000.0)
    );
}

#[tokio::test]
async fn with_the_header_a_client_cannot_name_itself_in_the_body() {
    // A client behind the operator's proxy names a user in its body on
    // every request, each time another, with the proxy's header beside it:
    // only the header's user counts. The body counts only without the
    // header, or with one left empty.
    let gateway = start(&config(false)).await;
    let send = |body: Value, headers: &'static [&'static str]| {
        let mut post = gateway.post("/v1/chat/completions").json(&body);
        for user in headers {
            post = post.header("x-end-user", *user);
        }
        async move {
            let response = post.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
    };
    let with = |member: &str, user: &str| {
        let mut body = chat("llama");
        body[member] = user.into();
        body
    };
    send(with("user", "alice"), &["erin"]).await;
    send(with("safety_identifier", "bob"), &["erin"]).await;
    // Given twice, as by a proxy that appends to a client's own: the last.
    send(with("user", "carol"), &["mallory", "erin"]).await;
    // The header alone, then the body alone, then an empty header.
    send(chat("llama"), &["erin"]).await;
    send(with("user", "dave"), &[]).await;
    send(with("user", "frank"), &[""]).await;
    // erin, dave and frank; the body first would have made alice, bob,
    // carol, erin, dave and frank, and the first header mallory too.
    eventually_users(&gateway, 3.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        metric(
            &gateway.metrics().await,
            "tollgate_licence_monthly_active_users",
            &[]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_safety_identifier_names_the_end_user_on_chat_and_responses() {
    // OpenAI asks clients to send `safety_identifier` in place of `user`:
    // a client that does is counted, once, and `user` wins when both come.
    let gateway = start(&config(false)).await;
    let mut body = chat("llama");
    body["safety_identifier"] = "alice".into();
    built_with(&gateway, "/v1/chat/completions", body, None).await;
    built_with(
        &gateway,
        "/v1/responses",
        json!({"model": "llama", "input": "hi", "safety_identifier": "alice"}),
        None,
    )
    .await;
    built_with(
        &gateway,
        "/v1/responses",
        json!({"model": "llama", "input": "hi", "safety_identifier": "carol", "user": "dave"}),
        None,
    )
    .await;
    eventually_users(&gateway, 2.0).await;
    // An empty `user` names no one: alone it counts nobody, and the
    // `safety_identifier` beside it counts.
    let mut body = chat("llama");
    body["user"] = "".into();
    built_with(&gateway, "/v1/chat/completions", body.clone(), None).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    eventually_users(&gateway, 2.0).await;
    body["safety_identifier"] = "erin".into();
    built_with(&gateway, "/v1/chat/completions", body, None).await;
    eventually_users(&gateway, 3.0).await;
}

#[tokio::test]
async fn answers_from_llama_say_so_whole_and_streamed_on_every_api_when_asked() {
    let gateway = start(&config(true)).await;
    let stream = |mut body: Value| {
        body["stream"] = true.into();
        body
    };
    let messages =
        json!({"model": "llama", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let responses = json!({"model": "llama", "input": "hi"});
    let completions = json!({"model": "llama", "prompt": "hi", "max_tokens": 4});
    for (path, body) in [
        ("/v1/chat/completions", chat("llama")),
        ("/v1/messages", messages),
        ("/v1/responses", responses),
        ("/v1/completions", completions),
    ] {
        for body in [body.clone(), stream(body)] {
            assert_eq!(
                built_with(&gateway, path, body.clone(), None)
                    .await
                    .as_deref(),
                Some("Llama"),
                "{path} {body}"
            );
        }
    }
    assert_eq!(
        built_with(&gateway, "/v1/chat/completions", chat("qwen"), None).await,
        None
    );
    // Off unless the config asks.
    let quiet = start(&config(false)).await;
    assert_eq!(
        built_with(&quiet, "/v1/chat/completions", chat("llama"), None).await,
        None
    );
}

#[tokio::test]
async fn the_licence_report_shows_the_month_from_the_endpoint_and_from_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let config =
        config(false)
            .set("ledger", "data_dir", data_dir)
            .set("ledger", "flush_interval_ms", 50);
    let gateway = start(&config).await;
    for user in ["u1", "u2", "u3"] {
        let mut body = chat("llama");
        body["user"] = user.into();
        built_with(&gateway, "/v1/chat/completions", body, None).await;
    }
    built_with(&gateway, "/v1/chat/completions", chat("qwen"), None).await;
    // From the EU a multimodal Llama is refused, twice.
    for _ in 0..2 {
        let refused = gateway.chat(chat("vision")).await;
        assert_eq!(refused.status(), 451);
    }
    let month = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", month.year(), u8::from(month.month()));
    // Each request of INPUT prompt and 4 completion tokens (the simulated
    // backend's), at no price.
    let expected = json!({
        "mau_threshold": 700_000_000, "mau_alert_users": 560_000_000,
        "months": [{
            "month": month, "monthly_active_users": 3,
            "served": [
                {"licence": "llama", "requests": 3, "input_tokens": 3 * INPUT, "output_tokens": 12, "cost_usd": 0.0},
                {"licence": "qwen", "requests": 1, "input_tokens": INPUT, "output_tokens": 4, "cost_usd": 0.0}
            ],
            "eu_multimodal_refusals": 2
        }]
    });
    // Requests are metered as they end: wait until all are.
    let deadline = tokio::time::Instant::now() + WAIT;
    let report = loop {
        let report = gateway
            .admin(&format!("/admin/licence?month={month}"))
            .await;
        if report == expected || tokio::time::Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report, expected);
    let bad = gateway
        .get("/admin/licence?month=2026-13", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(bad.status(), 400);
    assert!(message(&error_of(bad).await).contains("write YYYY-MM"));
    assert_eq!(gateway.get("/admin/licence", None).await.status(), 401);

    // The ledger has it too, once the writer's next flush ran.
    let file = dir.path().join("tollgate.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let printed = loop {
        let printed = tollgate(&["licence-report", "--config", file.to_str().unwrap()]);
        if printed == expected || tokio::time::Instant::now() > deadline {
            break printed;
        }
        // The gateway's writer runs on this test's runtime meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(printed, expected);

    // And the traffic of today, for simulate: 3 + 1 requests in one hour
    // of one day is a busiest hour 24 times the mean.
    let simulated = traffic_today(&file);
    let aliases: Vec<Value> = simulated["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            json!([
                a["alias"],
                a["requests_per_day"],
                a["input_tokens"],
                a["output_tokens"],
                a["peak_to_mean"]
            ])
        })
        .collect();
    assert_eq!(
        aliases,
        vec![
            json!(["llama", 3, INPUT, 4, 24.0]),
            json!(["qwen", 1, INPUT, 4, 24.0])
        ]
    );
}

/// The prompt tokens the simulated backend reports for `chat(…)`.
const INPUT: u64 = 5;

/// Runs the binary with `args`; it must succeed and print JSON.
fn tollgate(args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(args)).unwrap()
}

/// What `simulate --from-ledger 1` makes of today's traffic in the
/// ledger of the config in `file`.
fn traffic_today(file: &std::path::Path) -> Value {
    let file = file.to_str().unwrap();
    tollgate(&["simulate", "--config", file, "--from-ledger", "1", "--json"])
}
