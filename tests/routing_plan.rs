//! Routing decisions without any network: a snapshot built from a config,
//! its live state set by hand, and the plan `tollgate::routing::plan` (or
//! `tollgate::pipeline::admit::explain`) makes for a request. Here: the policy
//! filters and the refusal when they leave nothing, health (open circuits,
//! 429 cooldowns), and how explain finds the request's region. The
//! strategies are in `routing_strategies.rs`.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::{Config, Deployment, Key, Model};
use support::gateway::{candidate, reason, user};
use support::plan::*;
use tollgate::pipeline::admit::explain;
use tollgate::routing::{self, PlanStatus, RequestFacts};

/// Alias `chat` on `in-us` (backend `us-pool`, in us-east-1), then `in-eu`
/// (backend `eu-pool`, in eu-west-1).
fn two_regions() -> Config {
    Config::new()
        .backend(sim("eu-pool", "eu-west-1"))
        .backend(sim("us-pool", "us-east-1"))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("in-us", "us-pool"))
                .deployment(Deployment::named("in-eu", "eu-pool")),
        )
}

// ---- policy filters ---------------------------------------------------------

#[test]
fn residency_keeps_only_backends_in_the_regions_a_request_region_may_use() {
    let s = snapshot(&two_regions().residency("eu", &["eu-west-1"]));

    let eu = explained(&s, "chat", user("hi"), Some("eu"));
    assert_eq!(eu["status"], 200);
    assert_eq!(eu["chosen"], "in-eu");
    assert_eq!(kept(&eu), ["in-eu"]);
    assert_eq!(
        reason(&eu, "in-us"),
        "policy residency: backend region \"us-east-1\" may not serve requests from \"eu\""
    );
    assert_eq!(candidate(&eu, "in-us")["backend"], "us-pool");

    for region in [Some("us"), None] {
        let other = explained(&s, "chat", user("hi"), region);
        assert_eq!(
            kept(&other),
            ["in-us", "in-eu"],
            "{region:?}: no residency rule, no limit"
        );
    }
}

#[test]
fn multimodal_llama_never_serves_the_eu_even_text_only_while_text_llama_does() {
    let base = Config::new().backend(sim("pool", "eu-west-1")).model(
        Model::new("chat")
            .deployment(
                Deployment::named("llama-vision", "pool")
                    .set("licence", "llama")
                    .multimodal(&["text", "image"]),
            )
            .deployment(Deployment::named("llama-text", "pool").set("licence", "llama"))
            .deployment(Deployment::named("other-vision", "pool").multimodal(&["text", "image"])),
    );
    let s = snapshot(&base.clone().set("policy", "eu_regions", vec!["eu", "de"]));

    for region in ["eu", "de"] {
        let text = explained(&s, "chat", user("hi"), Some(region));
        assert_eq!(kept(&text), ["llama-text", "other-vision"], "{region}");
        assert_eq!(
            reason(&text, "llama-vision"),
            format!(
                "policy llama_eu_multimodal: multimodal Llama model; its licence excludes users in the EU (\"{region}\")"
            )
        );
        let with_image = explained(&s, "chat", image("what is this?"), Some(region));
        assert_eq!(kept(&with_image), ["other-vision"], "{region}");
    }
    let us = explained(&s, "chat", image("what is this?"), Some("us"));
    assert_eq!(
        kept(&us),
        ["llama-vision", "other-vision"],
        "outside the EU it serves"
    );

    let default_on = snapshot(&base);
    let eu = explained(&default_on, "chat", user("hi"), Some("eu"));
    assert_eq!(
        candidate(&eu, "llama-vision")["kept"],
        false,
        "on by default, with \"eu\" the default EU region"
    );
    let off = snapshot(&base.set("policy", "llama_eu_multimodal_block", false));
    let eu = explained(&off, "chat", image("what is this?"), Some("eu"));
    assert_eq!(kept(&eu), ["llama-vision", "other-vision"]);
}

#[test]
fn media_context_window_and_tools_each_filter_the_deployments_that_cannot_serve() {
    let config = Config::new().backend(sim("pool", "us")).model(
        Model::new("chat")
            .deployment(Deployment::named("small-text", "pool").set("context_window", 1000))
            .deployment(Deployment::named("vision", "pool").multimodal(&["text", "image"]))
            .deployment(Deployment::named("audio", "pool").multimodal(&["text", "audio"]))
            .deployment(Deployment::named("tools", "pool").set("tools", true)),
    );
    let s = snapshot(&config);

    let pic = explained(&s, "chat", image("what is this?"), None);
    assert_eq!(kept(&pic), ["vision"]);
    assert_eq!(
        reason(&pic, "small-text"),
        "policy modality: does not accept image input"
    );
    assert_eq!(
        reason(&pic, "audio"),
        "policy modality: does not accept image input"
    );

    let sound = json!([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]}]);
    assert_eq!(kept(&explained(&s, "chat", sound, None)), ["audio"]);
    // vLLM's own forms of the same media.
    for (part, only) in [
        (
            json!({"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}}),
            "audio",
        ),
        (
            json!({"type": "image_embeds", "image_embeds": "AAAA"}),
            "vision",
        ),
    ] {
        let media = json!([{"role": "user", "content": [part]}]);
        assert_eq!(kept(&explained(&s, "chat", media, None)), [only]);
    }

    // One message of 2000 characters is 4 + 500 tokens; with 600 to write,
    // 1104 do not fit in 1000.
    let long = json!({"model": "chat", "messages": user(&"x".repeat(2000)), "max_tokens": 600});
    let plan = explained_request(&s, long, None);
    assert_eq!(kept(&plan), ["vision", "audio", "tools"]);
    assert_eq!(
        reason(&plan, "small-text"),
        "policy context_window: about 1104 tokens exceed its context window of 1000"
    );
    let newer =
        json!({"model": "chat", "messages": user(&"x".repeat(2000)), "max_completion_tokens": 600});
    assert_eq!(
        kept(&explained_request(&s, newer, None)),
        ["vision", "audio", "tools"],
        "max_completion_tokens counts as max_tokens does"
    );
    let fits = json!({"model": "chat", "messages": user(&"x".repeat(2000)), "max_tokens": 496});
    assert_eq!(
        kept(&explained_request(&s, fits, None)).len(),
        4,
        "exactly 1000 fits"
    );

    let with_tools = json!({"model": "chat", "messages": user("weather?"), "tools": [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
    ]});
    let plan = explained_request(&s, with_tools, None);
    assert_eq!(kept(&plan), ["tools"]);
    assert_eq!(
        reason(&plan, "vision"),
        "policy tools: does not support tools"
    );
    let empty_tools = json!({"model": "chat", "messages": user("hi"), "tools": []});
    assert_eq!(kept(&explained_request(&s, empty_tools, None)).len(), 4);
}

#[test]
fn when_policy_leaves_nothing_the_refusal_names_the_rule_and_a_remedy() {
    let only = |alias: &str, deployment: Deployment| Model::new(alias).deployment(deployment);
    let config = Config::new()
        .backend(sim("pool", "eu-west-1"))
        .model(only(
            "llama-vision",
            Deployment::named("lv", "pool")
                .set("licence", "llama")
                .multimodal(&["text", "image"]),
        ))
        .model(only("text", Deployment::named("t", "pool")))
        .model(only(
            "other-vision",
            Deployment::named("ov", "pool").multimodal(&["text", "image"]),
        ))
        .key(Key::hashed("all", &"a".repeat(64)))
        .key(Key::hashed("llama-only", &"b".repeat(64)).models(&["llama-vision", "text"]));
    let s = snapshot(&config);
    let refuse = |alias: &str, facts: &RequestFacts, key: Option<&str>| {
        let model = s.model_index(alias).unwrap();
        let plan = plan_at(&s, model, facts, Instant::now());
        assert_eq!(plan.status, PlanStatus::Blocked, "{alias}");
        assert_eq!(plan.http_status(), 451);
        let error = routing::refusal(&s, &plan, facts, key.and_then(|k| s.key_named(k)));
        assert_eq!(error.status().as_u16(), 451);
        assert_eq!(error.code(), Some("policy_blocked"));
        error.message().to_owned()
    };
    let eu_text = RequestFacts {
        region: Some("eu".into()),
        ..text_facts(5, 10)
    };
    let message = refuse("llama-vision", &eu_text, Some("all"));
    assert_eq!(
        message,
        "model \"llama-vision\" cannot serve this request: the Llama licence does not allow \
         multimodal Llama models to serve users in the EU, even for text-only requests. \
         To be served, use a model that can serve it: text, other-vision."
    );
    let message = refuse("llama-vision", &eu_text, Some("llama-only"));
    assert!(
        message.ends_with("To be served, use a model that can serve it: text."),
        "only aliases the key may use: {message}"
    );

    let us_image = RequestFacts {
        region: Some("us".into()),
        image: true,
        ..text_facts(800, 10)
    };
    let message = refuse("text", &us_image, None);
    assert!(
        message.contains("no deployment accepts image input"),
        "{message}"
    );
    assert!(
        message.ends_with(
            "To be served, use a model that can serve it: llama-vision, other-vision, or send text only."
        ),
        "{message}"
    );

    let huge = text_facts(100_000, 10);
    let message = refuse("text", &huge, None);
    assert_eq!(
        message,
        "model \"text\" cannot serve this request: about 100000 input tokens plus 10 requested \
         output tokens do not fit any deployment's context window. \
         No other model this key may use can serve it either."
    );
}

// ---- health ---------------------------------------------------------------------

#[test]
fn open_circuits_and_rate_limit_cooldowns_drop_deployments_until_they_pass() {
    let config = Config::new()
        .backend(sim("a", "us"))
        .backend(sim("b", "us"))
        .backend(sim("c", "eu"))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("flaky", "a"))
                .deployment(Deployment::named("limited", "b"))
                .deployment(Deployment::named("elsewhere", "c")),
        )
        .set("routing", "circuit_failures", 2)
        .set("routing", "circuit_cooldown_ms", 2500)
        .residency("us", &["us"]);
    let s = snapshot(&config);
    let (flaky, limited) = (&s.resolved(0, 0).health, &s.resolved(0, 1).health);
    let now = Instant::now();
    let facts = RequestFacts {
        region: Some("us".into()),
        ..text_facts(5, 10)
    };

    flaky.circuit.on_failure(false, now, &s.config.routing);
    assert_eq!(
        order(&s, &plan_at(&s, 0, &facts, now)),
        ["flaky", "limited"],
        "one failure"
    );
    flaky.circuit.on_failure(false, now, &s.config.routing);
    limited.cool_down(now + Duration::from_millis(1500));
    let plan = plan_at(&s, 0, &facts, now);
    assert_eq!(
        plan.status,
        PlanStatus::Unavailable,
        "health, not policy, left none"
    );
    assert_eq!(plan.http_status(), 503);
    assert_eq!(
        plan.retry_after(),
        Duration::from_millis(1500),
        "the soonest back"
    );
    let explained = explain_json(&s, &plan);
    assert_eq!(explained["chosen"], Value::Null);
    assert_eq!(
        reason(&explained, "flaky"),
        "circuit open after 2 consecutive failures; probe in 2500 ms"
    );
    assert_eq!(
        reason(&explained, "limited"),
        "rate limited upstream: cooling down for 1500 ms more (retry-after)"
    );
    assert!(reason(&explained, "elsewhere").starts_with("policy residency"));
    let error = routing::refusal(&s, &plan, &facts, None);
    assert_eq!(error.status().as_u16(), 503);
    assert_eq!(error.code(), Some("no_deployment_available"));
    assert_eq!(error.wait(), Some(Duration::from_millis(1500)));

    let later = now + Duration::from_millis(1500);
    assert_eq!(
        order(&s, &plan_at(&s, 0, &facts, later)),
        ["limited"],
        "cooled down"
    );
    let later = now + Duration::from_millis(2500);
    assert_eq!(
        order(&s, &plan_at(&s, 0, &facts, later)),
        ["flaky", "limited"],
        "half-open: the probe may go"
    );
    assert_eq!(flaky.circuit.admit(later), Some(true), "the probe");
    let plan = plan_at(&s, 0, &facts, later);
    assert_eq!(order(&s, &plan), ["limited"]);
    assert_eq!(
        plan.candidates[1].reason.to_string(),
        "circuit half-open: its probe request is in flight"
    );
}

#[test]
fn a_plan_whose_every_allowed_deployment_is_rate_limited_is_a_429_and_any_other_health_a_503() {
    let config = Config::new()
        .backend(sim("a", "us"))
        .backend(sim("b", "us"))
        .backend(sim("c", "eu"))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("cooling", "a"))
                .deployment(Deployment::named("full", "b").set("rpm", 1))
                .deployment(Deployment::named("elsewhere", "c")),
        )
        .model(
            Model::new("small")
                .deployment(Deployment::named("cooling-too", "a"))
                .deployment(Deployment::named("tiny", "b").set("tpm", 4)),
        )
        .residency("us", &["us"]);
    let s = snapshot(&config);
    let now = Instant::now();
    let facts = RequestFacts {
        region: Some("us".into()),
        ..text_facts(5, 10)
    };
    let (cooling, full) = (&s.resolved(0, 0).health, &s.resolved(0, 1).health);
    cooling.cool_down(now + Duration::from_millis(1500));
    assert!(full.quota.admit(5, now).is_ok(), "its one request");

    // One cools after a 429, one is at its quota, one policy drops.
    let plan = plan_at(&s, 0, &facts, now);
    assert_eq!(plan.status, PlanStatus::RateLimited);
    assert_eq!(plan.http_status(), 429);
    let error = routing::refusal(&s, &plan, &facts, None);
    assert_eq!(error.status().as_u16(), 429);
    assert_eq!(error.code(), Some("rate_limit_exceeded"));
    assert_eq!(error.wait(), Some(Duration::from_millis(1500)));
    assert!(
        error
            .message()
            .starts_with("every deployment of model \"chat\" is rate limited right now"),
        "{}",
        error.message()
    );

    // A deployment whose quota can never hold the request is not held
    // back by a rate: waiting does not help, so the plan is a 503.
    s.resolved(1, 0)
        .health
        .cool_down(now + Duration::from_millis(1500));
    let plan = plan_at(&s, 1, &facts, now);
    assert_eq!(plan.status, PlanStatus::Unavailable);
    assert_eq!(plan.http_status(), 503);
    let error = routing::refusal(&s, &plan, &facts, None);
    assert_eq!(error.code(), Some("no_deployment_available"));
}

// ---- explain --------------------------------------------------------------------

#[test]
fn explain_takes_the_region_from_the_request_then_the_key_then_the_policy_default_as_the_gateway_does()
 {
    let config = two_regions()
        .key(Key::hashed("eu-team", &"c".repeat(64)).set("region", "eu"))
        .set("policy", "default_region", "us")
        .residency("eu", &["eu-west-1"])
        .residency("us", &["us-east-1"]);
    let s = snapshot(&config);
    let chosen = |region: Option<&str>, key: Option<&str>| {
        let plan = explain(
            &s,
            &ask(
                json!({"model": "chat", "messages": user("hi")}),
                region,
                key,
            ),
        )
        .expect("explainable");
        plan.chosen.expect("one chosen")
    };
    assert_eq!(chosen(None, None), "in-us", "the policy's default region");
    assert_eq!(chosen(None, Some("eu-team")), "in-eu", "the key's region");
    let refused = explain(
        &s,
        &ask(
            json!({"model": "chat", "messages": user("hi")}),
            Some("us"),
            Some("eu-team"),
        ),
    )
    .expect_err("a key fixed to a region may not ask for another");
    assert_eq!(refused.status(), 403);
    assert_eq!(chosen(Some("eu"), None), "in-eu");

    let completion = explain(
        &s,
        &ask(json!({"model": "chat", "prompt": "Once"}), None, None),
    )
    .expect("a completions request is explained too");
    assert_eq!(completion.model, "chat");
    for (request, key, expected) in [
        (json!({"model": "chat"}), None, "must be a chat request"),
        (
            json!({"model": "nope", "messages": user("hi")}),
            None,
            "nope",
        ),
        (
            json!({"model": "chat", "messages": user("hi")}),
            Some("ghost"),
            "no key named \"ghost\"",
        ),
    ] {
        let error = explain(&s, &ask(request, None, key)).expect_err("refused");
        assert!(error.message().contains(expected), "{}", error.message());
    }
}
