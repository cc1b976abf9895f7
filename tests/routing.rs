//! Routing through the gateway over HTTP, against mock upstreams on
//! 127.0.0.1: the request's region, policy refusals, each strategy's
//! choice with real traffic, spillover driven by the load a vLLM or TGI
//! engine reports on `/metrics`, stale engine signals, and explain (the
//! admin endpoint and the `tollgate explain` command).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::gateway::*;
use support::mock::{MockServer, MockUpstream};

/// A vLLM `/metrics` page with this queue, batch and KV-cache use.
fn vllm_page(waiting: u32, running: u32, kv_cache: f64) -> String {
    format!(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {running}.0\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} {kv_cache}\n"
    )
}

/// A TGI `/metrics` page with this queue and batch.
fn tgi_page(queue: u32, batch: u32) -> String {
    format!(
        "# TYPE tgi_queue_size gauge\ntgi_queue_size {queue}\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size {batch}\n"
    )
}

/// `gpu_hour_usd` and friends of a self-hosted pool at $1/Mtok flat out.
const POOL: &str = "gpu_hour_usd = 3.6\ngpus = 1\nthroughput_tokens_per_second = 1000\n";

fn hi(alias: &str) -> Value {
    json!({"model": alias, "messages": user("hi")})
}

fn ask(alias: &str) -> Value {
    json!({"request": hi(alias)})
}

/// Sends a request that must succeed; returns the backend that served it.
async fn served(gateway: &Gateway, request: Value) -> String {
    let response = gateway.chat(request).await;
    assert_eq!(response.status(), 200);
    let (backend, _) = served_by(&response);
    backend
}

// ---- the request's region ------------------------------------------------------

fn two_region_config(eu: &MockServer, us: &MockServer) -> String {
    backend_toml("eu", "openai", &url(eu), "region = \"eu-west-1\"")
        + &backend_toml("us", "openai", &url(us), "region = \"us-east-1\"")
        + &model_toml("chat", "", &[("in-us", "us", ""), ("in-eu", "eu", "")])
        + "\n[policy]\ndefault_region = \"us\"\n\
           [[policy.residency]]\nrequest_region = \"eu\"\nbackend_regions = [\"eu-west-1\"]\n\
           [[policy.residency]]\nrequest_region = \"us\"\nbackend_regions = [\"us-east-1\"]\n"
}

#[tokio::test]
async fn the_region_comes_from_the_key_or_from_the_header_where_the_key_allows_it() {
    let (eu, us) = (
        MockUpstream::openai().start().await,
        MockUpstream::openai().start().await,
    );
    let keys = r#"
[[keys]]
name = "eu-team"
key_env = "KEY_EU_TEAM"
models = ["*"]
region = "eu"

[[keys]]
name = "roaming"
key_env = "KEY_ROAMING"
models = ["*"]
region = "us"
region_header = true

[[keys]]
name = "plain"
key_env = "KEY_PLAIN"
models = ["*"]
"#;
    let gateway = start(&(two_region_config(&eu, &us) + keys)).await;
    let send = |key: &'static str, region: Option<&'static str>| {
        let mut request = gateway
            .post("/v1/chat/completions")
            .bearer_auth(format!("{key}-secret"))
            .json(&hi("chat"));
        if let Some(region) = region {
            request = request.header("x-tollgate-region", region);
        }
        request.send()
    };
    let backend = |response: reqwest::Response| {
        assert_eq!(response.status(), 200);
        served_by(&response).0
    };

    assert_eq!(backend(send("eu-team", None).await.unwrap()), "eu");
    assert_eq!(
        backend(send("eu-team", Some("eu")).await.unwrap()),
        "eu",
        "its own region"
    );
    let response = send("eu-team", Some("us")).await.unwrap();
    assert_eq!(response.status(), 403);
    let error = error_of(response).await;
    assert_eq!(error["code"], "region_not_allowed");
    assert!(
        message(&error).contains("key \"eu-team\" serves region \"eu\""),
        "{error}"
    );

    assert_eq!(backend(send("roaming", None).await.unwrap()), "us");
    assert_eq!(backend(send("roaming", Some("eu")).await.unwrap()), "eu");

    assert_eq!(
        backend(send("plain", None).await.unwrap()),
        "us",
        "policy.default_region"
    );
    let response = send("plain", Some("eu")).await.unwrap();
    assert_eq!(response.status(), 403);
    let error = error_of(response).await;
    assert_eq!(error["code"], "region_not_allowed");
    assert!(message(&error).contains("region_header = true"), "{error}");

    let response = send("roaming", Some("eu west")).await.unwrap();
    assert_eq!(response.status(), 400, "not a region name");
    assert!(message(&error_of(response).await).contains("x-tollgate-region"));
    assert_eq!((eu.hits(), us.hits()), (3, 2));
}

#[tokio::test]
async fn without_keys_the_region_header_is_honoured() {
    let (eu, us) = (
        MockUpstream::openai().start().await,
        MockUpstream::openai().start().await,
    );
    let gateway = start(&two_region_config(&eu, &us)).await;
    let response = gateway
        .post("/v1/chat/completions")
        .header("x-tollgate-region", "eu")
        .json(&hi("chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response).0, "eu");
    assert_eq!(served(&gateway, hi("chat")).await, "us");
    assert_eq!((eu.hits(), us.hits()), (1, 1));
}

// ---- policy refusals -----------------------------------------------------------------

#[tokio::test]
async fn a_request_no_deployment_may_serve_gets_451_naming_the_rule_and_a_remedy() {
    let upstream = MockUpstream::openai().start().await;
    let llama_vision = "licence = \"llama\"\nmultimodal = true\nmodalities = [\"text\", \"image\"]";
    let config = backend_toml("pool", "openai", &url(&upstream), "region = \"eu-west-1\"")
        + &model_toml("llama-vision", "", &[("lv", "pool", llama_vision)])
        + &model_toml("llama-text", "", &[("lt", "pool", "licence = \"llama\"")]);
    let gateway = start(&config).await;
    let in_eu = |body: Value| {
        gateway
            .post("/v1/chat/completions")
            .header("x-tollgate-region", "eu")
            .json(&body)
            .send()
    };

    let response = in_eu(hi("llama-vision")).await.unwrap();
    assert_eq!(response.status(), 451);
    assert!(response.headers().get("x-tollgate-backend").is_none());
    assert_eq!(
        response.headers()["x-tollgate-attempts"],
        "0",
        "a refusal says no backend was tried"
    );
    let error = error_of(response).await;
    assert_eq!(error["code"], "policy_blocked");
    assert_eq!(error["type"], "invalid_request_error");
    assert!(
        message(&error).contains("the Llama licence does not allow multimodal Llama models"),
        "{error}"
    );
    assert!(
        message(&error).ends_with("To be served, use a model that can serve it: llama-text."),
        "{error}"
    );

    let picture = json!({"model": "llama-text", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
    ]}]});
    let response = in_eu(picture).await.unwrap();
    assert_eq!(response.status(), 451);
    let error = error_of(response).await;
    assert!(
        message(&error).contains("no deployment accepts image input"),
        "{error}"
    );
    assert!(message(&error).ends_with("send text only."), "{error}");

    assert_eq!(
        served(&gateway, hi("llama-vision")).await,
        "pool",
        "outside the EU"
    );
    assert_eq!(upstream.hits(), 1, "nothing refused reached the upstream");
}

// ---- strategies with real traffic ----------------------------------------------------

#[tokio::test]
async fn cost_uses_an_idle_self_hosted_vllm_until_its_metrics_show_a_queue() {
    let gpu = MockUpstream::openai().start().await;
    let api = MockUpstream::openai().start().await;
    // vLLM is scraped at the root of its base URL, beside /v1.
    let config = backend_toml(
        "gpu",
        "vllm",
        &url(&gpu),
        &format!("{POOL}max_concurrency = 8\n[backends.engine_metrics]\ninterval_ms = 100"),
    ) + &backend_toml("api", "openai", &url(&api), "")
        + &model_toml(
            "chat",
            "strategy = \"cost\"",
            &[
                (
                    "per-token",
                    "api",
                    "input_usd_per_mtok = 0.5\noutput_usd_per_mtok = 0.5",
                ),
                ("self-hosted", "gpu", ""),
            ],
        )
        + ADMIN;
    let gateway = start(&config).await;
    scraped(&gpu, 1).await;
    assert_eq!(
        served(&gateway, hi("chat")).await,
        "gpu",
        "idle GPUs are free"
    );

    gpu.set_metrics(vllm_page(3, 8, 0.9));
    let explained = gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "per-token")
        .await;
    assert!(
        reason(&explained, "self-hosted").contains("self-hosted at 100% load"),
        "{explained:#}"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "api");

    gpu.set_metrics(vllm_page(0, 1, 0.05));
    gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "self-hosted")
        .await;
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");
    assert_eq!((gpu.hits(), api.hits()), (2, 1));
}

#[tokio::test]
async fn latency_measures_every_deployment_then_sends_each_kind_of_request_to_the_fastest() {
    let slow = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(200))
        .start()
        .await;
    let fast = MockUpstream::openai().start().await;
    let config = backend_toml("slow", "openai", &url(&slow), "")
        + &backend_toml("fast", "openai", &url(&fast), "")
        + &model_toml(
            "chat",
            "strategy = \"latency\"",
            &[("slow", "slow", ""), ("fast", "fast", "")],
        )
        + "\n[routing]\nexploration = 0.0\n";
    let gateway = start(&config).await;

    let mut whole = Vec::new();
    for _ in 0..4 {
        whole.push(served(&gateway, hi("chat")).await);
    }
    assert_eq!(
        whole,
        ["slow", "fast", "fast", "fast"],
        "both measured, then the fastest"
    );
    let stream = json!({"model": "chat", "stream": true, "messages": user("hi")});
    let mut streamed = Vec::new();
    for _ in 0..3 {
        let (head, events) = gateway.stream("/v1/chat/completions", stream.clone()).await;
        streamed.push(head["x-tollgate-backend"].to_str().unwrap().to_owned());
        events.rest().await;
    }
    assert_eq!(
        streamed,
        ["slow", "fast", "fast"],
        "time to first token is measured on its own"
    );
    assert_eq!((slow.hits(), fast.hits()), (2, 5));
}

#[tokio::test]
async fn weighted_spreads_traffic_in_proportion_to_the_weights() {
    let heavy = MockUpstream::openai().record(false).start().await;
    let light = MockUpstream::openai().record(false).start().await;
    let config = backend_toml("heavy", "openai", &url(&heavy), "")
        + &backend_toml("light", "openai", &url(&light), "")
        + &model_toml(
            "chat",
            "strategy = \"weighted\"",
            &[
                ("heavy", "heavy", "weight = 3"),
                ("light", "light", "weight = 1"),
            ],
        );
    let gateway = start(&config).await;
    for _ in 0..200 {
        served(&gateway, hi("chat")).await;
    }
    // 150 expected, a standard deviation of about 6.
    assert!((120..=180).contains(&heavy.hits()), "{}", heavy.hits());
    assert_eq!(heavy.hits() + light.hits(), 200);
}

// ---- spillover on engine load ----------------------------------------------------------

fn spillover_config(engine: &str, overflow: &MockServer) -> String {
    engine.to_owned()
        + &backend_toml("api", "openai", &url(overflow), "")
        + &model_toml(
            "chat",
            "strategy = \"spillover\"\n[models.spillover]\nhigh_load = 0.8\nlow_load = 0.5",
            &[
                (
                    "overflow",
                    "api",
                    "input_usd_per_mtok = 0.2\noutput_usd_per_mtok = 0.2",
                ),
                ("self-hosted", "gpu", ""),
            ],
        )
        + ADMIN
}

#[tokio::test]
async fn spillover_overflows_when_vllm_reports_load_and_returns_only_below_low_load() {
    let gpu = MockUpstream::openai().start().await;
    let api = MockUpstream::openai().start().await;
    let engine = backend_toml(
        "gpu",
        "vllm",
        &url(&gpu),
        &format!("{POOL}max_concurrency = 10\n[backends.engine_metrics]\ninterval_ms = 100"),
    );
    let gateway = start(&spillover_config(&engine, &api)).await;
    scraped(&gpu, 1).await;
    assert_eq!(
        served(&gateway, hi("chat")).await,
        "gpu",
        "tier 0 first, though dearer"
    );

    gpu.set_metrics(vllm_page(0, 4, 0.85));
    let explained = gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "overflow")
        .await;
    assert_eq!(
        reason(&explained, "self-hosted"),
        "tier 0, load 0.85: saturated, overflow goes on"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "api");

    // Between low_load and high_load: still overflowing (hysteresis).
    gpu.set_metrics(vllm_page(0, 6, 0.3));
    let explained = gateway
        .explain_until(ask("chat"), |e| {
            reason(e, "self-hosted").starts_with("tier 0, load 0.60")
        })
        .await;
    assert_eq!(explained["chosen"], "overflow", "{explained:#}");
    assert_eq!(served(&gateway, hi("chat")).await, "api");

    // vLLM before v0.10 names its KV cache gauge differently.
    gpu.set_metrics(
        "vllm:num_requests_waiting{model_name=\"m\"} 0.0\n\
         vllm:num_requests_running{model_name=\"m\"} 2.0\n\
         vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.4\n",
    );
    let explained = gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "self-hosted")
        .await;
    assert_eq!(
        reason(&explained, "self-hosted"),
        "tier 0, load 0.40: taking traffic"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");
    assert_eq!((gpu.hits(), api.hits()), (2, 2));
}

#[tokio::test]
async fn spillover_reads_a_tgi_queue_from_its_metrics() {
    let tgi = MockUpstream::tgi().start().await;
    tgi.set_metrics(tgi_page(0, 2));
    let api = MockUpstream::openai().start().await;
    // A TGI backend is scraped at its root's /metrics by default.
    let engine = backend_toml(
        "gpu",
        "tgi",
        &tgi.base_url(),
        &format!("{POOL}max_concurrency = 8\n[backends.engine_metrics]\ninterval_ms = 100"),
    );
    let gateway = start(&spillover_config(&engine, &api)).await;
    let explained = gateway
        .explain_until(ask("chat"), |e| {
            reason(e, "self-hosted").starts_with("tier 0, load 0.25")
        })
        .await;
    assert_eq!(explained["chosen"], "self-hosted");
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");

    tgi.set_metrics(tgi_page(1, 2));
    let explained = gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "overflow")
        .await;
    assert!(
        reason(&explained, "self-hosted").contains("load 1.00: saturated"),
        "a queue means full: {explained:#}"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "api");

    tgi.set_metrics(tgi_page(0, 3));
    gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "self-hosted")
        .await;
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");
}

#[tokio::test]
async fn spillover_counts_requests_in_flight_against_max_concurrency() {
    // Streams that stay open until released: two of them fill the pool.
    let gpu = MockUpstream::openai().hold_after(1).start().await;
    let api = MockUpstream::openai().start().await;
    let engine = backend_toml(
        "gpu",
        "openai",
        &url(&gpu),
        &format!("{POOL}max_concurrency = 2"),
    );
    let gateway = start(&spillover_config(&engine, &api)).await;
    let stream = json!({"model": "chat", "stream": true, "messages": user("hi")});
    let mut open = Vec::new();
    for _ in 0..2 {
        let (head, mut events) = gateway.stream("/v1/chat/completions", stream.clone()).await;
        assert_eq!(head["x-tollgate-backend"], "gpu");
        assert!(events.next().await.is_some(), "the first event arrives");
        open.push(events);
    }
    let explained = gateway.explain(ask("chat")).await;
    assert_eq!(
        reason(&explained, "self-hosted"),
        "tier 0, load 1.00: saturated, overflow goes on"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "api");

    gpu.release();
    for events in open {
        assert_eq!(
            events.rest().await.last().map(String::as_str),
            Some("[DONE]")
        );
    }
    gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "self-hosted")
        .await;
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");
    assert_eq!((gpu.hits(), api.hits()), (3, 1));
}

#[tokio::test]
async fn a_failed_scrape_makes_engine_signals_stale_and_leaves_the_backend_in_service() {
    let gpu = MockUpstream::openai().start().await;
    gpu.set_metrics(vllm_page(4, 16, 1.0));
    let api = MockUpstream::openai().start().await;
    // No max_concurrency: without the engine's signals, load is unknown.
    let engine = backend_toml(
        "gpu",
        "vllm",
        &url(&gpu),
        &format!("{POOL}[backends.engine_metrics]\ninterval_ms = 100"),
    );
    let gateway = start(&spillover_config(&engine, &api)).await;
    gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "overflow")
        .await;

    let before = gpu.scrapes();
    gpu.set_metrics("# an engine that lost its gauges\nprocess_cpu_seconds_total 1\n");
    let explained = gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "self-hosted")
        .await;
    assert_eq!(
        reason(&explained, "self-hosted"),
        "tier 0, load unknown: taking traffic"
    );
    assert!(
        gpu.scrapes() >= before + 2,
        "stale only after intervals of failed scrapes"
    );
    assert_eq!(served(&gateway, hi("chat")).await, "gpu");
}

// ---- explain -----------------------------------------------------------------------------

#[tokio::test]
async fn admin_explain_exists_only_with_a_token_and_refuses_a_wrong_one() {
    let upstream = MockUpstream::openai().start().await;
    let config = backend_toml("api", "openai", &url(&upstream), "")
        + &model_toml("chat", "", &[("d", "api", "")]);
    let without = start(&config).await;
    let response = without
        .post("/admin/explain")
        .bearer_auth(ADMIN_TOKEN)
        .json(&ask("chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "no token configured: no admin API");

    let gateway = start(&(config + ADMIN)).await;
    for token in [None, Some("not-the-token")] {
        let mut request = gateway.post("/admin/explain").json(&ask("chat"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        error_of(response).await;
    }
    let response = gateway
        .post("/admin/explain")
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"question": "?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(message(&error_of(response).await).contains("{\"request\""));

    let explained = gateway.explain(ask("chat")).await;
    assert_eq!(
        explained,
        json!({"model": "chat", "strategy": "cost", "status": 200, "chosen": "d", "candidates": [
            {"deployment": "d", "backend": "api", "kept": true, "score": 0.0,
             "reason": "expected $0.000000 (5 input + 256 output tokens at list price)"},
        ]})
    );
    assert_eq!(upstream.hits(), 0, "explain sends nothing upstream");
}

#[test]
fn the_explain_command_prints_the_plan_for_a_config_and_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[[backends]]
name = "eu-pool"
kind = "simulated"
region = "eu-west-1"

[[backends]]
name = "us-pool"
kind = "simulated"
region = "us-east-1"

[[models]]
alias = "chat"
[[models.deployments]]
name = "in-us"
backend = "us-pool"
model = "m"
context_window = 8192
[[models.deployments]]
name = "in-eu"
backend = "eu-pool"
model = "m"
context_window = 8192

[policy]
[[policy.residency]]
request_region = "eu"
backend_regions = ["eu-west-1"]
"#;
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let request_path = dir.path().join("request.json");
    std::fs::write(&request_path, hi("chat").to_string()).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("explain")
        .arg("--config")
        .arg(&config_path)
        .arg("--request")
        .arg(&request_path)
        .args(["--region", "eu"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the tollgate binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let explained: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(explained["model"], "chat");
    assert_eq!(explained["strategy"], "cost");
    assert_eq!(explained["status"], 200);
    assert_eq!(explained["chosen"], "in-eu");
    assert_eq!(candidate(&explained, "in-eu")["kept"], true);
    assert_eq!(candidate(&explained, "in-us")["kept"], false);
    assert_eq!(candidate(&explained, "in-us")["backend"], "us-pool");
    assert!(reason(&explained, "in-us").starts_with("policy residency"));
}
