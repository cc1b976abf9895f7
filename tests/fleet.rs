//! Several replicas, one set of guarantees: with `[state] backend =
//! "redis"`, replicas on one real Redis share budgets, rate limits and
//! what upstreams say of their capacity; a replica that dies frees its
//! reservations within the lease; and when Redis stops, is slow, or comes
//! back, no request hangs and no spend is lost.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use support::certs::{ClientFiles, ServerTls, TestCa};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{MockServer, MockUpstream};
use support::postgres::Postgres;
use support::process::Process;
use support::redis::Redis;
use tollgate::limits::go_duration;

/// $1 per Mtok in, $10 per Mtok out: an output token is 10,000
/// nano-dollars, and "hi" (about 5 prompt tokens) 5,000.
const PRICE: (f64, f64) = (1.0, 10.0);
const PREFIX: &str = "t:";

/// `config` on `redis`, with a timeout long enough that a debug build on
/// a busy machine never counts a running Redis away: a stopped one
/// refuses connections at once, and the frozen-Redis test sets its own.
fn shared(config: Config, redis: &Redis) -> Config {
    config
        .set("state", "backend", "redis")
        .set("state", "url", redis.url())
        .set("state", "prefix", PREFIX)
        .set("state", "timeout_ms", 1_000)
}

fn one_model(upstream: &MockServer) -> Config {
    Config::new()
        .backend(Backend::upstream("api", "openai", &url(upstream)))
        .model(
            Model::new("chat").deployment(
                Deployment::new("api", "m")
                    .price(PRICE.0, PRICE.1)
                    .set("context_window", 8192)
                    .set("tools", true),
            ),
        )
        .admin()
}

async fn replicas(config: &Config, n: usize) -> Vec<Gateway> {
    let mut gateways = Vec::new();
    for _ in 0..n {
        gateways.push(start(config).await);
    }
    gateways
}

fn today() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (now / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The fleet's count of what `key` spent today, in nano-dollars.
fn fleet_spent(redis: &Redis, key: &str) -> i64 {
    redis.hash_int(&format!("{PREFIX}key:{key}"), &format!("d:{}", today()))
}

/// What the replicas' ledgers hold for `key`, in USD.
async fn ledgers_spent(gateways: &[Gateway], key: &str) -> f64 {
    let mut total = 0.0;
    for gateway in gateways {
        total += gateway.spend(&format!("?key={key}")).await["total"]["cost_usd"]
            .as_f64()
            .unwrap();
    }
    total
}

/// What the replicas' ledgers hold for the key `team`, in USD, once
/// checked against the fleet's count in Redis: no spend lost or doubled.
async fn ledgers_match_the_fleet(redis: &Redis, gateways: &[Gateway]) -> f64 {
    let spent = ledgers_spent(gateways, "team").await;
    assert_eq!(
        fleet_spent(redis, "team"),
        (spent * 1e9).round() as i64,
        "the fleet's count is the ledgers' sum"
    );
    spent
}

async fn status(gateway: &Gateway) -> Value {
    gateway.admin("/admin/status").await
}

/// Polls `check` every 50 ms until it holds; bounded by WAIT.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request as a client sends it; its status and its error code.
async fn ask(gateway: &Gateway, key: &str, stream: bool) -> (u16, Option<String>) {
    let body = json!({"model": "chat", "messages": user("hi"), "stream": stream});
    ask_with(gateway, key, body).await
}

/// `body` sent with `key`; the status and the error code.
async fn ask_with(gateway: &Gateway, key: &str, body: Value) -> (u16, Option<String>) {
    let response = gateway.chat_as(&format!("{key}-secret"), body).await;
    let status = response.status().as_u16();
    (status, error_of_any(response).await)
}

/// The error code of a response, if it is an error.
async fn error_of_any(response: reqwest::Response) -> Option<String> {
    let body = response.bytes().await.unwrap_or_default();
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b["error"]["code"].as_str().map(str::to_owned))
}

/// How many of a wave of requests against a budget were served; every
/// other must have been refused for the budget.
fn served_of_wave(answers: &[(u16, Option<String>)]) -> usize {
    for (status, code) in answers {
        assert!(
            *status == 200
                || (*status == 429
                    && matches!(code.as_deref(), Some("budget_held" | "insufficient_quota"))),
            "{status} {code:?}"
        );
    }
    answers.iter().filter(|(s, _)| *s == 200).count()
}

/// Whether every request of a wave was refused for a budget used up.
fn used_up(answers: &[(u16, Option<String>)]) -> bool {
    answers
        .iter()
        .all(|(_, code)| code.as_deref() == Some("insufficient_quota"))
}

/// A replica of `config` in a process of its own, to be killed.
fn doomed_replica(config: &Config) -> (Process, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config.to_toml()).unwrap();
    (replica_process(file.path(), &[]), file)
}

/// A replica serving the config file at `path`, in a process of its own,
/// with `env` in its environment beside the keys' secrets.
fn replica_process(path: &std::path::Path, env: &[(&str, &str)]) -> Process {
    let mut all = vec![
        ("KEY_TEAM", "team-secret"),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("UPSTREAM_KEY_API", "sk-test-api"),
    ];
    all.extend_from_slice(env);
    support::process::serve_file(path, &all)
}

/// A client of a replica in a process of its own.
fn client_of(process: &Process) -> Gateway {
    Gateway {
        base: process.base.clone(),
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_for_the_whole_fleet_under_concurrent_long_answers() {
    // 2,000-token answers cost $0.02 each, half of them streamed.
    budget_holds_for_the_fleet(
        "one answer a request",
        MockUpstream::openai().answers_of(2_000),
        |i| json!({"model": "chat", "messages": user("hi"), "stream": i % 2 == 0}),
    )
    .await;
}

/// Each request generates and bills four answers, and reserves for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_for_the_whole_fleet_with_four_answers_a_request() {
    budget_holds_for_the_fleet(
        "four answers a request",
        MockUpstream::openai().answers_of(2_000),
        |i| json!({"model": "chat", "messages": user("hi"), "stream": i % 2 == 0, "n": 4}),
    )
    .await;
}

/// Streamed tool calls of 3,000 tokens ($0.03) from an upstream that
/// ignores the limit it is sent: each replica cuts its calls at their
/// reservations, which Redis sized for the whole fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_for_the_whole_fleet_with_streamed_tool_calls_past_their_limits() {
    let tools = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
    let upstream = MockUpstream::openai().answers_of_ignoring_max_tokens(3_000);
    budget_holds_for_the_fleet(
        "streamed tool calls",
        upstream,
        |_| json!({"model": "chat", "messages": user("hi"), "tools": tools, "stream": true}),
    )
    .await;
}

/// Waves of 300 requests at once over three replicas, with no
/// `max_tokens`, answered by `upstream`, until the budget is used up;
/// then the spend is checked against the budget and the ledgers against
/// Redis.
async fn budget_holds_for_the_fleet(
    case: &str,
    upstream: MockUpstream,
    body: impl Fn(usize) -> Value,
) {
    let Some(redis) = Redis::start() else { return };
    let upstream = upstream
        .first_byte_after(Duration::from_millis(20))
        .record(false)
        .start()
        .await;
    let budget = 0.10;
    // A debug build on two cores answers 300 requests at once slowly: the
    // timeout is long enough that no replica counts Redis away (that
    // case has tests of its own).
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("budget_daily_usd", budget)),
        &redis,
    )
    .set("state", "timeout_ms", 2_000);
    let fleet = replicas(&config, 3).await;
    let mut served = 0;
    let mut settled = false;
    for _ in 0..20 {
        // 300 at once, spread over the three replicas.
        let wave = (0..300).map(|i| ask_with(&fleet[i % 3], "team", body(i)));
        let wave = join_all(wave).await;
        served += served_of_wave(&wave);
        if used_up(&wave) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(settled, "the budget was never used up");
    // Ledgers and the fleet's count agree once the last spend is sent.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spent = ledgers_match_the_fleet(&redis, &fleet).await;
    eprintln!("{case}: {served} served, ${spent:.6} spent of ${budget}");
    // The budget paid for answers, most of it spent rather than refused.
    assert!(
        served >= 2 && spent >= 0.9 * budget,
        "{served} served for ${spent}"
    );
    // The bound of one process holds for the fleet: none (the upstream
    // counts 11 prompt tokens where the gateway estimated 5, within the 82
    // reserved for them).
    let overrun = spent - budget;
    assert!(
        overrun <= 0.0,
        "$0.10 budget, {case}: the fleet spent ${spent} in {served} requests"
    );
    for gateway in &fleet {
        assert_eq!(status(gateway).await["state"]["degraded"], false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_rpm_holds_for_the_whole_fleet() {
    let Some(redis) = Redis::start() else { return };
    let upstream = MockUpstream::openai().record(false).start().await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("rpm", 6)),
        &redis,
    );
    let fleet = replicas(&config, 3).await;
    let mut ok = 0;
    let mut refused = Vec::new();
    for i in 0..12 {
        let gateway = &fleet[i % 3];
        let response = gateway
            .chat_as(
                "team-secret",
                json!({"model": "chat", "messages": user("hi")}),
            )
            .await;
        match response.status().as_u16() {
            200 => ok += 1,
            429 => refused.push(
                [
                    "retry-after",
                    "retry-after-ms",
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ]
                .map(|name| header(&response, name).to_owned()),
            ),
            other => panic!("HTTP {other}"),
        }
    }
    assert_eq!(ok, 6, "rpm = 6 across three replicas");
    assert_eq!(refused.len(), 6);
    // The next slot is 10 s after the first request, fleet-wide, and the
    // whole quota is free a minute after it: the shared cell says so.
    for [wait, wait_ms, limit, remaining, reset] in refused {
        let wait: u64 = wait.parse().unwrap();
        assert!((1..=10).contains(&wait), "retry-after {wait}");
        let wait_ms: u64 = wait_ms.parse().unwrap();
        assert_eq!(wait_ms.div_ceil(1000), wait, "{wait_ms} ms");
        assert_eq!((limit.as_str(), remaining.as_str()), ("6", "0"));
        let reset = go_duration::parse(&reset).unwrap().as_secs_f64();
        assert!((50.0..=60.0).contains(&reset), "reset {reset} s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_replica_keeps_the_others_from_the_deployment() {
    let Some(redis) = Redis::start() else { return };
    let cheap = MockUpstream::openai()
        .error(
            429,
            json!({"error": {"message": "slow down", "type": "rate_limit_error"}}),
        )
        .header("retry-after", "30")
        .start()
        .await;
    let dear = MockUpstream::openai().record(false).start().await;
    let config = two_deployments(&cheap, &dear, &redis);
    let fleet = replicas(&config, 3).await;
    let response = fleet[0]
        .chat(json!({"model": "chat", "messages": user("hi")}))
        .await;
    assert_eq!(response.status(), 200, "failed over to the dear deployment");
    assert_eq!(cheap.hits(), 1);
    // Published within one exchange, taken up within the next.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for gateway in &fleet[1..] {
        for _ in 0..3 {
            let response = gateway
                .chat(json!({"model": "chat", "messages": user("hi")}))
                .await;
            assert_eq!(response.status(), 200);
            assert_eq!(served_by(&response).0, "dear");
        }
    }
    assert_eq!(
        cheap.hits(),
        1,
        "no other replica sent to the cooling deployment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_local_mode_serves_and_then_adds_what_it_spent() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let upstream = answering(100).await;
    let fleet = replicas(&outage(&upstream, &redis, "local"), 2).await;
    let load = || async {
        for gateway in &fleet {
            assert!(statuses(gateway).await.iter().all(|s| *s == 200));
        }
    };
    load().await;
    // Each has a share of the budget to serve on once it exchanged with
    // the fleet; without one it would refuse the budgeted key.
    eventually("both replicas exchanged with the fleet", || async {
        status(&fleet[0]).await["state"]["budget_share"] == "exchanged"
            && status(&fleet[1]).await["state"]["budget_share"] == "exchanged"
    })
    .await;
    redis.stop();
    load().await;
    eventually("replicas report themselves degraded", || async {
        status(&fleet[0]).await["state"]["degraded"] == true
    })
    .await;
    assert_eq!(
        metric(&fleet[0].metrics().await, "tollgate_state_degraded", &[]),
        Some(1.0)
    );
    load().await;
    redis.start_again();
    eventually("replicas reconcile once Redis is back", || async {
        status(&fleet[0]).await["state"]["degraded"] == false
            && status(&fleet[1]).await["state"]["degraded"] == false
    })
    .await;
    load().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Every request's spend is in the fleet's count, those served while
    // Redis was away too.
    let spent = ledgers_match_the_fleet(&redis, &fleet).await;
    assert!(spent > 0.0);
}

/// Redis that answers but lost its data (FLUSHALL, or a restart without
/// persistence quicker than an exchange) has its spend counters seeded
/// again before anything is added to them, from the most the fleet is
/// known to have spent: a loss while the fleet was idle for an exchange
/// forgets none of the spend before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_lost_its_data_is_seeded_again_with_the_fleets_spend() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(100).await;
    let fleet = replicas(&outage(&upstream, &redis, "local"), 2).await;
    let load = || async {
        for gateway in &fleet {
            assert!(statuses(gateway).await.iter().all(|s| *s == 200));
        }
    };
    let in_step = || async {
        let spent = ledgers_spent(&fleet, "team").await;
        fleet_spent(&redis, "team") == (spent * 1e9).round() as i64
    };
    load().await;
    eventually("the fleet counts what was spent", in_step).await;
    let before = fleet_spent(&redis, "team");
    assert!(before > 0);
    // An exchange or two with nothing new: each replica knows the fleet's
    // count, which it seeds with.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(redis.command("FLUSHALL").as_deref(), Some("+OK"));
    load().await;
    eventually("the fleet's count is seeded again and counts on", in_step).await;
    assert!(fleet_spent(&redis, "team") > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_frozen_refuse_mode_answers_503_in_time_and_recovers() {
    let Some(redis) = Redis::start() else { return };
    let upstream = MockUpstream::openai().record(false).start().await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("budget_daily_usd", 10.0)),
        &redis,
    )
    .set("state", "on_unavailable", "refuse")
    .set("state", "timeout_ms", 50);
    let gateway = start(&config).await;
    assert_eq!(ask(&gateway, "team", false).await.0, 200);
    redis.freeze(true);
    for _ in 0..5 {
        let started = Instant::now();
        let response = gateway
            .chat_as(
                "team-secret",
                json!({"model": "chat", "messages": user("hi")}),
            )
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "never hangs on Redis"
        );
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let code = error_of_any(response).await;
        assert_eq!(code.as_deref(), Some("state_unavailable"));
    }
    redis.freeze(false);
    eventually("requests are served again", || async {
        ask(&gateway, "team", false).await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_reservations_are_freed_within_the_lease() {
    let Some(redis) = Redis::start() else { return };
    // Streams that start and then hang: their reservations stay held.
    let upstream = MockUpstream::openai()
        .answers_of(50)
        .hold_after(2)
        .start()
        .await;
    // Each request may cost up to 8,192 output tokens ($0.08): a $0.10
    // budget holds one at a time.
    let config = a_tenth_of_a_dollar(&upstream, &redis).set("state", "lease_ms", 2_000);
    let (mut doomed, _file) = doomed_replica(&config);
    let client = reqwest::Client::new();
    let in_flight = client
        .post(format!("{}/v1/chat/completions", doomed.base))
        .bearer_auth("team-secret")
        .json(&json!({"model": "chat", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(in_flight.status(), 200, "its stream started");
    let survivor = start(&config).await;
    // Asks for as much as the held request may cost: it waits for it.
    let big = || async {
        let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 8000});
        let response = survivor.chat_as("team-secret", body).await;
        let status = response.status().as_u16();
        (status, error_of_any(response).await)
    };
    let (status, code) = big().await;
    assert_eq!((status, code.as_deref()), (429, Some("budget_held")));
    doomed.child.kill().unwrap();
    let killed = Instant::now();
    drop(in_flight);
    upstream.release();
    eventually("the dead replica's reservation expires", || async {
        big().await.0 == 200
    })
    .await;
    let freed = killed.elapsed();
    assert!(
        freed < Duration::from_secs(4),
        "freed after {freed:?}; the lease is 2 s"
    );
}

/// Two deployments of `chat`, tried in this order: `cheap` on `first`,
/// then one on `second`.
fn two_deployments(first: &MockServer, second: &MockServer, redis: &Redis) -> Config {
    two_deployments_with(first, second, redis, Deployment::new("cheap", "m"))
}

fn two_deployments_with(
    first: &MockServer,
    second: &MockServer,
    redis: &Redis,
    cheap: Deployment,
) -> Config {
    shared(
        Config::new()
            .backend(Backend::upstream("cheap", "openai", &url(first)))
            .backend(Backend::upstream("dear", "openai", &url(second)))
            .model(
                Model::new("chat")
                    .strategy("cost")
                    .deployment(cheap.price(0.1, 0.1))
                    .deployment(Deployment::new("dear", "m").price(5.0, 5.0)),
            )
            .admin(),
        redis,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_says_it_has_nothing_left_is_left_alone_by_every_replica() {
    let Some(redis) = Redis::start() else { return };
    let cheap = MockUpstream::openai()
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", "30s")
        .start()
        .await;
    let dear = MockUpstream::openai().record(false).start().await;
    let fleet = replicas(&two_deployments(&cheap, &dear, &redis), 3).await;
    let hi = || json!({"model": "chat", "messages": user("hi")});
    assert_eq!(served_by(&fleet[0].chat(hi()).await).0, "cheap");
    tokio::time::sleep(Duration::from_millis(700)).await;
    for gateway in &fleet[1..] {
        assert_eq!(served_by(&gateway.chat(hi()).await).0, "dear");
    }
    assert_eq!(cheap.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_opened_by_one_replica_is_open_on_the_others() {
    let Some(redis) = Redis::start() else { return };
    let cheap = MockUpstream::openai().status(500).start().await;
    let dear = MockUpstream::openai().record(false).start().await;
    let config = two_deployments(&cheap, &dear, &redis)
        .set("routing", "circuit_failures", 1)
        .set("routing", "circuit_cooldown_ms", 60_000);
    let fleet = replicas(&config, 3).await;
    let hi = || json!({"model": "chat", "messages": user("hi")});
    assert_eq!(
        served_by(&fleet[0].chat(hi()).await).0,
        "dear",
        "failed over"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    for gateway in &fleet[1..] {
        assert_eq!(served_by(&gateway.chat(hi()).await).0, "dear");
    }
    assert_eq!(cheap.hits(), 1, "one failure opened the circuit fleet-wide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployments_rpm_holds_for_the_whole_fleet() {
    let Some(redis) = Redis::start() else { return };
    let cheap = MockUpstream::openai().record(false).start().await;
    let dear = MockUpstream::openai().record(false).start().await;
    // The provider's quota on the cheap deployment: 4 a minute.
    let config = two_deployments_with(
        &cheap,
        &dear,
        &redis,
        Deployment::new("cheap", "m").set("rpm", 4),
    );
    let fleet = replicas(&config, 3).await;
    let hi = || json!({"model": "chat", "messages": user("hi")});
    let mut by = Vec::new();
    for i in 0..9 {
        by.push(served_by(&fleet[i % 3].chat(hi()).await).0);
    }
    assert_eq!(by.iter().filter(|b| *b == "cheap").count(), 4, "{by:?}");
    assert_eq!(cheap.hits(), 4);
}

/// A deployment at its quota on other replicas, which this replica's plan
/// cannot see, refuses the request when it is tried as the plan would
/// have: 429, with when it has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_full_on_other_replicas_is_a_429_when_tried() {
    let Some(redis) = Redis::start() else { return };
    let upstream = MockUpstream::openai().record(false).start().await;
    let config = shared(
        Config::new()
            .backend(Backend::upstream("api", "openai", &url(&upstream)))
            .model(
                Model::new("alone").deployment(
                    Deployment::new("api", "m")
                        .set("rpm", 2)
                        .set("context_window", 8192),
                ),
            )
            .admin(),
        &redis,
    );
    let fleet = replicas(&config, 2).await;
    let hi = || json!({"model": "alone", "messages": user("hi")});
    for _ in 0..2 {
        assert_eq!(fleet[0].chat(hi()).await.status(), 200);
    }
    let response = fleet[1].chat(hi()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-tollgate-attempts"], "0");
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let error = error_of(response).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        message(&error).contains("each was at its quota when tried"),
        "{error}"
    );
    assert_eq!(upstream.hits(), 2);
}

/// One call of the gateway's `sync.lua` as replica `replica`: an
/// exchange that seeds, on 2026-12-04, and applies and reads nothing but
/// what `ask` sets; what it answered.
async fn sync_call(
    connection: &mut redis::aio::MultiplexedConnection,
    replica: &str,
    ask: Value,
) -> Value {
    let script = redis::Script::new(concat!(
        include_str!("../src/store/lua/spend_log.lua"),
        include_str!("../src/store/lua/sync.lua")
    ));
    let mut payload = json!({
        "replica": replica, "lease": 30_000_000, "seed": [], "seeding": true, "batches": [],
        "renew": [], "push": [], "pull": [], "read": [], "sweep": [],
        "fields": ["d:2026-12-04", "m:2026-12"], "stale": [],
    });
    for (field, value) in ask.as_object().unwrap() {
        payload[field] = value.clone();
    }
    let reply: String = script
        .key("t:spend-version")
        .key("t:spend-changed")
        .key("t:replicas")
        .key(format!("t:applied:{replica}"))
        .arg(payload.to_string())
        .invoke_async(connection)
        .await
        .unwrap();
    serde_json::from_str(&reply).unwrap()
}

/// A batch numbered `number` that settles `cost` nano-dollars of `key` on
/// 2026-12-04.
fn settling(number: u64, key: &str, cost: &str) -> Value {
    json!([{"number": number, "charge": [], "settle": [[
        format!("t:key:{key}"), format!("t:key:{key}:leases"), "d:2026-12-04", "m:2026-12", cost, 0
    ]]}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_after_a_lost_reply_is_counted_once() {
    let Some(redis) = Redis::start() else { return };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    for (number, cost) in [(1, "500"), (1, "500"), (2, "70"), (1, "500")] {
        let batches = settling(number, "team", cost);
        sync_call(&mut connection, "r1", json!({"batches": batches})).await;
    }
    assert_eq!(
        redis.hash_int("t:key:team", "d:2026-12-04"),
        570,
        "batch 1 once, batch 2 once"
    );
}

/// The budget hashes an exchange read as changed since `since`: hash,
/// day's and month's spend, held; and where the log is now.
async fn changed_since(
    connection: &mut redis::aio::MultiplexedConnection,
    since: &Value,
) -> (Vec<Vec<String>>, Value, bool) {
    let reply = sync_call(connection, "r1", json!({"since": since})).await;
    let changed = serde_json::from_value(reply["changed"].clone()).unwrap_or_default();
    (changed, reply["version"].clone(), reply["reset"] == true)
}

fn spend_of(hash: &str, day: u64, held: u64) -> Vec<String> {
    vec![
        hash.into(),
        day.to_string(),
        day.to_string(),
        held.to_string(),
    ]
}

/// Every change of a key's spend or of what its requests hold is logged,
/// whichever script makes it, and an exchange reads exactly the keys
/// changed since its last read; from a log that began anew (Redis lost
/// its data) it reads everything the new log has, however far its count
/// got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_reads_the_budgets_changed_since_its_last_read_and_all_after_a_loss() {
    let Some(redis) = Redis::start() else { return };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    sync_call(&mut c, "r2", json!({"batches": settling(1, "a", "500")})).await;
    let read = json!({"read": ["t:key:a", "t:key:b"]});
    let first = sync_call(&mut c, "r1", read).await;
    assert_eq!(
        first["spent"],
        json!([["500", "500", "0"], ["0", "0", "0"]])
    );
    let start = first["version"].clone();
    let (changed, since, _) = changed_since(&mut c, &start).await;
    assert!(changed.is_empty());
    // Another replica settles more spend of `a`.
    sync_call(&mut c, "r2", json!({"batches": settling(2, "a", "100")})).await;
    let (changed, since, reset) = changed_since(&mut c, &since).await;
    assert_eq!(changed, [spend_of("t:key:a", 600, 0)]);
    assert!(!reset);
    // An admission reserves 300 of `b`, with a lease of a microsecond.
    let admit = redis::Script::new(concat!(
        include_str!("../src/store/lua/spend_log.lua"),
        include_str!("../src/store/lua/admit.lua")
    ));
    let granted: Vec<Vec<i64>> = admit
        .key("t:spend-version")
        .key("t:spend-changed")
        .key("t:key:b")
        .key("t:key:b:leases")
        .arg(&[
            "",
            "0",
            "",
            "0",
            "5",
            "d:2026-12-04",
            "-1",
            "m:2026-12",
            "-1",
        ])
        .arg(&["300", "300", "res-1", "1", "", "0"])
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(granted, [[0, 300, 0]]);
    let (changed, since, _) = changed_since(&mut c, &since).await;
    assert_eq!(
        changed,
        [spend_of("t:key:b", 0, 300)],
        "held, and `a` is not read"
    );
    // Its lease ran out; a sweep releases it.
    let sweep = json!({"sweep": [["t:key:b", "t:key:b:leases"]]});
    sync_call(&mut c, "r2", sweep).await;
    let (changed, since, _) = changed_since(&mut c, &since).await;
    assert_eq!(changed, [spend_of("t:key:b", 0, 0)]);
    // A sweep that releases nothing, a seed of a field already there and a
    // settlement of nothing change nothing.
    let nothing = json!({
        "sweep": [["t:key:a", "t:key:a:leases"]],
        "seed": [["t:key:a", "d:2026-12-04", "7"]],
        "batches": settling(3, "a", "0"),
    });
    sync_call(&mut c, "r2", nothing).await;
    let (changed, since, _) = changed_since(&mut c, &since).await;
    assert!(changed.is_empty(), "{changed:?}");
    // Redis loses its data; another replica seeds `a` and settles spend
    // of `c`, fifty times over: the log's count passes where r1 read.
    assert_eq!(redis.command("FLUSHALL").as_deref(), Some("+OK"));
    let seed =
        json!({"seed": [["t:key:a", "d:2026-12-04", "400"], ["t:key:a", "m:2026-12", "400"]]});
    sync_call(&mut c, "r2", seed).await;
    for number in 1..=50 {
        sync_call(&mut c, "r2", json!({"batches": settling(number, "c", "1")})).await;
    }
    let (mut changed, now, reset) = changed_since(&mut c, &since).await;
    assert!(reset, "the log began anew");
    assert!(
        now[1].as_str().unwrap().parse::<u64>().unwrap()
            > since[1].as_str().unwrap().parse().unwrap()
    );
    changed.sort();
    assert_eq!(
        changed,
        [spend_of("t:key:a", 400, 0), spend_of("t:key:c", 50, 0)]
    );
    let (changed, _, reset) = changed_since(&mut c, &now).await;
    assert!(changed.is_empty() && !reset);
}

/// Answers of 100 tokens, and a key with a budget far from spent, on
/// `redis` with `on_unavailable`.
fn outage(upstream: &MockServer, redis: &Redis, on_unavailable: &str) -> Config {
    shared(
        one_model(upstream).key(Key::new("team").set("budget_daily_usd", 10.0)),
        redis,
    )
    .set("state", "on_unavailable", on_unavailable)
}

/// An upstream whose answers are `tokens` long.
async fn answering(tokens: usize) -> MockServer {
    MockUpstream::openai()
        .answers_of(tokens)
        .record(false)
        .start()
        .await
}

/// The statuses of 20 requests at once, half streamed; none may hang.
async fn statuses(gateway: &Gateway) -> Vec<u16> {
    let started = Instant::now();
    let answers = join_all((0..20).map(|i| ask(gateway, "team", i % 2 == 0))).await;
    assert!(started.elapsed() < WAIT);
    answers.into_iter().map(|(s, _)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_refuse_mode_refuses_then_reconciles_and_a_replica_starts_without_it() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let upstream = answering(100).await;
    let config = outage(&upstream, &redis, "refuse");
    let first = start(&config).await;
    assert!(statuses(&first).await.iter().all(|s| *s == 200));
    redis.stop();
    let during = statuses(&first).await;
    assert!(during.iter().all(|s| *s == 200 || *s == 503), "{during:?}");
    assert!(during.contains(&503), "{during:?}");
    // A replica starts while Redis is down, degraded, and refuses too.
    let second = start(&config).await;
    assert!(statuses(&second).await.iter().all(|s| *s == 503));
    redis.start_again();
    let fleet = [first, second];
    eventually("both replicas serve again", || async {
        status(&fleet[0]).await["state"]["degraded"] == false
            && status(&fleet[1]).await["state"]["degraded"] == false
    })
    .await;
    for gateway in &fleet {
        assert!(statuses(gateway).await.iter().all(|s| *s == 200));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    ledgers_match_the_fleet(&redis, &fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_tpm_holds_for_the_whole_fleet_with_output_charged_after() {
    let Some(redis) = Redis::start() else { return };
    // One answer is 400 tokens: more than the key's whole minute.
    let upstream = answering(400).await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("tpm", 300)),
        &redis,
    );
    let fleet = replicas(&config, 2).await;
    assert_eq!(ask(&fleet[0], "team", true).await.0, 200);
    let refused = || async {
        fleet[1]
            .chat_as(
                "team-secret",
                json!({"model": "chat", "messages": user("hi")}),
            )
            .await
    };
    // The output reaches the shared cell with the next settlement.
    eventually("the other replica sees the key in debt", || async {
        let response = refused().await;
        response.status() == 429
            && response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 10
    })
    .await;
    // In debt, nothing is left, and the shared cell is full again only
    // when the debt is paid: 59 s after the request's 5 tokens fit (a
    // minute's 300 less those 5, at 5 a second).
    let response = refused().await;
    assert_eq!(header(&response, "x-ratelimit-limit-tokens"), "300");
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "0");
    let wait: f64 = header(&response, "retry-after-ms").parse().unwrap();
    let reset = go_duration::parse(header(&response, "x-ratelimit-reset-tokens")).unwrap();
    let past_wait = reset.as_secs_f64() - wait / 1000.0;
    assert!(
        (58.9..=59.1).contains(&past_wait),
        "{reset:?} after {wait} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_a_replica_spends_only_its_share_of_what_was_left() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    // $0.02 answers against a $0.10 budget, shared by two replicas.
    let upstream = answering(2_000).await;
    let config = a_tenth_of_a_dollar(&upstream, &redis).set("state", "on_unavailable", "local");
    let fleet = replicas(&config, 2).await;
    // The first spends $0.02 while Redis answers; both learn of it and of
    // each other.
    assert_eq!(ask(&fleet[0], "team", false).await.0, 200);
    eventually("both replicas see two replicas", || async {
        status(&fleet[0]).await["state"]["replicas"] == 2
            && status(&fleet[1]).await["state"]["replicas"] == 2
    })
    .await;
    let remaining = [("key", "team"), ("period", "daily")];
    eventually("the first knows what the fleet spent", || async {
        let left = metric(
            &fleet[0].metrics().await,
            "tollgate_budget_remaining_usd",
            &remaining,
        );
        left.is_some_and(|left| left < 0.0801)
    })
    .await;
    redis.stop();
    // Alone, the first may spend half of the $0.08 left: $0.04.
    let mut served = 0;
    for _ in 0..10 {
        let (status, code) = ask(&fleet[0], "team", false).await;
        match status {
            200 => served += 1,
            429 => assert_eq!(code.as_deref(), Some("insufficient_quota")),
            other => panic!("HTTP {other}"),
        }
    }
    let spent = fleet[0].spend("?key=team").await["total"]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!(served >= 2, "{served} served");
    assert!(
        spent <= 0.02 + 0.04 + 0.0001,
        "spent ${spent} in {served} answers while Redis was away: $0.02 before, at most its $0.04 share after"
    );
}

/// Waves of `wave` requests of `team` at once, until a whole wave is
/// refused for the budget used up: how many were served. A wave refused
/// for what requests hold (`budget_held`: another replica's request whose
/// settlement has not reached Redis yet) is followed by a pause, as the
/// refusal's `retry-after` asks, so that the hold can end.
async fn served_until_used_up(gateway: &Gateway, wave: usize) -> usize {
    let mut served = 0;
    for _ in 0..20 {
        let answers = join_all((0..wave).map(|i| ask(gateway, "team", i % 2 == 0))).await;
        let answered = served_of_wave(&answers);
        served += answered;
        if used_up(&answers) {
            return served;
        }
        if answered == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("the budget was never used up");
}

/// What a replica's ledger holds for `team`, in USD.
async fn ledger_of(gateway: &Gateway) -> f64 {
    ledgers_spent(std::slice::from_ref(gateway), "team").await
}

/// A replica restarted while Redis is away (a rolling deploy, an OOM
/// kill) takes up the share its last exchange gave it, kept in its
/// data_dir, and counts what it spent since from its ledger: killed and
/// started again, it spends no more than the rest of its share, and the
/// fleet stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_while_redis_is_away_spends_only_the_rest_of_its_share() {
    restarted_while_redis_is_away(|config| config, &[]).await;
}

/// The same with the PostgreSQL ledger, whose spool keeps what the
/// replica spent once its records are shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_the_postgres_ledger_restarted_while_redis_is_away_spends_only_the_rest_of_its_share()
 {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let url = postgres.url();
    let on_postgres = |config: Config| {
        config
            .set("ledger", "backend", "postgres")
            .set("ledger", "url_env", POSTGRES_URL_ENV)
    };
    restarted_while_redis_is_away(on_postgres, &[(POSTGRES_URL_ENV, &url)]).await;
}

/// `upstream`'s model shared through `redis`, and key `team` with a
/// daily budget of $0.10.
fn a_tenth_of_a_dollar(upstream: &MockServer, redis: &Redis) -> Config {
    shared(
        one_model(upstream).key(Key::new("team").set("budget_daily_usd", 0.10)),
        redis,
    )
}

const POSTGRES_URL_ENV: &str = "TOLLGATE_POSTGRES_URL";

/// Two replicas spend a budget through Redis; Redis stops; the first,
/// its ledger `ledger` in a data_dir (with `env`), spends half its share,
/// is killed and started again; both spend what they may.
async fn restarted_while_redis_is_away(ledger: impl Fn(Config) -> Config, env: &[(&str, &str)]) {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    // $0.02 answers against a $0.10 budget, shared by two replicas. With
    // many other budgeted keys, what moved is appended to the share kept
    // in the data_dir, not written whole.
    let upstream = answering(2_000).await;
    let config = many_budgets(a_tenth_of_a_dollar(&upstream, &redis), &[]).set(
        "state",
        "on_unavailable",
        "local",
    );
    let data = tempfile::tempdir().unwrap();
    let restartable = ledger(config.clone())
        .set("ledger", "data_dir", data.path().to_str().unwrap())
        .set("ledger", "flush_interval_ms", 50);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), restartable.to_toml()).unwrap();
    let secrets: Vec<(String, String)> = (0..300)
        .map(|i| (format!("KEY_K{i}"), format!("k{i}-secret")))
        .collect();
    let env: Vec<(&str, &str)> = (secrets.iter())
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(env.iter().copied())
        .collect();
    let env = env.as_slice();
    let mut first = replica_process(file.path(), env);
    let second = start(&config).await;
    let first_client = client_of(&first);
    assert_eq!(ask(&first_client, "team", false).await.0, 200);
    let fleet = [&first_client, &second];
    eventually(
        "both replicas know what the fleet spent, and of each other",
        || async {
            let mut all = true;
            for gateway in fleet {
                let left = metric(
                    &gateway.metrics().await,
                    "tollgate_budget_remaining_usd",
                    &[("key", "team"), ("period", "daily")],
                );
                all &= status(gateway).await["state"]["replicas"] == 2
                    && left.is_some_and(|left| left < 0.0801);
            }
            all
        },
    )
    .await;
    redis.stop();
    // Half of its $0.04 share, then it is killed; its ledger is written
    // every 50 ms.
    assert_eq!(ask(&first_client, "team", false).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // The share it restarts with is a journal: its whole first line, and
    // what moved since appended, Redis going away among it.
    let share = std::fs::read(data.path().join("tollgate-fleet-share.json")).unwrap();
    let lines = share
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert!(lines > 1, "{lines} line(s) in the share it restarts with");
    let again = replica_process(file.path(), env);
    let first_again = client_of(&again);
    assert_eq!(
        status(&first_again).await["state"]["budget_share"],
        "remembered"
    );
    let served_again = served_until_used_up(&first_again, 8).await;
    let served_second = served_until_used_up(&second, 8).await;
    // A PostgreSQL ledger reports what was shipped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (first_spent, second_spent) = (ledger_of(&first_again).await, ledger_of(&second).await);
    eprintln!(
        "restarted replica: {served_again} served after its restart, ${first_spent} in both lives; \
         the other: {served_second} served, ${second_spent}; the fleet: ${} of $0.10",
        first_spent + second_spent
    );
    assert!(served_again >= 1, "it still has half of its share");
    assert!(
        first_spent <= 0.02 + 0.04,
        "${first_spent}: $0.02 through Redis and at most its $0.04 share over both lives"
    );
    assert!(second_spent <= 0.04, "${second_spent}: at most its share");
    assert!(
        first_spent + second_spent <= 0.10,
        "the fleet spent ${}",
        first_spent + second_spent
    );
    // Once Redis answers, its count has what the first spent while it was
    // away in both lives, though the first life's queue died with it.
    redis.start_again();
    let fleet = [first_again, second];
    eventually("both replicas reconcile", || async {
        status(&fleet[0]).await["state"]["degraded"] == false
            && status(&fleet[1]).await["state"]["degraded"] == false
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    ledgers_match_the_fleet(&redis, &fleet).await;
    // What is left of the budget, a cent's hundredth, goes in answers cut
    // to fit, and no more.
    for gateway in &fleet {
        served_until_used_up(gateway, 8).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spent = ledgers_match_the_fleet(&redis, &fleet).await;
    assert!(spent <= 0.10, "the fleet spent ${spent}");
}

/// More keys with a budget than an exchange sweeps: `k0`…`k299`, $1 a
/// day each; those of `watched` have series of their own in `/metrics`.
fn many_budgets(config: Config, watched: &[usize]) -> Config {
    (0..300).fold(config, |config, i| {
        config.key(
            Key::new(&format!("k{i}"))
                .set("budget_daily_usd", 1.0)
                .set("metrics", watched.contains(&i)),
        )
    })
}

/// What `gateway` says is left of `key`'s daily budget, in USD.
async fn left_of(gateway: &Gateway, key: &str) -> Option<f64> {
    metric(
        &gateway.metrics().await,
        "tollgate_budget_remaining_usd",
        &[("key", key), ("period", "daily")],
    )
}

/// The replicas of `fleet` see each other and have exchanged since:
/// they read only what changes from then on.
async fn settled_in(fleet: &[&Gateway]) {
    eventually("the replicas see each other", || async {
        let mut all = true;
        for gateway in fleet {
            all &= status(gateway).await["state"]["replicas"] == fleet.len();
        }
        all
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
}

/// With more budgeted keys than an exchange sweeps, a replica that reads
/// only the keys whose spend changed still sees what another replica
/// spent on any of them, first, middle or last, within about an
/// exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sees_what_another_spent_on_any_of_many_budgeted_keys() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(100).await;
    let watched = [0, 150, 299];
    let config = shared(many_budgets(one_model(&upstream), &watched), &redis);
    let fleet = replicas(&config, 2).await;
    settled_in(&[&fleet[0], &fleet[1]]).await;
    for i in watched {
        let key = format!("k{i}");
        assert_eq!(left_of(&fleet[1], &key).await, Some(1.0));
        assert_eq!(ask(&fleet[0], &key, i % 2 == 0).await.0, 200);
        let spent = ledgers_spent(&fleet[..1], &key).await;
        assert!(spent > 0.0);
        let served = Instant::now();
        eventually("the other replica sees what it spent", || async {
            left_of(&fleet[1], &key)
                .await
                .is_some_and(|left| (left - (1.0 - spent)).abs() < 1e-9)
        })
        .await;
        let seen = served.elapsed();
        eprintln!("{key}: in the other replica's gauge {seen:?} after its answer");
        assert!(seen < Duration::from_secs(2), "{key} seen after {seen:?}");
    }
}

/// What a request of one replica holds of a budget, among many budgeted
/// keys, reaches the others: while Redis is away, another replica spends
/// only its share of what the fleet had left beside that reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_another_replica_holds_on_one_of_many_keys_counts_while_redis_is_away() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    // The first replica's stream starts and hangs, holding its
    // reservation; the second's answers are 100 tokens ($0.001).
    let held = MockUpstream::openai()
        .answers_of(50)
        .hold_after(2)
        .start()
        .await;
    let short = answering(100).await;
    let on = |upstream: &MockServer| {
        let config = a_tenth_of_a_dollar(upstream, &redis).set("state", "on_unavailable", "local");
        many_budgets(config, &[])
    };
    let (first, second) = (start(&on(&held)).await, start(&on(&short)).await);
    settled_in(&[&first, &second]).await;
    // $0.06 held of the $0.10.
    let body = json!({"model": "chat", "messages": user("hi"), "stream": true, "max_tokens": 6000});
    let in_flight = first.chat_as("team-secret", body).await;
    assert_eq!(in_flight.status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.stop();
    // The second may spend half of the $0.04 left: $0.02, twenty
    // answers; without the reservation it would take $0.05.
    let mut served = 0;
    for _ in 0..100 {
        match ask(&second, "team", false).await {
            (200, _) => served += 1,
            // Never `budget_held`: each answer is charged, and its
            // reservation freed, before its last byte goes out.
            (429, code) => {
                assert_eq!(code.as_deref(), Some("insufficient_quota"));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let spent = ledger_of(&second).await;
    assert!(served >= 10, "{served} served");
    assert!(
        spent <= 0.02 + 0.0011,
        "${spent} in {served} answers: at most its $0.02 share and one answer"
    );
    drop(in_flight);
    held.release();
}

/// A key a reload gives a budget is read at the next exchange with what
/// the fleet spent on it before, though nothing changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_reload_budgets_among_many_is_read_with_what_the_fleet_spent_on_it() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(100).await;
    let late = |budget: bool| {
        let key = Key::new("late").set("metrics", true);
        let key = if budget {
            key.set("budget_daily_usd", 1.0)
        } else {
            key
        };
        shared(many_budgets(one_model(&upstream), &[]).key(key), &redis)
    };
    let first = start(&late(true)).await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), late(false).to_toml()).unwrap();
    let second = start_from_file(file.path()).await;
    settled_in(&[&first, &second]).await;
    assert_eq!(ask(&first, "late", false).await.0, 200);
    let spent = ledgers_spent(std::slice::from_ref(&first), "late").await;
    eventually("the fleet counts what it spent", || async {
        fleet_spent(&redis, "late") == (spent * 1e9).round() as i64
    })
    .await;
    // Exchanges of the second that see the change and ignore it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(left_of(&second, "late").await, None, "no budget yet");
    let reloaded = second
        .post("/admin/reload")
        .bearer_auth(ADMIN_TOKEN)
        .body(late(true).to_toml())
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    eventually("the reloaded replica reads the key's spend", || async {
        left_of(&second, "late")
            .await
            .is_some_and(|left| (left - (1.0 - spent)).abs() < 1e-9)
    })
    .await;
}

/// The same with more budgeted keys than an exchange sweeps, each read
/// only when it changed: after the loss, every replica's budgets show
/// the seeded counts, and then what is spent on top of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_lost_its_data_is_seeded_again_and_read_by_what_changes_with_many_budgeted_keys()
{
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(100).await;
    let config = shared(many_budgets(one_model(&upstream), &[0, 299]), &redis);
    let fleet = replicas(&config, 2).await;
    settled_in(&[&fleet[0], &fleet[1]]).await;
    // The fleet's count, the ledgers' and what the second replica shows
    // agree on `key`.
    let in_step = |key: &'static str| {
        let (fleet, redis) = (&fleet, &redis);
        async move {
            let spent = ledgers_spent(fleet, key).await;
            let counted = redis.hash_int(&format!("{PREFIX}key:{key}"), &format!("d:{}", today()));
            let left = left_of(&fleet[1], key).await;
            counted == (spent * 1e9).round() as i64
                && left.is_some_and(|left| (left - (1.0 - spent)).abs() < 1e-9)
        }
    };
    assert_eq!(ask(&fleet[0], "k299", false).await.0, 200);
    eventually("the fleet knows what was spent", || in_step("k299")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(redis.command("FLUSHALL").as_deref(), Some("+OK"));
    assert_eq!(ask(&fleet[0], "k299", false).await.0, 200);
    eventually("seeded again, and counted on", || in_step("k299")).await;
    assert_eq!(ask(&fleet[0], "k0", false).await.0, 200);
    eventually("what changes next is read", || in_step("k0")).await;
    assert!(in_step("k299").await);
}

/// A replica that starts while Redis is away has no share of a budget to
/// go by: it refuses budgeted requests as `on_unavailable = "refuse"`
/// would, serves the others, and serves budgeted ones once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_away_refuses_budgeted_requests_until_it_answers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    redis.stop();
    let upstream = answering(100).await;
    let config = outage(&upstream, &redis, "local")
        .key(Key::new("free"))
        .key(Key::new("limited").set("rpm", 100));
    let gateway = start(&config).await;
    let response = gateway
        .chat_as(
            "team-secret",
            json!({"model": "chat", "messages": user("hi")}),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    let error = error_of(response).await;
    assert_eq!(error["code"], "state_unavailable");
    assert!(
        message(&error).contains("has not learned what the fleet spent"),
        "{}",
        message(&error)
    );
    assert_eq!(ask(&gateway, "team", true).await.0, 503, "streamed too");
    assert_eq!(ask(&gateway, "free", false).await.0, 200, "no budget");
    assert_eq!(ask(&gateway, "limited", false).await.0, 200, "limits only");
    let state = &status(&gateway).await["state"];
    assert_eq!(
        (&state["degraded"], &state["budget_share"]),
        (&json!(true), &json!("none"))
    );
    redis.start_again();
    eventually(
        "budgeted requests are served once Redis answers",
        || async { ask(&gateway, "team", false).await.0 == 200 },
    )
    .await;
    assert_eq!(status(&gateway).await["state"]["budget_share"], "exchanged");
}

/// A remembered share cut short (a disk that filled, a file written by
/// hand) is no share: a warning says so, budgeted requests wait for
/// Redis, and the next exchange writes it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_share_cut_short_is_ignored_with_a_warning() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    redis.stop();
    let upstream = answering(100).await;
    let data = tempfile::tempdir().unwrap();
    let remembered = data.path().join("tollgate-fleet-share.json");
    std::fs::write(&remembered, r#"{"version":1,"day":"2026-12-0"#).unwrap();
    let config =
        outage(&upstream, &redis, "local").set("ledger", "data_dir", data.path().to_str().unwrap());
    let (replica, _file) = doomed_replica(&config);
    let warning = replica.logged("cannot be read");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("tollgate-fleet-share.json"), "{warning}");
    let gateway = client_of(&replica);
    assert_eq!(
        ask(&gateway, "team", false).await,
        (503, Some("state_unavailable".to_owned()))
    );
    assert_eq!(status(&gateway).await["state"]["budget_share"], "none");
    redis.start_again();
    eventually(
        "budgeted requests are served once Redis answers",
        || async { ask(&gateway, "team", false).await.0 == 200 },
    )
    .await;
    eventually("what the exchange learned is written whole", || async {
        // Its first line names every key.
        let text = std::fs::read(&remembered).unwrap_or_default();
        let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
        serde_json::from_slice::<Value>(first).is_ok_and(|v| v["keys"]["team"].is_object())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_a_replicas_own_limits_go_on_from_what_it_used() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let upstream = MockUpstream::openai().record(false).start().await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("rpm", 3)),
        &redis,
    );
    let gateway = start(&config).await;
    for _ in 0..3 {
        assert_eq!(ask(&gateway, "team", false).await.0, 200);
    }
    redis.stop();
    let (status, code) = ask(&gateway, "team", false).await;
    assert_eq!(
        (status, code.as_deref()),
        (429, Some("rate_limit_exceeded")),
        "the three requests admitted through Redis count here too"
    );
    assert_eq!(self::status(&gateway).await["state"]["degraded"], true);
    // What the replica's own limit knows is what it says.
    let response = gateway
        .chat_as(
            "team-secret",
            json!({"model": "chat", "messages": user("hi")}),
        )
        .await;
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
}

#[tokio::test]
async fn status_is_behind_the_admin_token_and_says_where_state_lives() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = start(&one_model(&upstream)).await;
    for token in [None, Some("not-the-token")] {
        let mut request = gateway.http.get(format!("{}/admin/status", gateway.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "{token:?}");
    }
    let state = &status(&gateway).await["state"];
    assert_eq!(
        *state,
        json!({"backend": "memory", "degraded": false, "replicas": 1})
    );
    let without_admin =
        start(&Config::new().backend(Backend::upstream("api", "openai", &url(&upstream)))).await;
    let response = without_admin
        .http
        .get(format!("{}/admin/status", without_admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "no admin token configured");
}

// ---- prefix memory, fleet-wide -------------------------------------------

/// Alias `chat` with prefix affinity over four simulated deployments,
/// `sim0`..`sim3` (each on a backend of its name), answering at once.
fn four_simulated(redis: &Redis) -> Config {
    let mut config = Config::new();
    let mut model = Model::new("chat").affinity("prefix");
    for i in 0..4 {
        let name = format!("sim{i}");
        config = config.backend(Backend::simulated(&name).answers(1, 10_000, 8));
        model = model.deployment(Deployment::named(&name, &name));
    }
    shared(config.model(model).admin(), redis)
}

const SYSTEM: &str = "You are a careful assistant for a GPU fleet. Answer in one sentence, \
    naming the machines you mean, and say when you are unsure.";

fn said(role: &str, text: &str) -> Value {
    json!({"role": role, "content": text})
}

fn conversation(messages: &[Value]) -> Value {
    json!({"model": "chat", "messages": messages})
}

/// Sends one turn in session `session`: the deployment that served it
/// (each is alone on its backend) and its answer, as the next turn
/// sends it back.
async fn turn(gateway: &Gateway, session: &str, messages: &[Value]) -> (String, Value) {
    let response = gateway
        .post("/v1/chat/completions")
        .header("x-session-id", session)
        .json(&conversation(messages))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (backend, _) = served_by(&response);
    let body: Value = response.json().await.unwrap();
    (backend, body["choices"][0]["message"].clone())
}

/// [`turn`] once `gateway` would send it to `home`: a deployment counts a
/// request until the gateway has written its last byte, which can be
/// after the client has read it, and at its share of the load it takes
/// no more, so a turn sent at once can find its deployment one busier.
async fn turn_at(
    gateway: &Gateway,
    home: &str,
    session: &str,
    messages: &[Value],
) -> (String, Value) {
    gateway
        .explain_until(explain_ask(session, messages), |e| e["chosen"] == home)
        .await;
    turn(gateway, session, messages).await
}

fn explain_ask(session: &str, messages: &[Value]) -> Value {
    json!({"request": conversation(messages), "session": session})
}

/// The deployment `gateway` would choose for `messages` in `session`.
async fn chosen(gateway: &Gateway, session: &str, messages: &[Value]) -> String {
    let explained = gateway.explain(explain_ask(session, messages)).await;
    explained["chosen"].as_str().unwrap().to_owned()
}

/// A session in which `gateway` binds `messages` to another deployment
/// than `not`: sessions bind by hash, so the test does not depend on
/// which deployment a name hashes to.
async fn session_away_from(gateway: &Gateway, not: &str, messages: &[Value]) -> String {
    for k in 0..64 {
        let session = format!("first-{k}");
        if chosen(gateway, &session, messages).await != not {
            return session;
        }
    }
    panic!("every session binds to {not}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_next_turn_on_another_replica_goes_where_its_prefix_is() {
    let Some(redis) = Redis::start() else { return };
    let config = four_simulated(&redis);
    let (a, b) = (start(&config).await, start(&config).await);
    // Turn 4 goes to B in a session of its own, which binds, by itself,
    // elsewhere than turns 1 to 3 went on A: only the shared prefix
    // memory can take it to their deployment.
    let elsewhere = chosen(&b, "turn-4", &[said("user", "probe")]).await;
    let mut messages = vec![said("system", SYSTEM), said("user", "Which GPUs are idle?")];
    let first = session_away_from(&a, &elsewhere, &messages).await;
    let (home, mut answer) = turn(&a, &first, &messages).await;
    for (n, question) in [(2, "And which are busy?"), (3, "Which one is the coolest?")] {
        messages.extend([answer, said("user", question)]);
        let (served, next) = turn_at(&a, &home, &format!("turn-{n}"), &messages).await;
        assert_eq!(served, home, "turn {n} follows its prefix on A");
        answer = next;
    }
    let routed = Instant::now();
    messages.extend([answer, said("user", "Book it for tomorrow.")]);
    let explained = b
        .explain_until(explain_ask("turn-4", &messages), |e| {
            e["chosen"] == home.as_str()
        })
        .await;
    eprintln!(
        "replica B took up the prefix replica A routed {} ms after A routed it",
        routed.elapsed().as_millis()
    );
    assert!(
        explained["affinity"]["prefix_tokens"].as_u64().unwrap() > 0,
        "{explained:#}"
    );
    let (served, _) = turn(&b, "turn-4", &messages).await;
    assert_eq!(served, home);
    assert_ne!(served, elsewhere);

    // In Redis: one sorted set per deployment, under the state prefix,
    // that ends an hour after its last addition.
    let key = format!("{PREFIX}prefix:{home}");
    let held = redis.command(&format!("ZCARD {key}")).unwrap();
    assert!(
        held.trim_start_matches(':').parse::<u64>().unwrap() > 0,
        "{held}"
    );
    let ttl = redis.command(&format!("PTTL {key}")).unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').parse().unwrap();
    assert!((1..=3_600_000).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_prefix_memory_keeps_the_newest_blocks_up_to_prefix_blocks() {
    let Some(redis) = Redis::start() else { return };
    let config = four_simulated(&redis).set("routing", "prefix_blocks", 8);
    let a = start(&config).await;
    // Each prompt is a few blocks of its own; 20 of them are many more
    // than the 8 a deployment keeps.
    for n in 0..20 {
        let question = format!("Question {n}: {SYSTEM}");
        turn(&a, "s", &[said("user", &question)]).await;
    }
    eventually("the blocks reach Redis", || async {
        (0..4).any(|i| {
            redis
                .command(&format!("EXISTS {PREFIX}prefix:sim{i}"))
                .as_deref()
                == Some(":1")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..4 {
        let held = redis
            .command(&format!("ZCARD {PREFIX}prefix:sim{i}"))
            .unwrap();
        let held: u64 = held.trim_start_matches(':').parse().unwrap();
        assert!(held <= 8, "sim{i} holds {held} blocks");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_prefixes_route_locally_and_reach_the_fleet_when_it_is_back() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let config = four_simulated(&redis);
    let (a, b) = (start(&config).await, start(&config).await);
    let elsewhere = chosen(&b, "turn-3", &[said("user", "probe")]).await;
    redis.stop();
    eventually("A reports itself degraded", || async {
        status(&a).await["state"]["degraded"] == true
    })
    .await;
    // A routes by its own memory, and no request waits on Redis.
    let mut messages = vec![said("system", SYSTEM), said("user", "Which GPUs are idle?")];
    let first = session_away_from(&a, &elsewhere, &messages).await;
    let (home, answer) = turn(&a, &first, &messages).await;
    messages.extend([answer, said("user", "And which are busy?")]);
    let (served, answer) = turn_at(&a, &home, "turn-2", &messages).await;
    assert_eq!(served, home, "A's own memory holds the prefix");
    messages.extend([answer, said("user", "Book it for tomorrow.")]);
    assert_eq!(
        chosen(&b, "turn-3", &messages).await,
        elsewhere,
        "B cannot know yet"
    );
    // What A routed waits in its queue through A's exchanges that fail
    // (every 250 ms, each within 1 s), and goes out once Redis is back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.start_again();
    b.explain_until(explain_ask("turn-3", &messages), |e| {
        e["chosen"] == home.as_str()
    })
    .await;
    let (served, _) = turn(&b, "turn-3", &messages).await;
    assert_eq!(served, home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_requests_hold_the_fleets_budget_and_their_cancelled_prompts_reach_it() {
    let Some(redis) = Redis::start() else { return };
    // The cheap deployment is slow to its first byte: every request is
    // hedged to the dear one, which answers 500 tokens ($0.0025) at once.
    let slow = MockUpstream::openai()
        .answers_of(500)
        .first_byte_after(Duration::from_secs(1))
        .record(false)
        .start()
        .await;
    let fast = answering(500).await;
    let budget = 0.05;
    let config = shared(
        Config::new()
            .backend(Backend::upstream("cheap", "openai", &url(&slow)))
            .backend(Backend::upstream("dear", "openai", &url(&fast)))
            .model(
                Model::new("chat")
                    .hedge_after(50, 0.01)
                    .deployment(Deployment::new("cheap", "m").price(0.1, 0.1))
                    .deployment(Deployment::new("dear", "m").price(5.0, 5.0)),
            )
            .key(Key::new("team").set("budget_daily_usd", budget))
            .admin(),
        &redis,
    )
    .set("state", "timeout_ms", 2_000);
    let fleet = replicas(&config, 3).await;
    for _ in 0..8 {
        let fleet = &fleet;
        let answers = join_all((0..60).map(|i| async move {
            let body = json!({"model": "chat", "messages": user("hi"),
                              "stream": i % 2 == 0, "max_tokens": 500});
            let response = fleet[i % 3].chat_as("team-secret", body).await;
            (response.status().as_u16(), error_of_any(response).await)
        }))
        .await;
        for (status, code) in &answers {
            assert!(
                *status == 200
                    || (*status == 429
                        && matches!(code.as_deref(), Some("budget_held" | "insufficient_quota"))),
                "{status} {code:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The cancelled attempts' prompts are in the fleet's count as in the
    // ledgers.
    let spent = ledgers_match_the_fleet(&redis, &fleet).await;
    eprintln!("hedged: ${spent:.6} spent of ${budget}");
    // Each request reserves its worst case at the dear deployment
    // ($0.0025) and the hedge's allowance beside it ($0.01); the last
    // of the budget holds first attempts without a hedge.
    assert!(
        spent > 0.5 * budget && spent <= budget,
        "${budget} budget: the fleet spent ${spent}"
    );
    let mut won = 0.0;
    for gateway in &fleet {
        let text = gateway.metrics().await;
        won += metric(
            &text,
            "tollgate_hedges_total",
            &[("alias", "chat"), ("outcome", "hedge_won")],
        )
        .unwrap_or(0.0);
    }
    assert!(won >= 5.0, "hedges won: {won}");
}

/// A busy key of the fleet: limits and a budget far from reached, so that
/// credit is granted. `rpm` 6,000 is 10 ms of the shared cell a request.
fn busy(upstream: &MockServer, redis: &Redis, budget: f64) -> Config {
    shared(
        one_model(upstream).key(
            Key::new("team")
                .set("rpm", 6_000)
                .set("tpm", 6_000_000)
                .set("budget_daily_usd", budget),
        ),
        redis,
    )
}

/// A request of at most 20 output tokens: its reservation is its worst
/// case, $0.000205 for "hi".
async fn ask_short(gateway: &Gateway) -> (u16, Option<String>) {
    let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 20});
    let response = gateway.chat_as("team-secret", body).await;
    let status = response.status().as_u16();
    (status, error_of_any(response).await)
}

/// Admissions the fleet decided from credit and in Redis, summed over the
/// replicas.
async fn admissions(fleet: &[Gateway]) -> (f64, f64) {
    let mut sums = (0.0, 0.0);
    for gateway in fleet {
        let text = gateway.metrics().await;
        let from = |from| metric(&text, "tollgate_state_admissions_total", &[("from", from)]);
        sums.0 += from("credit").unwrap_or(0.0);
        sums.1 += from("redis").unwrap_or(0.0);
    }
    sums
}

/// Redis's clock, in microseconds.
async fn redis_now(connection: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(connection).await.unwrap();
    secs * 1_000_000 + micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_is_admitted_from_credit_and_the_fleet_takes_one_cell_a_request() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(20).await;
    let fleet = replicas(&busy(&upstream, &redis, 100.0), 3).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let start = redis_now(&mut connection).await;
    let mut served = 0;
    for _ in 0..40 {
        let answers = join_all((0..30).map(|i| ask_short(&fleet[i % 3]))).await;
        for (status, code) in &answers {
            assert_eq!(*status, 200, "{code:?}");
        }
        served += answers.len() as i64;
    }
    let (credit, in_redis) = admissions(&fleet).await;
    assert_eq!(
        credit + in_redis,
        served as f64,
        "every admission counted once"
    );
    assert!(
        credit > in_redis,
        "{credit} admissions from credit, {in_redis} in Redis"
    );
    // Once idle, every credit is given back: its unused cells refunded and
    // its budget released, so the fleet holds nothing, has spent what the
    // ledgers hold, and its rpm cell is one request's 10 ms ahead of where
    // it began for each request served (from the first admission, a few
    // ms after `start`; credit unrefunded would be hundreds of cells).
    let home = format!("{PREFIX}key:team");
    eventually("the credits are given back", || async {
        redis.hash_int(&home, "=") == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let full_at = redis.hash_int(&home, "rpm:6000");
    let now = redis_now(&mut connection).await;
    assert!(full_at > now, "the cell is still ahead of the clock");
    let taken = full_at - start;
    assert!(
        (served * 10_000..served * 10_000 + 50_000).contains(&taken),
        "{served} requests, {taken} µs of the cell taken; {credit} admissions from credit, {in_redis} in Redis"
    );
    ledgers_match_the_fleet(&redis, &fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_never_takes_the_fleet_past_its_budget_and_comes_back_when_idle() {
    let Some(redis) = Redis::start() else { return };
    // 20-token answers: $0.000211 each (the upstream counts 11 prompt
    // tokens where the gateway estimates 5); $0.05 pays for about 237.
    let upstream = answering(20).await;
    let budget = 0.05;
    let config = busy(&upstream, &redis, budget).set("state", "timeout_ms", 2_000);
    let fleet = replicas(&config, 3).await;
    let mut served = 0;
    let mut spent_all = false;
    for _ in 0..100 {
        let answers = join_all((0..30).map(|i| ask_short(&fleet[i % 3]))).await;
        served += served_of_wave(&answers);
        // Used up: what credit held unused was given back, and nothing is
        // left for even one request.
        if used_up(&answers) {
            spent_all = true;
            break;
        }
        if served > 180 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert!(spent_all, "the budget was never used up");
    let (credit, _) = admissions(&fleet).await;
    assert!(credit > 0.0, "no admission was made from credit");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spent = ledgers_match_the_fleet(&redis, &fleet).await;
    // Within the budget: each request reserves the most its prompt can be.
    assert!(
        spent <= budget,
        "$0.05 budget: the fleet spent ${spent} in {served} answers"
    );
    assert!(
        spent >= budget - 0.000211,
        "$0.05 budget: the fleet spent only ${spent} in {served} answers"
    );
    assert_eq!(redis.hash_int(&format!("{PREFIX}key:team"), "="), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_credit_is_freed_within_the_lease() {
    let Some(redis) = Redis::start() else { return };
    // Streams that start and then hang: what they drew stays drawn.
    let upstream = MockUpstream::openai()
        .answers_of(50)
        .hold_after(2)
        .start()
        .await;
    let config = busy(&upstream, &redis, 1.0).set("state", "lease_ms", 2_000);
    let (mut doomed, _file) = doomed_replica(&config);
    let survivor = start(&config).await;
    let client = reqwest::Client::new();
    // One after another, so that the key is busy on the doomed replica
    // and its later requests draw on the credit an earlier one took.
    let mut in_flight = Vec::new();
    for _ in 0..12 {
        let response = client
            .post(format!("{}/v1/chat/completions", doomed.base))
            .bearer_auth("team-secret")
            .json(
                &json!({"model": "chat", "messages": user("hi"), "stream": true, "max_tokens": 20}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        in_flight.push(response);
    }
    let text = client
        .get(format!("{}/metrics", doomed.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let from_credit = metric(
        &text,
        "tollgate_state_admissions_total",
        &[("from", "credit")],
    );
    assert!(
        from_credit.is_some_and(|n| n >= 1.0),
        "no request drew on credit: {from_credit:?}"
    );
    // The credit holds more than its requests: the budget's held part is
    // beyond the twelve requests' $0.000205 each.
    let home = format!("{PREFIX}key:team");
    let held = redis.hash_int(&home, "=");
    assert!(held > 12 * 205_000, "held {held}");
    doomed.child.kill().unwrap();
    let killed = Instant::now();
    drop(in_flight);
    upstream.release();
    // The survivor's exchanges release what the dead replica's leases
    // held once they expire.
    eventually("the dead replica's credit expires", || async {
        redis.hash_int(&home, "=") == 0
    })
    .await;
    let freed = killed.elapsed();
    assert!(
        freed < Duration::from_secs(4),
        "freed after {freed:?}; the lease is 2 s"
    );
    assert_eq!(ask_short(&survivor).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_a_keys_rpm_admits_no_more_than_the_quota_with_credit_in_play() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(5).await;
    // 300 a minute: a request frees a slot every 200 ms.
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("rpm", 300)),
        &redis,
    );
    let fleet = replicas(&config, 3).await;
    let started = Instant::now();
    let mut served = 0;
    for _ in 0..40 {
        let answers = join_all((0..30).map(|i| ask(&fleet[i % 3], "team", false))).await;
        for (status, code) in &answers {
            assert!(*status == 200 || *status == 429, "{status} {code:?}");
        }
        served += answers.iter().filter(|(s, _)| *s == 200).count();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (credit, _) = admissions(&fleet).await;
    assert!(credit > 0.0, "no admission was made from credit");
    // The minute's 300, and one more for each 200 ms the burst lasted.
    let most = 300 + (elapsed / 0.2).ceil() as usize;
    assert!(
        served <= most,
        "{served} of 1,200 served in {elapsed:.1} s; rpm 300 allows {most}"
    );
    assert!(served >= 250, "only {served} served: credit left stranded");
}

/// `one_model` with a key `team` of `rpm`, on `redis` over TLS, trusting
/// `ca` and showing `client`'s certificate if given.
fn over_tls(
    upstream: &MockServer,
    redis: &Redis,
    rpm: u32,
    ca: &TestCa,
    client: Option<&ClientFiles>,
) -> Config {
    let mut config = one_model(upstream)
        .key(Key::new("team").set("rpm", rpm))
        .set("state", "backend", "redis")
        .set("state", "url", redis.tls_url())
        .set("state", "ca_file", ca.ca_file().to_str().unwrap())
        .set("state", "prefix", PREFIX)
        .set("state", "timeout_ms", 1_000);
    if let Some(client) = client {
        config = config
            .set("state", "cert_file", client.cert.to_str().unwrap())
            .set("state", "key_file", client.key.to_str().unwrap());
    }
    config
}

/// Replicas reach Redis over TLS (`rediss://`, its CA in `ca_file`) and
/// share a key's rpm through it. A replica that trusts another CA never
/// talks to that server: it serves on its own state, degraded, as with
/// Redis away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_over_tls_only_with_a_server_whose_certificate_verifies() {
    let ca = TestCa::new("redis");
    let Some(redis) = Redis::start_tls(ServerTls::Server(&ca)) else {
        return;
    };
    let upstream = MockUpstream::openai().record(false).start().await;
    let over_tls = |ca: &TestCa| over_tls(&upstream, &redis, 4, ca, None);
    let fleet = replicas(&over_tls(&ca), 2).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(ask(&fleet[i % 2], "team", false).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
    for gateway in &fleet {
        assert_eq!(status(gateway).await["state"]["degraded"], false);
    }

    let other = TestCa::new("other");
    let doubting = start(&over_tls(&other)).await;
    eventually("the replica that trusts another CA is degraded", || async {
        status(&doubting).await["state"]["degraded"] == true
    })
    .await;
    // It serves from its own state: the fleet's rpm is used up.
    assert_eq!(ask(&doubting, "team", false).await.0, 200);
    assert_eq!(ask(&fleet[0], "team", false).await.0, 429);
}

/// A Redis that lets TLS clients in only with a certificate its CA signed
/// shares state with a replica that has one (`cert_file`, `key_file`) and
/// not with one that has none, which serves degraded on its own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let ca = TestCa::new("mutual");
    let Some(redis) = Redis::start_tls(ServerTls::ClientsCertified(&ca)) else {
        return;
    };
    let upstream = MockUpstream::openai().record(false).start().await;
    let client = ca.client();
    let over_tls = |with_certificate: bool| {
        over_tls(
            &upstream,
            &redis,
            2,
            &ca,
            with_certificate.then_some(&client),
        )
    };
    let certified = replicas(&over_tls(true), 2).await;
    let statuses = [
        ask(&certified[0], "team", false).await.0,
        ask(&certified[1], "team", false).await.0,
        ask(&certified[0], "team", false).await.0,
    ];
    assert_eq!(statuses, [200, 200, 429], "rpm = 2 across the two");
    let anonymous = start(&over_tls(false)).await;
    eventually("the replica without a certificate is degraded", || async {
        status(&anonymous).await["state"]["degraded"] == true
    })
    .await;
    assert_eq!(ask(&anonymous, "team", false).await.0, 200);
}

/// A client that sends each request once it has the last one's answer,
/// to `replicas` in turn, against a $0.015 budget that holds one request's
/// reservation ($0.010082: the most "hi" can be and 1,000 tokens of
/// output) beside what is spent and never two; each answer costs about
/// $0.00002. Returns the requests served and those told `budget_held`
/// before the budget was spent.
async fn one_by_one_to_the_budget_edge(replicas: usize) -> (usize, usize) {
    let Some(redis) = Redis::start() else {
        return (0, 0);
    };
    let upstream = answering(1).await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("budget_daily_usd", 0.015)),
        &redis,
    );
    let mut fleet = Vec::new();
    for _ in 0..replicas {
        fleet.push(start(&config).await);
    }
    settled_in(&fleet.iter().collect::<Vec<_>>()).await;
    let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 1000});
    let (mut served, mut held) = (0, 0);
    for turn in 0.. {
        match ask_with(&fleet[turn % replicas], "team", body.clone()).await {
            (200, _) => served += 1,
            (429, code) if code.as_deref() == Some("budget_held") => held += 1,
            (429, code) => {
                assert_eq!(code.as_deref(), Some("insufficient_quota"));
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(turn < 2_000, "{served} served, {held} held");
    }
    let spent = ledgers_spent(&fleet, "team").await;
    eprintln!("{replicas} replicas: {served} served, {held} told to retry, ${spent:.6} spent");
    assert!(spent <= 0.015 && 0.015 - spent < 0.010082, "${spent}");
    (served, held)
}

/// The replica that served the answer releases its reservation in Redis
/// before admitting the next request: sent at once, and waited for by a
/// request that finds the budget held while its release is unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_each_answer_is_never_told_to_retry_by_one_replica() {
    let (served, held) = one_by_one_to_the_budget_edge(1).await;
    assert_eq!(held, 0, "{served} served");
}

/// The release is sent as the answer's last bytes are, and the client's
/// next request may reach Redis through the other replica before it: the
/// other replica asks again once, after a short wait, and finds it
/// released (none of 235 in eight runs here, four of them with both
/// cores busy; without the second ask, none to six; a client that
/// alternated was told to retry every other time while releases waited
/// 20 ms to go with others). A release slower than the wait still tells
/// the client to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_each_answer_is_rarely_told_to_retry_by_two_replicas() {
    let (served, held) = one_by_one_to_the_budget_edge(2).await;
    assert!(
        held * 50 <= served,
        "{held} told to retry of {served} served"
    );
}

/// A key's hash outlives its last write by 40 days, longer than any month
/// whose spend it keeps, and then leaves the log of changes too: keys no
/// config names any more leave nothing in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_state_in_redis_ends_40_days_after_its_last_write() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(1).await;
    let config = shared(
        one_model(&upstream)
            .key(Key::new("team").set("budget_daily_usd", 1.0))
            .key(Key::new("gone").set("budget_daily_usd", 1.0)),
        &redis,
    );
    let gateway = start(&config).await;
    settled_in(&[&gateway]).await;
    let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 100});
    for key in ["team", "gone"] {
        assert_eq!(ask_with(&gateway, key, body.clone()).await.0, 200);
    }
    settled_in(&[&gateway]).await;
    let int = |reply: Option<String>| -> Option<i64> { reply?.strip_prefix(':')?.parse().ok() };
    let home = |key: &str| format!("{PREFIX}key:{key}");
    let logged = |key: &str| {
        redis
            .command(&format!("ZSCORE {PREFIX}spend-changed {}", home(key)))
            .is_some_and(|reply| reply != "$-1")
    };
    const DAYS_40_MS: i64 = 40 * 86_400_000;
    for key in ["team", "gone"] {
        let ttl = int(redis.command(&format!("PTTL {}", home(key)))).unwrap();
        assert!(
            (DAYS_40_MS - 60_000..=DAYS_40_MS).contains(&ttl),
            "{key}: {ttl} ms"
        );
        assert!(logged(key), "{key} is in the log of changes");
    }
    // As if 40 days had passed without a write to it.
    redis.command(&format!("DEL {}", home("gone")));
    eventually("the exchange drops it from the log", || async {
        !logged("gone")
    })
    .await;
    assert!(logged("team"));
}

/// Redis that answers an admission after `timeout_ms`, when the replica
/// has gone on without it, still runs it: what it reserved is released
/// once it answers, not when its lease ends (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_redis_makes_after_the_replica_stopped_waiting_is_released() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(1).await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("budget_daily_usd", 1.0)),
        &redis,
    )
    .set("state", "timeout_ms", 200);
    let gateway = start(&config).await;
    settled_in(&[&gateway]).await;
    let home = format!("{PREFIX}key:team");
    let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 100});
    // One admitted through Redis first, so that Redis has the script the
    // late call runs.
    assert_eq!(ask_with(&gateway, "team", body.clone()).await.0, 200);
    settled_in(&[&gateway]).await;
    redis.freeze(true);
    assert_eq!(
        ask_with(&gateway, "team", body).await.0,
        200,
        "served on the replica's share"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.freeze(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = redis.hash_int(&home, "=");
    eprintln!("held {held} 300 ms after the thaw");
    assert_eq!(held, 0);
}

/// A request whose client leaves while Redis has its admission holds
/// nothing once Redis answers: what it reserved is released at once, not
/// when its lease ends (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_during_its_admission_holds_nothing_after() {
    let Some(redis) = Redis::start() else { return };
    let upstream = answering(1).await;
    let config = shared(
        one_model(&upstream).key(Key::new("team").set("budget_daily_usd", 1.0)),
        &redis,
    );
    let gateway = start(&config).await;
    settled_in(&[&gateway]).await;
    let home = format!("{PREFIX}key:team");
    // Redis takes the admission once it is thawed, after the client left.
    redis.freeze(true);
    let body = json!({"model": "chat", "messages": user("hi"), "max_tokens": 100});
    let gone = gateway
        .post("/v1/chat/completions")
        .bearer_auth("team-secret")
        .json(&body)
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gone.is_err(), "the client left before an answer");
    tokio::time::sleep(Duration::from_millis(350)).await;
    redis.freeze(false);
    // Thawed, Redis may read this test's own connection before the
    // gateway's: the admission is given time to run first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = redis.hash_int(&home, "=");
    eprintln!(
        "held {held} 300 ms after; upstream called {} times",
        upstream.hits()
    );
    assert_eq!(held, 0);
}
