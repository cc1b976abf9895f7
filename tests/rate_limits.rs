//! Rate limits through the gateway over HTTP, against mock upstreams on
//! 127.0.0.1: a key over its rpm or tpm gets a 429 with `retry-after` and
//! the limit in the headers its API's clients read; a
//! deployment at its own quota, or whose upstream reports no requests
//! left, is skipped (not failed) until it has room again; a key's limiter
//! outlives a reload. Quotas are tiny so limits are reached at once; no
//! test waits for a minute to refill.

mod support;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{MockServer, MockUpstream};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tollgate::limits::go_duration;

fn hi(alias: &str) -> Value {
    json!({"model": alias, "messages": user("hi")})
}

/// A chat request with `team`'s key.
async fn chat_as_team(gateway: &Gateway, body: Value) -> reqwest::Response {
    gateway.chat_as("team-secret", body).await
}

/// `retry-after` in whole seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds")
}

/// `retry-after-ms`, which must say the wait `retry-after` says, to the
/// millisecond.
fn retry_after_ms(response: &reqwest::Response) -> u64 {
    let ms: u64 = header(response, "retry-after-ms").parse().unwrap();
    assert_eq!(ms.div_ceil(1000), retry_after(response), "{ms} ms");
    ms
}

/// An OpenAI reset header (`59.98s`, `1m0s`) in seconds.
fn reset_seconds(response: &reqwest::Response, name: &str) -> f64 {
    let text = header(response, name);
    go_duration::parse(text)
        .unwrap_or_else(|| panic!("{name}: {text}"))
        .as_secs_f64()
}

/// An Anthropic reset header (RFC 3339, to the second) as seconds from now.
fn reset_from_now(response: &reqwest::Response, name: &str) -> f64 {
    let text = header(response, name);
    let at =
        OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{name}: {text}: {e}"));
    assert_eq!(at.nanosecond(), 0, "whole seconds: {text}");
    (at - OffsetDateTime::now_utc()).as_seconds_f64()
}

/// Model `chat` on the mock at `upstream`, as backend `up`.
fn one_model(upstream: &MockServer) -> Config {
    Config::new()
        .backend(Backend::upstream("up", "openai", &url(upstream)))
        .model(Model::new("chat").deployment(Deployment::new("up", "m")))
}

/// One model `chat` on one mock, and the key `team` with the limit
/// `limit = quota`; plus the key `other` without limits.
async fn keyed_gateway(limit: &str, quota: u32) -> (Gateway, MockServer) {
    let upstream = MockUpstream::openai().start().await;
    let config = one_model(&upstream)
        .key(Key::new("team").set(limit, quota))
        .key(Key::new("other"));
    (start(&config).await, upstream)
}

#[tokio::test]
async fn a_key_over_its_rpm_gets_429_with_retry_after_and_other_keys_do_not() {
    let (gateway, _upstream) = keyed_gateway("rpm", 2).await;
    // A request that is refused before admission uses none of the quota.
    assert_eq!(chat_as_team(&gateway, hi("nope")).await.status(), 404);
    for _ in 0..2 {
        let response = chat_as_team(&gateway, hi("chat")).await;
        assert_eq!(response.status(), 200);
    }

    let response = chat_as_team(&gateway, hi("chat")).await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=30).contains(&wait), "a slot frees every 30 s: {wait}");
    assert!(retry_after_ms(&response) <= 30_000);
    // The limit as OpenAI's clients read it: none left, and all of it
    // free again a minute after the first request.
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
    let reset = reset_seconds(&response, "x-ratelimit-reset-requests");
    assert!((50.0..=60.0).contains(&reset), "{reset} s");
    assert!(
        response.headers().get("x-should-retry").is_none(),
        "the SDKs retry a 429 after retry-after, as they should"
    );
    assert_eq!(response.headers()["x-tollgate-attempts"], "0");
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "rate_limit_exceeded");
    let text = message(&error);
    assert!(
        text.starts_with(
            "key \"team\" is over its rate limit of 2 requests per minute (rpm); retry after"
        ),
        "{text}"
    );

    let other = gateway.chat_as("other-secret", hi("chat")).await;
    assert_eq!(other.status(), 200, "limits are per key");
    let labels = [("scope", "key"), ("name", "team"), ("limit", "rpm")];
    gateway
        .eventually_metric("tollgate_rate_limited_total", &labels, 1.0)
        .await;
    let labels = [("alias", "chat"), ("kind", "rate_limited")];
    gateway
        .eventually_metric("tollgate_errors_total", &labels, 1.0)
        .await;
}

#[tokio::test]
async fn a_key_over_its_tpm_gets_429_counting_what_requests_really_used() {
    // "hi" is estimated at 5 prompt tokens; the mock reports 11 prompt and
    // 3 completion tokens. Counted at admission only, six requests would
    // fit 30 tokens; counted as used (14 each), two do.
    let (gateway, _upstream) = keyed_gateway("tpm", 30).await;
    for _ in 0..2 {
        assert_eq!(chat_as_team(&gateway, hi("chat")).await.status(), 200);
    }
    let response = chat_as_team(&gateway, hi("chat")).await;
    assert_eq!(response.status(), 429);
    assert!(retry_after(&response) >= 1);
    // 28 of the 30 tokens were used a moment ago: 2 are left, fewer than
    // the 5 this request needs, which 3 more refill in 6 s; all 30 in 56 s.
    assert_eq!(header(&response, "x-ratelimit-limit-tokens"), "30");
    let left: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!((2..5).contains(&left), "{left} left");
    let ms = retry_after_ms(&response);
    assert!((1..=6_000).contains(&ms), "{ms} ms");
    let reset = reset_seconds(&response, "x-ratelimit-reset-tokens");
    assert!((46.0..=56.0).contains(&reset), "{reset} s");
    let error = error_of(response).await;
    let text = message(&error);
    assert!(
        text.starts_with(
            "key \"team\" is over its rate limit of 30 tokens per minute (tpm) (this request needs about 5)"
        ),
        "{text}"
    );

    // A prompt larger than the whole minute's quota can never fit.
    let long = json!({"model": "chat", "messages": user(&"word ".repeat(100))});
    let response = chat_as_team(&gateway, long).await;
    assert_eq!(response.status(), 400);
    assert!(response.headers().get("retry-after").is_none());
    let error = error_of(response).await;
    assert_eq!(error["code"], "request_too_large");
    assert!(
        message(&error).contains("more than key \"team\" may use in a minute (tpm = 30)"),
        "{error}"
    );
}

#[tokio::test]
async fn responses_and_messages_clients_get_the_limit_in_their_apis_headers() {
    let upstream = MockUpstream::openai().start().await;
    let config = one_model(&upstream)
        .key(Key::new("team").set("rpm", 1))
        .key(Key::new("other").set("tpm", 16));
    let gateway = start(&config).await;
    let responses = json!({"model": "chat", "input": "hi"});
    let messages = json!({"model": "chat", "max_tokens": 16, "messages": user("hi")});

    let ok = gateway
        .post_as("team-secret", "/v1/responses", responses.clone())
        .await;
    assert_eq!(ok.status(), 200);
    let response = gateway
        .post_as("team-secret", "/v1/responses", responses)
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "1");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
    let reset = reset_seconds(&response, "x-ratelimit-reset-requests");
    assert!((50.0..=60.0).contains(&reset), "{reset} s");
    assert!(retry_after_ms(&response) <= 60_000);

    // Anthropic's headers: the same limit, its reset a time (RFC 3339).
    let response = gateway
        .post_as("team-secret", "/v1/messages", messages.clone())
        .await;
    assert_eq!(response.status(), 429);
    assert!((1..=60).contains(&retry_after(&response)));
    assert_eq!(header(&response, "anthropic-ratelimit-requests-limit"), "1");
    assert_eq!(
        header(&response, "anthropic-ratelimit-requests-remaining"),
        "0"
    );
    let reset = reset_from_now(&response, "anthropic-ratelimit-requests-reset");
    assert!((49.0..=61.0).contains(&reset), "{reset} s");

    // A Messages request uses 14 tokens of `other`'s 16, leaving 2, fewer
    // than the 5 the next needs: 3 more refill in 11.25 s, all 16 in 52.5 s.
    let ok = gateway
        .post_as("other-secret", "/v1/messages", messages.clone())
        .await;
    assert_eq!(ok.status(), 200);
    let response = gateway
        .post_as("other-secret", "/v1/messages", messages)
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "anthropic-ratelimit-tokens-limit"), "16");
    assert_eq!(
        header(&response, "anthropic-ratelimit-tokens-remaining"),
        "2"
    );
    let reset = reset_from_now(&response, "anthropic-ratelimit-tokens-reset");
    assert!((42.0..=54.0).contains(&reset), "{reset} s");
    let ms = retry_after_ms(&response);
    assert!((9_000..=11_250).contains(&ms), "{ms} ms");
}

/// `retry-after` of a 429 from `team`'s key.
async fn refused_for(gateway: &Gateway) -> u64 {
    let response = chat_as_team(gateway, hi("chat")).await;
    assert_eq!(response.status(), 429);
    retry_after(&response)
}

#[tokio::test]
async fn a_long_answer_puts_the_key_in_debt_and_retry_after_covers_it() {
    // A tpm of 60 is a token a second. The answer is 11 prompt and 600
    // completion tokens: 611, ten minutes of quota, of which the bucket
    // held one. The next request (5 tokens) fits 611 + 5 - 60 = 556 s on.
    let upstream = MockUpstream::openai().answers_of(600).start().await;
    let config = one_model(&upstream).key(Key::new("team").set("tpm", 60));
    let gateway = start(&config).await;
    assert_eq!(chat_as_team(&gateway, hi("chat")).await.status(), 200);
    let wait = refused_for(&gateway).await;
    assert!((550..=557).contains(&wait), "retry-after {wait}");
    // The limit is full again once the whole 611 tokens are paid off.
    let response = chat_as_team(&gateway, hi("chat")).await;
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "0");
    let reset = reset_seconds(&response, "x-ratelimit-reset-tokens");
    assert!((605.0..=611.0).contains(&reset), "{reset} s");
}

#[tokio::test]
async fn output_counts_against_the_key_and_the_deployment_as_it_is_generated() {
    // 2 tokens a second for the key and for the deployment `first`; the
    // stream pauses after 300 of its 400 tokens.
    let first = MockUpstream::openai()
        .answers_of(400)
        .hold_after(301)
        .start()
        .await;
    let second = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("first", "openai", &url(&first)))
        .backend(Backend::upstream("second", "openai", &url(&second)))
        .model(
            Model::new("chat")
                .deployment(
                    Deployment::named("first", "first")
                        .price(0.1, 0.0)
                        .set("tpm", 120),
                )
                .deployment(Deployment::named("second", "second").price(1.0, 0.0)),
        )
        .key(Key::new("team").set("tpm", 120))
        .key(Key::new("other"))
        .admin();
    let gateway = start(&config).await;
    let body = json!({"model": "chat", "messages": user("hi"), "stream": true});
    let mut held = gateway
        .post("/v1/chat/completions")
        .bearer_auth("team-secret")
        .json(&body)
        .send()
        .await
        .map(Events::new)
        .unwrap();
    for _ in 0..301 {
        held.next().await.expect("the first 300 tokens");
    }
    // While the answer is still coming, the key already owes about
    // 5 + 300 - 120 tokens: 90 s or more.
    let wait = refused_for(&gateway).await;
    assert!(wait >= 85, "retry-after {wait}");
    // And the deployment: plans leave it for the other one.
    let response = gateway.chat_as("other-secret", hi("chat")).await;
    assert_eq!(served_by(&response).0, "second");
    let explained = gateway.explain(json!({"request": hi("chat")})).await;
    let why = reason(&explained, "first");
    assert!(
        why.starts_with("at its tpm quota of 120; next slot in"),
        "{why}"
    );
    first.release();
    assert_eq!(held.rest().await.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn a_deployment_at_its_rpm_quota_is_skipped_not_failed() {
    let cheap = MockUpstream::openai().start().await;
    let dear = MockUpstream::openai().start().await;
    let single = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("cheap", "openai", &url(&cheap)))
        .backend(Backend::new("dear", "openai", &url(&dear)))
        .backend(Backend::new("single", "openai", &url(&single)))
        .model(
            Model::new("chat")
                .deployment(
                    Deployment::named("cheap", "cheap")
                        .price(0.1, 0.0)
                        .set("rpm", 2),
                )
                .deployment(Deployment::named("dear", "dear").price(1.0, 0.0))
                // Never fits: "hi" is about 5 tokens.
                .deployment(Deployment::named("tiny", "dear").set("tpm", 4)),
        )
        .model(Model::new("single").deployment(Deployment::named("single", "single").set("rpm", 1)))
        .admin();
    let gateway = start(&config).await;

    for _ in 0..2 {
        let response = gateway.chat(hi("chat")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), ("cheap".into(), "1".into()));
    }
    // The third is planned without it: the plan sees the quota spent (no
    // refusal needed first), and the next deployment serves it in what
    // counts as its only attempt.
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), ("dear".into(), "1".into()));
    assert_eq!((cheap.hits(), dear.hits()), (2, 1));

    // Plans drop it, with the reason, until its next slot.
    let explained = gateway.explain(json!({"request": hi("chat")})).await;
    assert_eq!(explained["chosen"], "dear");
    assert_eq!(candidate(&explained, "cheap")["kept"], false);
    let why = reason(&explained, "cheap");
    assert!(
        why.starts_with("at its rpm quota of 2; next slot in"),
        "{why}"
    );
    assert_eq!(
        reason(&explained, "tiny"),
        "the request's estimated 5 input tokens exceed its tpm quota of 4"
    );
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(served_by(&response), ("dear".into(), "1".into()));
    assert_eq!(cheap.hits(), 2, "a skipped deployment is never called");

    // An alias whose only deployment is at its quota: 429 with
    // retry-after, as the provider would answer.
    assert_eq!(gateway.chat(hi("single")).await.status(), 200);
    let response = gateway.chat(hi("single")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-tollgate-attempts"], "0");
    let wait = retry_after(&response);
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(retry_after_ms(&response) <= 60_000);
    let error = error_of(response).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        message(&error).starts_with("every deployment of model \"single\" is rate limited right now (single: at its rpm quota of"),
        "{error}"
    );
    assert_eq!(single.hits(), 1);
}

#[tokio::test]
async fn upstream_ratelimit_headers_skip_a_deployment_until_they_reset() {
    let spent = MockUpstream::openai()
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", "1s")
        .header("x-ratelimit-remaining-tokens", "90000")
        .header("x-ratelimit-reset-tokens", "1m0s")
        .start()
        .await;
    // An error response reports its quota too.
    let refusing = MockUpstream::openai()
        .status(429)
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", "6m0s")
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("spent", "groq", &url(&spent)).credential())
        .backend(Backend::new("refusing", "openai", &url(&refusing)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("spent", "spent").price(0.1, 0.0))
                .deployment(Deployment::named("spare", "spare").price(1.0, 0.0)),
        )
        .model(
            Model::new("other")
                .deployment(Deployment::named("refusing", "refusing").price(0.1, 0.0))
                .deployment(Deployment::named("other-spare", "spare").price(1.0, 0.0)),
        )
        .admin();
    let gateway = start(&config).await;

    let response = gateway.chat(hi("chat")).await;
    assert_eq!(served_by(&response), ("spent".into(), "1".into()));
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(
        served_by(&response),
        ("spare".into(), "1".into()),
        "the upstream said it has no requests left"
    );
    let explained = gateway.explain(json!({"request": hi("chat")})).await;
    assert_eq!(candidate(&explained, "spent")["kept"], false);
    let why = reason(&explained, "spent");
    assert!(
        why.starts_with("upstream reports no requests left; resets in"),
        "{why}"
    );
    let explained = gateway
        .explain_until(json!({"request": hi("chat")}), |e| e["chosen"] == "spent")
        .await;
    assert_eq!(candidate(&explained, "spent")["kept"], true);
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(served_by(&response), ("spent".into(), "1".into()));
    assert_eq!(spent.hits(), 2);

    let response = gateway.chat(hi("other")).await;
    assert_eq!(served_by(&response), ("spare".into(), "2".into()));
    let explained = gateway.explain(json!({"request": hi("other")})).await;
    let why = reason(&explained, "refusing");
    let ms: u64 = why
        .strip_prefix("upstream reports no requests left; resets in ")
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{why}"));
    assert!((300_000..=360_000).contains(&ms), "{why}");
}

/// `POST /admin/reload` with `config`, which must be applied.
async fn reload(gateway: &Gateway, config: &Config) {
    let response = gateway
        .post("/admin/reload")
        .bearer_auth(ADMIN_TOKEN)
        .body(config.to_toml())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["applied"], true, "{report:#}");
}

#[tokio::test]
async fn a_keys_minute_goes_on_across_a_reload_and_a_new_quota_starts_afresh() {
    let upstream = MockUpstream::openai().start().await;
    let config = |rpm: u32, attempts: u32| {
        one_model(&upstream)
            .key(Key::new("team").set("rpm", rpm))
            .set("routing", "max_attempts", attempts)
            .admin()
    };
    let gateway = start(&config(1, 3)).await;
    assert_eq!(chat_as_team(&gateway, hi("chat")).await.status(), 200);

    reload(&gateway, &config(1, 2)).await;
    assert_eq!(
        chat_as_team(&gateway, hi("chat")).await.status(),
        429,
        "the same key, the same quota: the same minute"
    );

    reload(&gateway, &config(2, 2)).await;
    assert_eq!(chat_as_team(&gateway, hi("chat")).await.status(), 200);
}
