//! Routing through the gateway over HTTP, against mock upstreams on
//! 127.0.0.1: the request's region, policy refusals, each strategy's
//! choice with real traffic, spillover driven by the load a vLLM or TGI
//! engine reports on `/metrics`, stale engine signals, and explain (the
//! admin endpoint and the `tollgate explain` command).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
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

fn two_region_config(eu: &MockServer, us: &MockServer) -> Config {
    Config::new()
        .backend(Backend::new("eu", "openai", &url(eu)).set("region", "eu-west-1"))
        .backend(Backend::new("us", "openai", &url(us)).set("region", "us-east-1"))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("in-us", "us"))
                .deployment(Deployment::named("in-eu", "eu")),
        )
        .set("policy", "default_region", "us")
        .residency("eu", &["eu-west-1"])
        .residency("us", &["us-east-1"])
}

#[tokio::test]
async fn the_region_comes_from_the_key_or_from_the_header_where_the_key_allows_it() {
    let (eu, us) = (
        MockUpstream::openai().start().await,
        MockUpstream::openai().start().await,
    );
    let config = two_region_config(&eu, &us)
        .key(Key::new("eu-team").set("region", "eu"))
        .key(
            Key::new("roaming")
                .set("region", "us")
                .set("region_header", true),
        )
        .key(Key::new("plain"));
    let gateway = start(&config).await;
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
    let config = Config::new()
        .backend(Backend::new("pool", "openai", &url(&upstream)).set("region", "eu-west-1"))
        .model(
            Model::new("llama-vision").deployment(
                Deployment::named("lv", "pool")
                    .set("licence", "llama")
                    .multimodal(&["text", "image"]),
            ),
        )
        .model(
            Model::new("llama-text")
                .deployment(Deployment::named("lt", "pool").set("licence", "llama")),
        );
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

/// Video is a modality of its own: a model that reads images need not
/// read video (Llama 4 does not), so a video goes only to a deployment
/// whose `modalities` name it, whichever form vLLM takes it in.
#[tokio::test]
async fn a_video_goes_only_to_a_deployment_that_accepts_video() {
    let images = MockUpstream::openai().start().await;
    let videos = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("images", "vllm", &url(&images)))
        .backend(Backend::new("videos", "vllm", &url(&videos)))
        .model(
            Model::new("vision")
                .deployment(Deployment::new("images", "llama-4").multimodal(&["text", "image"]))
                .deployment(
                    Deployment::new("videos", "qwen-vl").multimodal(&["text", "image", "video"]),
                ),
        )
        .model(
            Model::new("still")
                .deployment(Deployment::new("images", "llama-4").multimodal(&["text", "image"])),
        )
        .model(Model::new("text").deployment(Deployment::new("images", "llama-3.3")));
    let gateway = start(&config).await;
    let clip = json!({"url": "https://example.invalid/clip.mp4"});
    let asking = |model: &str, part: Value| {
        json!({"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what happens?"}, part]}]})
    };
    // vLLM reads a part with a `uuid` by its media member, whatever its type.
    let forms = [
        json!({"type": "video_url", "video_url": clip}),
        json!({"type": "text", "text": "", "uuid": "clip-1", "video_url": clip}),
    ];
    for part in &forms {
        assert_eq!(
            served(&gateway, asking("vision", part.clone())).await,
            "videos"
        );

        let response = gateway.chat(asking("still", part.clone())).await;
        assert_eq!(response.status(), 451, "{part}");
        let error = error_of(response).await;
        assert!(
            message(&error).contains("no deployment accepts video input"),
            "{error}"
        );
        assert!(message(&error).ends_with("send text only."), "{error}");
    }
    assert_eq!((images.hits(), videos.hits()), (0, forms.len()));

    // An image or audio in a form of vLLM's own is classed as one too.
    for (part, kind) in [
        (
            json!({"type": "input_image", "image_url": "https://example.invalid/a.png"}),
            "image",
        ),
        (
            json!({"type": "audio_embeds", "audio_embeds": "AAAA"}),
            "audio",
        ),
    ] {
        let response = gateway.chat(asking("text", part)).await;
        assert_eq!(response.status(), 451, "{kind}");
        let error = error_of(response).await;
        let refusal = format!("no deployment accepts {kind} input");
        assert!(message(&error).contains(&refusal), "{error}");
    }
    assert_eq!(images.hits(), 0);
}

// ---- strategies with real traffic ----------------------------------------------------

#[tokio::test]
async fn cost_uses_an_idle_self_hosted_vllm_until_its_metrics_show_a_queue() {
    let gpu = MockUpstream::openai().start().await;
    let api = MockUpstream::openai().start().await;
    // vLLM is scraped at the root of its base URL, beside /v1.
    let config = Config::new()
        .backend(
            Backend::new("gpu", "vllm", &url(&gpu))
                .one_dollar_pool()
                .set("max_concurrency", 8)
                .engine_metrics("interval_ms", 100),
        )
        .backend(Backend::new("api", "openai", &url(&api)))
        .model(
            Model::new("chat")
                .strategy("cost")
                .deployment(Deployment::named("per-token", "api").price(0.5, 0.5))
                .deployment(Deployment::named("self-hosted", "gpu")),
        )
        .admin();
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
    let config = Config::new()
        .backend(Backend::new("slow", "openai", &url(&slow)))
        .backend(Backend::new("fast", "openai", &url(&fast)))
        .model(
            Model::new("chat")
                .strategy("latency")
                .deployment(Deployment::named("slow", "slow"))
                .deployment(Deployment::named("fast", "fast")),
        )
        .set("routing", "exploration", 0.0);
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
    let config = Config::new()
        .backend(Backend::new("heavy", "openai", &url(&heavy)))
        .backend(Backend::new("light", "openai", &url(&light)))
        .model(
            Model::new("chat")
                .strategy("weighted")
                .deployment(Deployment::named("heavy", "heavy").set("weight", 3))
                .deployment(Deployment::named("light", "light").set("weight", 1)),
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

/// The self-hosted pool `gpu` at `base_url`, priced at $1/Mtok flat out.
fn self_hosted(kind: &str, base_url: &str) -> Backend {
    Backend::new("gpu", kind, base_url).one_dollar_pool()
}

fn spillover_config(engine: Backend, overflow: &MockServer) -> Config {
    Config::new()
        .backend(engine)
        .backend(Backend::new("api", "openai", &url(overflow)))
        .model(
            Model::new("chat")
                .spillover(0.8, 0.5)
                .deployment(Deployment::named("overflow", "api").price(0.2, 0.2))
                .deployment(Deployment::named("self-hosted", "gpu")),
        )
        .admin()
}

#[tokio::test]
async fn spillover_overflows_when_vllm_reports_load_and_returns_only_below_low_load() {
    let gpu = MockUpstream::openai().start().await;
    let api = MockUpstream::openai().start().await;
    let engine = self_hosted("vllm", &url(&gpu))
        .set("max_concurrency", 10)
        .engine_metrics("interval_ms", 100);
    let gateway = start(&spillover_config(engine, &api)).await;
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
    let engine = self_hosted("tgi", &tgi.base_url())
        .set("max_concurrency", 8)
        .engine_metrics("interval_ms", 100);
    let gateway = start(&spillover_config(engine, &api)).await;
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
    let engine = self_hosted("openai", &url(&gpu)).set("max_concurrency", 2);
    let gateway = start(&spillover_config(engine, &api)).await;
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
    let engine = self_hosted("vllm", &url(&gpu)).engine_metrics("interval_ms", 100);
    let gateway = start(&spillover_config(engine, &api)).await;
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
    let config = Config::new()
        .backend(Backend::new("api", "openai", &url(&upstream)))
        .model(Model::new("chat").deployment(Deployment::named("d", "api")));
    let without = start(&config).await;
    let response = without
        .post("/admin/explain")
        .bearer_auth(ADMIN_TOKEN)
        .json(&ask("chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "no token configured: no admin API");

    let gateway = start(&config.admin()).await;
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
    let config = Config::new()
        .backend(Backend::simulated("eu-pool").set("region", "eu-west-1"))
        .backend(Backend::simulated("us-pool").set("region", "us-east-1"))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("in-us", "us-pool"))
                .deployment(Deployment::named("in-eu", "eu-pool")),
        )
        .residency("eu", &["eu-west-1"]);
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let request_path = dir.path().join("request.json");
    std::fs::write(&request_path, hi("chat").to_string()).unwrap();

    let output = std::process::Command::new(support::process::binary())
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
