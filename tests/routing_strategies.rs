//! Each strategy's order without any network, on snapshots whose live
//! state is set by hand: cost (self-hosted priced by load), latency
//! (unmeasured first, then the fastest; exploration), weighted (by
//! weight, over many seeded plans), spillover (tiers, hysteresis, the
//! engine's queue and KV cache, the price cap), and engine signals going
//! stale.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::config::{Config, Deployment, Model};
use support::gateway::{candidate, reason};
use support::plan::*;
use tollgate::health::EngineSignals;
use tollgate::routing::{self, Plan, RequestFacts};
use tollgate::state::Snapshot;

/// A self-hosted pool `gpu` (at $1/Mtok flat out, 10 requests at once)
/// and two simulated APIs, `cheap-api` and `dear-api`.
fn gpu_and_two_apis() -> Config {
    Config::new()
        .backend(
            never_called("gpu", "vllm")
                .one_dollar_pool()
                .set("max_concurrency", 10),
        )
        .backend(sim("cheap-api", "us"))
        .backend(sim("dear-api", "us"))
}

/// Alias `chat` on `slow` (backend `a`) then `fast` (backend `b`), by
/// latency, exploring `exploration` of the time.
fn slow_and_fast(exploration: f64) -> Config {
    Config::new()
        .backend(sim("a", "us"))
        .backend(sim("b", "us"))
        .model(
            Model::new("chat")
                .strategy("latency")
                .deployment(Deployment::named("slow", "a"))
                .deployment(Deployment::named("fast", "b")),
        )
        .set("routing", "exploration", exploration)
}

// ---- strategies ---------------------------------------------------------------

#[test]
fn cost_prices_an_idle_self_hosted_pool_as_free_and_a_busy_one_by_its_load() {
    let config = gpu_and_two_apis().model(
        Model::new("chat")
            .strategy("cost")
            .deployment(Deployment::named("dear", "dear-api").price(2.0, 2.0))
            .deployment(Deployment::named("self", "gpu"))
            .deployment(Deployment::named("cheap", "cheap-api").price(0.5, 0.5)),
    );
    let s = snapshot(&config);
    let facts = text_facts(600, 400);
    let now = Instant::now();

    let idle = plan_at(&s, 0, &facts, now);
    assert_eq!(order(&s, &idle), ["self", "cheap", "dear"]);
    let explained = explain_json(&s, &idle);
    assert_eq!(explained["strategy"], "cost");
    assert_eq!(candidate(&explained, "self")["score"], 0.0);
    // 1000 tokens at $0.5/Mtok and $2/Mtok.
    let score = |e: &Value, name| candidate(e, name)["score"].as_f64().unwrap();
    assert!((score(&explained, "cheap") - 0.0005).abs() < 1e-12);
    assert!((score(&explained, "dear") - 0.002).abs() < 1e-12);
    assert!(
        reason(&explained, "self").contains("self-hosted at 0% load"),
        "{explained:#}"
    );

    // 3 of 10 in flight: $0.30/Mtok, still the cheapest.
    let gpu = &s.live().backends[0];
    gpu.in_flight.store(3, Ordering::Relaxed);
    let busy = plan_at(&s, 0, &facts, now);
    let explained = explain_json(&s, &busy);
    assert!((score(&explained, "self") - 0.0003).abs() < 1e-12);
    assert_eq!(order(&s, &busy), ["self", "cheap", "dear"]);

    // Requests queued in the engine: full load, $1/Mtok, dearer than cheap.
    gpu.in_flight.store(0, Ordering::Relaxed);
    gpu.set_engine(EngineSignals {
        waiting: 2.0,
        running: 1.0,
        kv_cache: Some(0.1),
        at: now,
    });
    let queued = plan_at(&s, 0, &facts, now);
    assert_eq!(order(&s, &queued), ["cheap", "self", "dear"]);
    let explained = explain_json(&s, &queued);
    assert!((score(&explained, "self") - 0.001).abs() < 1e-12);
    assert!(reason(&explained, "self").contains("100% load"));
}

#[test]
fn cost_expects_the_configured_output_length_until_the_alias_has_observed_one() {
    let config = Config::new()
        .backend(sim("api", "us"))
        .model(Model::new("chat").deployment(Deployment::named("d", "api").price(1.0, 3.0)))
        .set("routing", "default_output_tokens", 100);
    let s = snapshot(&config);
    let facts = RequestFacts {
        input_tokens: 1000,
        ..RequestFacts::default()
    };
    let score = |plan: &Plan| plan.candidates[0].score.unwrap();
    // 1000 × $1 + 100 × $3 per Mtok.
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert!((score(&plan) - 0.0013).abs() < 1e-12);
    s.alias_live(0).record_output_tokens(500);
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert!((score(&plan) - 0.0025).abs() < 1e-12, "observed 500");
}

#[test]
fn latency_tries_unmeasured_first_then_the_fastest_for_streams_and_whole_answers_apart() {
    let s = snapshot(&slow_and_fast(0.0));
    let (slow, fast) = (&s.resolved(0, 0).health, &s.resolved(0, 1).health);
    let stream = RequestFacts {
        stream: true,
        ..text_facts(5, 10)
    };
    let whole = text_facts(5, 10);
    let now = Instant::now();

    assert_eq!(
        order(&s, &plan_at(&s, 0, &stream, now)),
        ["slow", "fast"],
        "both unmeasured: config order"
    );
    slow.record_latency(true, Duration::from_millis(400));
    let plan = plan_at(&s, 0, &stream, now);
    assert_eq!(
        order(&s, &plan),
        ["fast", "slow"],
        "the unmeasured goes first"
    );
    let explained = explain_json(&s, &plan);
    assert_eq!(
        reason(&explained, "fast"),
        "not measured yet: tried first to measure it"
    );
    assert_eq!(reason(&explained, "slow"), "expected 400 ms to first token");

    fast.record_latency(true, Duration::from_millis(50));
    assert_eq!(order(&s, &plan_at(&s, 0, &stream, now)), ["fast", "slow"]);
    assert_eq!(
        order(&s, &plan_at(&s, 0, &whole, now)),
        ["slow", "fast"],
        "time to first token says nothing about whole answers"
    );
    slow.record_latency(false, Duration::from_millis(900));
    fast.record_latency(false, Duration::from_millis(1200));
    assert_eq!(order(&s, &plan_at(&s, 0, &whole, now)), ["slow", "fast"]);
    // The moving average follows: fast becomes slow to first token.
    for _ in 0..20 {
        fast.record_latency(true, Duration::from_millis(2000));
    }
    assert_eq!(order(&s, &plan_at(&s, 0, &stream, now)), ["slow", "fast"]);
}

#[test]
fn latency_exploration_puts_another_deployment_first_for_its_share_of_requests() {
    let s = snapshot(&slow_and_fast(0.2));
    s.resolved(0, 0)
        .health
        .record_latency(false, Duration::from_millis(900));
    s.resolved(0, 1)
        .health
        .record_latency(false, Duration::from_millis(100));
    let facts = text_facts(5, 10);
    let mut rng = fastrand::Rng::with_seed(42);
    let runs = 2000;
    let mut explored = 0;
    for _ in 0..runs {
        let plan = routing::plan(&s, 0, &facts, Instant::now(), &mut rng);
        if plan.candidates[0].deployment == 0 {
            assert!(
                plan.candidates[0]
                    .reason
                    .to_string()
                    .starts_with("exploring (")
            );
            explored += 1;
        }
    }
    let share = f64::from(explored) / f64::from(runs);
    assert!((0.15..0.25).contains(&share), "explored {share}");
}

#[test]
fn weighted_puts_each_deployment_first_in_proportion_to_its_weight() {
    let config = Config::new()
        .backend(sim("a", "us"))
        .backend(sim("b", "us"))
        .backend(sim("c", "us"))
        .model(
            Model::new("chat")
                .strategy("weighted")
                .deployment(Deployment::named("three", "a").set("weight", 3))
                .deployment(Deployment::named("one", "b"))
                .deployment(Deployment::named("four", "c").set("weight", 4)),
        );
    let s = snapshot(&config);
    let facts = text_facts(5, 10);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut firsts = [0u32; 3];
    let runs = 8000;
    for _ in 0..runs {
        let plan = routing::plan(&s, 0, &facts, Instant::now(), &mut rng);
        assert_eq!(
            plan.order().count(),
            3,
            "every deployment stays as a fallback"
        );
        firsts[plan.candidates[0].deployment] += 1;
    }
    let share = |i: usize| f64::from(firsts[i]) / f64::from(runs);
    assert!((share(0) - 3.0 / 8.0).abs() < 0.03, "{firsts:?}");
    assert!((share(1) - 1.0 / 8.0).abs() < 0.03, "{firsts:?}");
    assert!((share(2) - 4.0 / 8.0).abs() < 0.03, "{firsts:?}");
    let plan = plan_at(&s, 0, &facts, Instant::now());
    let explained = explain_json(&s, &plan);
    assert_eq!(reason(&explained, "three"), "weight 3 of 8");
    assert_eq!(candidate(&explained, "four")["score"], 4.0);
}

// ---- spillover ------------------------------------------------------------------

/// Spillover from `self` (tier 0) to `cheap` and `dear`, with or without
/// a price cap.
fn spillover_snapshot(price_cap: Option<f64>) -> Snapshot {
    let mut chat = Model::new("chat")
        .spillover(0.8, 0.5)
        .deployment(Deployment::named("dear", "dear-api").price(0.5, 5.0))
        .deployment(Deployment::named("cheap", "cheap-api").price(0.5, 0.8))
        .deployment(Deployment::named("self", "gpu"));
    if let Some(cap) = price_cap {
        chat = chat.price_cap(cap);
    }
    snapshot(&gpu_and_two_apis().model(chat))
}

#[test]
fn spillover_fills_self_hosted_first_and_overflows_cheapest_first_with_hysteresis() {
    let s = spillover_snapshot(None);
    let gpu = &s.live().backends[0];
    let facts = text_facts(100, 100);
    let now = Instant::now();
    let at_load = |in_flight: u64| {
        gpu.in_flight.store(in_flight, Ordering::Relaxed);
        let plan = plan_at(&s, 0, &facts, now);
        (order(&s, &plan), explain_json(&s, &plan))
    };

    let (order0, explained) = at_load(0);
    assert_eq!(
        order0,
        ["self", "cheap", "dear"],
        "tier 0, then tier 1 cheapest first"
    );
    assert_eq!(
        reason(&explained, "self"),
        "tier 0, load 0.00: taking traffic"
    );
    assert_eq!(
        reason(&explained, "cheap"),
        "tier 1, load unknown: taking traffic"
    );
    assert_eq!(
        at_load(7).0,
        ["self", "cheap", "dear"],
        "0.7 is under high_load"
    );

    let (order8, explained) = at_load(8);
    assert_eq!(
        order8,
        ["cheap", "dear", "self"],
        "at high_load it overflows"
    );
    assert_eq!(
        reason(&explained, "self"),
        "tier 0, load 0.80: saturated, overflow goes on"
    );
    assert_eq!(candidate(&explained, "self")["kept"], true, "a last resort");
    assert_eq!(at_load(6).0[0], "cheap", "0.6 is not yet under low_load");
    assert_eq!(at_load(5).0[0], "cheap", "0.5 is not under low_load");
    assert_eq!(
        at_load(4).0[0],
        "self",
        "under low_load it takes traffic again"
    );
    assert_eq!(at_load(6).0[0], "self", "and keeps it up to high_load");
}

#[test]
fn spillover_load_comes_from_the_engine_queue_and_kv_cache() {
    let s = spillover_snapshot(None);
    let gpu = &s.live().backends[0];
    let facts = text_facts(100, 100);
    let now = Instant::now();
    let first_with = |waiting: f64, running: f64, kv_cache: Option<f64>| {
        gpu.set_engine(EngineSignals {
            waiting,
            running,
            kv_cache,
            at: now,
        });
        // Each plan from an unsaturated state: idle signals in between.
        let first = order(&s, &plan_at(&s, 0, &facts, now))[0].clone();
        gpu.set_engine(EngineSignals {
            waiting: 0.0,
            running: 0.0,
            kv_cache: Some(0.0),
            at: now,
        });
        assert_eq!(order(&s, &plan_at(&s, 0, &facts, now))[0], "self");
        first
    };
    assert_eq!(first_with(0.0, 2.0, Some(0.3)), "self");
    assert_eq!(first_with(0.0, 2.0, Some(0.85)), "cheap", "KV cache");
    assert_eq!(
        first_with(0.0, 8.0, Some(0.1)),
        "cheap",
        "running / max_concurrency"
    );
    assert_eq!(
        first_with(5.0, 3.0, Some(0.1)),
        "cheap",
        "running + waiting"
    );
    assert_eq!(
        first_with(1.0, 0.0, None),
        "cheap",
        "anything waiting is full"
    );
}

#[test]
fn spillover_price_cap_drops_dear_overflow_deployments() {
    let s = spillover_snapshot(Some(1.0));
    let facts = text_facts(100, 100);
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert_eq!(order(&s, &plan), ["self", "cheap"]);
    let explained = explain_json(&s, &plan);
    assert_eq!(candidate(&explained, "dear")["kept"], false);
    assert_eq!(
        reason(&explained, "dear"),
        "tier 1: $5/Mtok output is over the price cap of $1"
    );
    s.live().backends[0].in_flight.store(10, Ordering::Relaxed);
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert_eq!(
        order(&s, &plan),
        ["cheap", "self"],
        "capped even when saturated"
    );
    // The self-hosted tier down: the cap still holds.
    s.live().backends[0].in_flight.store(0, Ordering::Relaxed);
    let settings = &s.config.routing;
    for _ in 0..settings.circuit_failures {
        s.resolved(0, 2)
            .health
            .circuit
            .on_failure(false, Instant::now(), settings);
    }
    let plan = plan_at(&s, 0, &facts, Instant::now());
    assert_eq!(
        order(&s, &plan),
        ["cheap"],
        "an outage of the first tier does not lift the cost ceiling"
    );
}

#[test]
fn vllm_is_scraped_at_its_root_every_two_seconds_unless_configured_otherwise() {
    let config = Config::new()
        .backend(never_called("default", "vllm"))
        .backend(never_called("tuned", "vllm").engine_metrics("interval_ms", 100))
        .backend(never_called("off", "vllm").engine_metrics("enabled", false))
        .backend(never_called("tgi", "openai").engine_metrics("url", "http://127.0.0.1:9/metrics"))
        .backend(never_called("plain", "openai"))
        .model(Model::new("chat").deployment(Deployment::named("d", "default")));
    let s = snapshot(&config);
    let scraped: Vec<Option<(String, u128)>> = s
        .config
        .backends
        .iter()
        .map(|b| {
            b.engine_metrics
                .as_ref()
                .map(|m| (m.url.to_string(), m.interval.as_millis()))
        })
        .collect();
    let at = |interval| Some(("http://127.0.0.1:9/metrics".to_owned(), interval));
    assert_eq!(scraped, [at(2000), at(100), None, at(2000), None]);
}

#[test]
fn engine_signals_older_than_three_intervals_are_ignored_not_taken_for_down() {
    let config = Config::new()
        .backend(
            never_called("gpu", "vllm")
                .one_dollar_pool()
                .engine_metrics("interval_ms", 100),
        )
        .backend(sim("api", "us"))
        .model(
            Model::new("chat")
                .strategy("spillover")
                .deployment(Deployment::named("self", "gpu"))
                .deployment(Deployment::named("api", "api").price(1.0, 1.0)),
        );
    let s = snapshot(&config);
    let at = Instant::now();
    s.live().backends[0].set_engine(EngineSignals {
        waiting: 3.0,
        running: 10.0,
        kv_cache: Some(1.0),
        at,
    });
    let facts = text_facts(100, 100);
    let fresh = plan_at(&s, 0, &facts, at + Duration::from_millis(300));
    assert_eq!(order(&s, &fresh), ["api", "self"]);
    let stale = plan_at(&s, 0, &facts, at + Duration::from_millis(301));
    assert_eq!(order(&s, &stale), ["self", "api"]);
    let explained = explain_json(&s, &stale);
    assert_eq!(
        reason(&explained, "self"),
        "tier 0, load unknown: taking traffic"
    );
    assert_eq!(explained["status"], 200);
}
