//! Session and prefix affinity, and prompt caches in cost: a session stays
//! on one deployment, load stays bounded under a skewed mix of sessions,
//! an unhealthy or saturated deployment's sessions move and come back,
//! prefixes bind to the deployment that served them, the cost strategy
//! counts the bound deployment's expected cache hit, and cached and
//! written prompt tokens are metered at their own prices.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::{candidate, metric, reason};
use support::mock::MockUpstream;
use support::plan::*;
use tollgate::pipeline::admit::{ExplainRequest, explain};
use tollgate::routing::{self, RequestFacts, Session, SessionSource};
use tollgate::state::Snapshot;

/// Alias `chat` (model 0) over four self-hosted pools `gpu0`..`gpu3`, each
/// sized for `capacity` requests at once, with `affinity` and `strategy`.
fn four_pools(strategy: &str, affinity: &str, capacity: u32) -> Config {
    let mut config = Config::new();
    let mut model = Model::new("chat").strategy(strategy).affinity(affinity);
    for i in 0..4 {
        let name = format!("gpu{i}");
        config = config.backend(
            never_called(&name, "vllm")
                .one_dollar_pool()
                .set("max_concurrency", capacity)
                .engine_metrics("enabled", false),
        );
        model = model.deployment(Deployment::named(&name, &name));
    }
    config.model(model)
}

fn session(n: u64) -> Session {
    Session {
        hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        source: SessionSource::Header,
    }
}

fn facts_of(session: Session) -> RequestFacts {
    RequestFacts {
        session: Some(session),
        ..text_facts(500, 100)
    }
}

/// The deployment a plan tries first.
fn first(s: &Snapshot, facts: &RequestFacts) -> String {
    let plan = plan_at(s, 0, facts, Instant::now());
    order(s, &plan).remove(0)
}

/// Holds a request on deployment `name` of model 0, as a lease would.
fn hold(s: &Snapshot, name: &str) {
    let index = s.config.models[0]
        .deployments
        .iter()
        .position(|d| d.name == name)
        .unwrap();
    s.resolved(0, index)
        .health
        .in_flight
        .fetch_add(1, Ordering::Relaxed);
}

#[test]
fn one_session_stays_on_one_deployment_and_sessions_spread_over_all() {
    for strategy in ["cost", "latency", "weighted", "spillover"] {
        let s = snapshot(&four_pools(strategy, "session", 100));
        let mut owners: HashMap<String, u32> = HashMap::new();
        for n in 0..400 {
            let facts = facts_of(session(n));
            let bound = first(&s, &facts);
            for _ in 0..5 {
                assert_eq!(first(&s, &facts), bound, "{strategy}: session {n} moved");
            }
            *owners.entry(bound).or_default() += 1;
        }
        assert_eq!(owners.len(), 4, "{strategy}: {owners:?}");
        assert!(
            owners.values().all(|&n| (70..=130).contains(&n)),
            "{strategy}: {owners:?}"
        );
    }
}

#[test]
fn without_affinity_the_strategy_alone_decides() {
    let s = snapshot(&four_pools("weighted", "none", 100));
    let facts = facts_of(session(7));
    let firsts: std::collections::HashSet<String> = (0..50)
        .map(|seed| {
            let plan = routing::plan(
                &s,
                0,
                &facts,
                Instant::now(),
                &mut fastrand::Rng::with_seed(seed),
            );
            assert!(plan.affinity.is_none());
            order(&s, &plan).remove(0)
        })
        .collect();
    assert!(firsts.len() > 1, "one session spread: {firsts:?}");
}

#[test]
fn load_stays_within_the_bound_under_a_skewed_session_mix() {
    // Held requests are never released, so the load only grows: half of
    // them come from one session, the rest from 50 others.
    let s = snapshot(&four_pools("cost", "session", 10_000));
    let mut rng = fastrand::Rng::with_seed(3);
    let mut heavy_home = None;
    let mut heavy_moved = 0;
    for held in 0..800u64 {
        let n = if rng.bool() { 0 } else { rng.u64(1..=50) };
        let name = first(&s, &facts_of(session(n)));
        if n == 0 {
            let home = heavy_home.get_or_insert_with(|| name.clone());
            heavy_moved += u32::from(*home != name);
        }
        hold(&s, &name);
        let loads: Vec<u64> = (0..4)
            .map(|d| s.resolved(0, d).health.in_flight.load(Ordering::Relaxed))
            .collect();
        // ⌈(1 + 0.25) × total / 4⌉ for the total after this request.
        let cap = (1.25 * (held + 1) as f64 / 4.0).ceil() as u64;
        assert!(
            loads.iter().all(|&l| l <= cap),
            "after {} requests: {loads:?} (cap {cap})",
            held + 1
        );
    }
    assert!(
        heavy_moved > 0,
        "the heavy session overflowed its deployment's bound"
    );
}

#[test]
fn a_session_leaves_an_unhealthy_or_saturated_deployment_and_comes_back() {
    let s = snapshot(&four_pools("latency", "session", 4).set("routing", "circuit_failures", 1));
    let facts = facts_of(session(42));
    let home = first(&s, &facts);
    let index = s.config.models[0]
        .deployments
        .iter()
        .position(|d| d.name == home)
        .unwrap();
    let live = &s.resolved(0, index).health;

    live.circuit
        .open_until(Instant::now() + std::time::Duration::from_secs(60));
    let away = first(&s, &facts);
    assert_ne!(away, home, "an open circuit drops the bound deployment");
    assert_eq!(first(&s, &facts), away, "the session stays where it went");
    let plan = plan_at(&s, 0, &facts, Instant::now());
    let explained = explain_json(&s, &plan);
    assert_eq!(explained["affinity"]["bound"], away.as_str());
    assert_eq!(explained["affinity"]["moved"], false, "{explained:#}");
    live.circuit.on_success();
    assert_eq!(first(&s, &facts), home, "back once it is healthy");

    // Its backend at its capacity of 4: saturated.
    s.resolved(0, index)
        .backend_health
        .in_flight
        .store(4, Ordering::Relaxed);
    let plan = plan_at(&s, 0, &facts, Instant::now());
    let explained = explain_json(&s, &plan);
    assert_ne!(order(&s, &plan)[0], home);
    assert_eq!(explained["affinity"]["moved"], true, "{explained:#}");
    assert_eq!(explained["affinity"]["first"], true);
    s.resolved(0, index)
        .backend_health
        .in_flight
        .store(3, Ordering::Relaxed);
    assert_eq!(first(&s, &facts), home);
}

fn ask(request: Value, session: Option<&str>) -> ExplainRequest {
    ExplainRequest {
        request,
        api: None,
        region: None,
        key: None,
        session: session.map(str::to_owned),
    }
}

#[test]
fn explain_shows_the_session_and_the_deployment_it_is_bound_to() {
    let s = snapshot(&four_pools("cost", "session", 100));
    let conversation = json!({"model": "chat", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Plan a trip to Lisbon."}]});
    let explained =
        serde_json::to_value(explain(&s, &ask(conversation.clone(), None)).unwrap()).unwrap();
    let affinity = &explained["affinity"];
    assert_eq!(affinity["mode"], "session");
    assert!(
        affinity["session"]
            .as_str()
            .unwrap()
            .starts_with("opening "),
        "{explained:#}"
    );
    assert_eq!(affinity["bound"], explained["chosen"]);
    assert_eq!(affinity["first"], true);
    assert_eq!(
        candidate(&explained, explained["chosen"].as_str().unwrap())["kept"],
        true
    );

    let mut later = conversation.clone();
    later["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": "When?"}),
        json!({"role": "user", "content": "May."}),
    ]);
    let later = serde_json::to_value(explain(&s, &ask(later, None)).unwrap()).unwrap();
    assert_eq!(
        later["affinity"], explained["affinity"],
        "a later turn is the same session"
    );

    let mut keyed = conversation;
    keyed["user"] = json!("customer-17");
    let keyed = serde_json::to_value(explain(&s, &ask(keyed, Some("s-1"))).unwrap()).unwrap();
    assert!(
        keyed["affinity"]["session"]
            .as_str()
            .unwrap()
            .starts_with("x-session-id "),
        "{keyed:#}"
    );
}

#[test]
fn per_token_aliases_have_no_affinity_unless_asked_and_a_bad_name_is_refused() {
    let apis = |affinity: Option<&str>| {
        let mut model = Model::new("chat")
            .deployment(Deployment::named("a", "a").price(1.0, 1.0))
            .deployment(Deployment::named("b", "b").price(1.0, 1.0));
        if let Some(affinity) = affinity {
            model = model.affinity(affinity);
        }
        Config::new()
            .backend(sim("a", "us"))
            .backend(sim("b", "us"))
            .model(model)
    };
    let request = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]});
    let plain = snapshot(&apis(None));
    let explained =
        serde_json::to_value(explain(&plain, &ask(request.clone(), None)).unwrap()).unwrap();
    assert!(explained.get("affinity").is_none(), "{explained:#}");
    let asked = snapshot(&apis(Some("session")));
    let explained = serde_json::to_value(explain(&asked, &ask(request, None)).unwrap()).unwrap();
    assert_eq!(explained["affinity"]["mode"], "session");

    let Err(problems) = tollgate::config::parse(&apis(Some("sticky")).to_toml(), &|_| None) else {
        panic!("refused")
    };
    assert!(
        problems
            .to_string()
            .contains("models[0].affinity: unknown affinity \"sticky\"; expected one of: none, session, prefix"),
        "{problems}"
    );
    let bad_epsilon = apis(None).set("routing", "affinity_epsilon", 0.0);
    let Err(problems) = tollgate::config::parse(&bad_epsilon.to_toml(), &|_| None) else {
        panic!("refused")
    };
    assert!(
        problems.to_string().contains("routing.affinity_epsilon"),
        "{problems}"
    );
}

#[test]
fn the_cost_strategy_counts_the_bound_deployments_expected_cache_hit() {
    // Two APIs at the same list price; `cached` reads its cache at a
    // tenth of it, `plain` has no cache discount.
    let config = Config::new()
        .backend(sim("cached", "us"))
        .backend(sim("plain", "us"))
        .model(
            Model::new("chat")
                .affinity("session")
                .deployment(Deployment::named("plain", "plain").price(1.0, 2.0))
                .deployment(
                    Deployment::named("cached", "cached")
                        .price(1.0, 2.0)
                        .set("cached_input_usd_per_mtok", 0.1),
                ),
        );
    let s = snapshot(&config);
    // A session bound to `cached` (the other binds to `plain`).
    let (bound_to_cached, _) = (0..100)
        .map(|n| {
            (
                session(n),
                plan_at(&s, 0, &facts_of(session(n)), Instant::now()),
            )
        })
        .find(|(_, plan)| plan.affinity.unwrap().bound == Some(1))
        .expect("some session binds to `cached`");
    let facts = facts_of(bound_to_cached);
    // Unmeasured, its cache is worth nothing yet: the tie keeps it first.
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert_eq!(order(&s, &plan), ["cached", "plain"]);

    // `cached` has read 80% of its prompts from its cache.
    let mut usage = tollgate::openai::Usage::new(1000, 10);
    usage.prompt_tokens_details = Some(tollgate::openai::PromptTokensDetails {
        cached_tokens: 800,
        cache_write_tokens: 0,
    });
    s.resolved(0, 1).health.record_cache_hit(&usage);
    let plan = plan_at(&s, 0, &facts, Instant::now());
    let explained = explain_json(&s, &plan);
    assert_eq!(order(&s, &plan), ["cached", "plain"]);
    // 100 fresh tokens at $1, 400 cached at $0.10, 100 output at $2 per Mtok.
    let score = candidate(&explained, "cached")["score"].as_f64().unwrap();
    assert!(
        (score - (100.0 * 1.0 + 400.0 * 0.1 + 100.0 * 2.0) / 1e6).abs() < 1e-12,
        "{score}"
    );
    assert!(
        (candidate(&explained, "plain")["score"].as_f64().unwrap() - 700.0 / 1e6).abs() < 1e-12
    );
    assert!(
        reason(&explained, "cached").contains("80% of the prompt expected from its cache"),
        "{explained:#}"
    );
    assert!(!reason(&explained, "plain").contains("cache"));

    // Bound to `plain`, the hit does not count for `cached`, and the
    // session stays where its cache is.
    let other = (0..100)
        .map(session)
        .find(|&n| {
            plan_at(&s, 0, &facts_of(n), Instant::now())
                .affinity
                .unwrap()
                .bound
                == Some(0)
        })
        .unwrap();
    let plan = plan_at(&s, 0, &facts_of(other), Instant::now());
    assert_eq!(order(&s, &plan), ["plain", "cached"]);
}

#[test]
fn prefix_affinity_prefers_the_deployment_that_served_the_longest_prefix() {
    let s = snapshot(&four_pools("cost", "prefix", 100));
    let system = "You answer questions about the fleet. ".repeat(20);
    let turn = |turns: &[&str]| {
        let mut messages = vec![json!({"role": "system", "content": system})];
        messages.extend(turns.iter().map(|t| json!({"role": "user", "content": t})));
        json!({"model": "chat", "messages": messages})
    };
    let explained = |request: Value, session: Option<&str>| {
        serde_json::to_value(explain(&s, &ask(request, session)).unwrap()).unwrap()
    };
    let first_turn = explained(turn(&["Which GPUs are idle?"]), None);
    assert_eq!(
        first_turn["affinity"]["prefix_tokens"], 0,
        "nothing served yet"
    );
    let home = first_turn["chosen"].as_str().unwrap().to_owned();

    // Another deployment served this conversation's first turn: the next
    // turn follows the prefix there, whatever its session says.
    let served = s.config.models[0]
        .deployments
        .iter()
        .position(|d| d.name != home)
        .unwrap();
    let request = tollgate::openai::InboundRequest::parse(
        tollgate::openai::Endpoint::Chat,
        serde_json::to_vec(&turn(&["Which GPUs are idle?"]))
            .unwrap()
            .into(),
    )
    .unwrap();
    let blocks = tollgate::metering::prefix::blocks(&request);
    s.resolved(0, served).health.prefix.serve(&blocks);
    let next = explained(
        turn(&["Which GPUs are idle?", "And which are busy?"]),
        Some("s"),
    );
    let name = &s.config.models[0].deployments[served].name;
    assert_eq!(next["chosen"], name.as_str(), "{next:#}");
    let prefix_tokens = next["affinity"]["prefix_tokens"].as_u64().unwrap();
    let all: u64 = blocks.iter().map(|b| b.tokens).sum();
    assert_eq!(prefix_tokens, all);
}

// ---- through the gateway ----------------------------------------------------

#[tokio::test]
async fn a_conversation_replayed_reads_its_prefix_from_the_simulated_cache_at_its_price() {
    // A per-token simulated deployment that caches prompts, cached input
    // at a tenth of the $1/Mtok list price.
    let config = Config::new()
        .backend(
            Backend::simulated("sim")
                .answers(1, 10_000, 4)
                .prefix_cache(1000),
        )
        .model(
            Model::new("chat").deployment(
                Deployment::named("d", "sim")
                    .price(1.0, 2.0)
                    .set("cached_input_usd_per_mtok", 0.1),
            ),
        );
    let gateway = support::gateway::start(&config).await;
    let system = "Answer in one short sentence. ".repeat(8);
    let first = json!({"model": "chat", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "hi"}]});
    let usage = |body: &Value| body["usage"].clone();
    let one: Value = gateway.chat(first.clone()).await.json().await.unwrap();
    assert_eq!(usage(&one)["prompt_tokens_details"]["cached_tokens"], 0);
    let mut second = first.clone();
    second["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": one["choices"][0]["message"]["content"]}),
        json!({"role": "user", "content": "and then?"}),
    ]);
    let two: Value = gateway.chat(second).await.json().await.unwrap();
    let prompt = usage(&two)["prompt_tokens"].as_u64().unwrap();
    let cached = usage(&two)["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let first_prompt = usage(&one)["prompt_tokens"].as_u64().unwrap();
    // The first turn and the answer to it, not the new question.
    assert!(
        cached > first_prompt && cached < prompt,
        "{cached} of {prompt}"
    );
    let output = |body: &Value| body["usage"]["completion_tokens"].as_u64().unwrap();

    let micro = |tokens: u64, usd_per_mtok: f64| tokens as f64 * usd_per_mtok;
    let expected = micro(first_prompt, 1.0)
        + micro(output(&one), 2.0)
        + micro(prompt - cached, 1.0)
        + micro(cached, 0.1)
        + micro(output(&two), 2.0);
    gateway
        .eventually_metric(
            "tollgate_prompt_cache_tokens_total",
            &[("alias", "chat"), ("backend", "sim"), ("access", "read")],
            cached as f64,
        )
        .await;
    let text = gateway.metrics().await;
    let cost = metric(
        &text,
        "tollgate_cost_usd_total",
        &[("alias", "chat"), ("deployment", "d"), ("key", "none")],
    )
    .unwrap();
    assert!(
        (cost - expected / 1e6).abs() < 1e-12,
        "{cost} vs {}",
        expected / 1e6
    );
}

#[tokio::test]
async fn cache_reads_and_writes_an_upstream_reports_are_metered_at_their_prices() {
    let upstream = MockUpstream::openai()
        .json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10_000, "completion_tokens": 100, "total_tokens": 10_100,
                      "prompt_tokens_details": {"cached_tokens": 6_000, "cache_write_tokens": 3_000}}
        }))
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::upstream(
            "api",
            "openai",
            &support::gateway::url(&upstream),
        ))
        .model(
            Model::new("chat").deployment(
                Deployment::named("d", "api")
                    .set("context_window", 131_072)
                    .price(3.0, 15.0)
                    .set("cached_input_usd_per_mtok", 0.3)
                    .set("cache_write_usd_per_mtok", 3.75),
            ),
        );
    let gateway = support::gateway::start(&config).await;
    let response = gateway
        .chat(json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(response.status(), 200);
    let labels = |access| [("alias", "chat"), ("backend", "api"), ("access", access)];
    gateway
        .eventually_metric(
            "tollgate_prompt_cache_tokens_total",
            &labels("write"),
            3_000.0,
        )
        .await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "tollgate_prompt_cache_tokens_total", &labels("read")),
        Some(6_000.0)
    );
    // 1,000 fresh at $3, 6,000 read at $0.30, 3,000 written at $3.75 and
    // 100 output at $15 per Mtok.
    let expected = (1_000.0 * 3.0 + 6_000.0 * 0.3 + 3_000.0 * 3.75 + 100.0 * 15.0) / 1e6;
    let cost = metric(
        &text,
        "tollgate_cost_usd_total",
        &[("alias", "chat"), ("deployment", "d"), ("key", "none")],
    )
    .unwrap();
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
}

#[tokio::test]
async fn vllm_prefix_cache_counters_become_a_hit_ratio_gauge_per_deployment() {
    // One vLLM server with two models, each behind its own alias, and a
    // third deployment whose model the server does not report.
    let engine = MockUpstream::openai().start().await;
    let page = |m: (u32, u32), n: (u32, u32)| {
        format!(
            "vllm:num_requests_running{{model_name=\"llama\"}} 1\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"llama\"}} {}\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"llama\"}} {}\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"qwen\"}} {}\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"qwen\"}} {}\n",
            m.0, m.1, n.0, n.1
        )
    };
    engine.set_metrics(page((2000, 1500), (1000, 100)));
    let config = Config::new()
        .backend(
            Backend::upstream("gpu", "vllm", &support::gateway::url(&engine))
                .one_dollar_pool()
                .engine_metrics("interval_ms", 100),
        )
        .model(
            Model::new("chat").deployment(Deployment::new("gpu", "llama").set("name", "chat-gpu")),
        )
        .model(
            Model::new("code").deployment(Deployment::new("gpu", "qwen").set("name", "code-gpu")),
        )
        .model(
            Model::new("other").deployment(Deployment::new("gpu", "phi").set("name", "other-gpu")),
        );
    let gateway = support::gateway::start(&config).await;
    let ratio = |deployment| [("backend", "gpu"), ("deployment", deployment)];
    let name = "tollgate_engine_prefix_cache_hit_ratio";
    gateway
        .eventually_metric(name, &ratio("chat-gpu"), 0.75)
        .await;
    gateway
        .eventually_metric(name, &ratio("code-gpu"), 0.1)
        .await;
    engine.set_metrics(page((3000, 2400), (1000, 100)));
    // 900 of the last 1000 tokens llama looked up; qwen looked up none
    // since, so its last rate stands.
    gateway
        .eventually_metric(name, &ratio("chat-gpu"), 0.9)
        .await;
    let text = gateway.metrics().await;
    assert_eq!(metric(&text, name, &ratio("code-gpu")), Some(0.1));
    assert_eq!(
        metric(&text, name, &ratio("other-gpu")),
        None,
        "phi is not on the page"
    );
}

#[test]
fn a_messages_requests_user_id_is_its_session_as_openais_user_is() {
    let s = snapshot(&four_pools("cost", "session", 100));
    let messages: ExplainRequest = serde_json::from_value(json!({
        "api": "messages",
        "request": {"model": "chat", "max_tokens": 10, "metadata": {"user_id": "u-9"},
                    "messages": [{"role": "user", "content": "hi"}]}}))
    .unwrap();
    let messages = serde_json::to_value(explain(&s, &messages).unwrap()).unwrap();
    let chat = json!({"model": "chat", "user": "u-9",
                      "messages": [{"role": "user", "content": "something else"}]});
    let chat = serde_json::to_value(explain(&s, &ask(chat, None)).unwrap()).unwrap();
    assert!(
        messages["affinity"]["session"]
            .as_str()
            .unwrap()
            .starts_with("user "),
        "{messages:#}"
    );
    assert_eq!(messages["affinity"], chat["affinity"]);
}

#[test]
fn under_spillover_sessions_bind_within_the_first_tier_with_room() {
    let config = Config::new()
        .backend(
            never_called("gpu-a", "vllm")
                .one_dollar_pool()
                .set("max_concurrency", 10),
        )
        .backend(
            never_called("gpu-b", "vllm")
                .one_dollar_pool()
                .set("max_concurrency", 10),
        )
        .backend(sim("api", "us"))
        .model(
            Model::new("chat")
                .spillover(0.8, 0.5)
                .affinity("session")
                .deployment(Deployment::named("a", "gpu-a"))
                .deployment(Deployment::named("b", "gpu-b"))
                .deployment(Deployment::named("api", "api").price(1.0, 1.0)),
        );
    let s = snapshot(&config);
    let firsts: std::collections::HashSet<String> =
        (0..100).map(|n| first(&s, &facts_of(session(n)))).collect();
    assert_eq!(firsts, ["a", "b"].map(String::from).into(), "tier 0 only");
    // Both pools past their high load: the overflow tier takes sessions.
    for backend in 0..2 {
        s.live().backends[backend]
            .in_flight
            .store(9, Ordering::Relaxed);
    }
    assert_eq!(first(&s, &facts_of(session(1))), "api");
}
