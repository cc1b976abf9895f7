//! Failover through the gateway over HTTP, against mock upstreams on
//! 127.0.0.1: each retriable failure moves on to the next deployment, up
//! to `routing.max_attempts`; a client error and anything after the first
//! byte do not; a 429's `retry-after` cools its deployment; a circuit
//! opens, lets one probe through, and closes or reopens; every answer says
//! which backend served it after how many attempts. An upstream that sends
//! more than its backend's caps, breaks mid-body, or answers with what is
//! not HTTP/1.1, fails over before the client has a byte (alone, it is a
//! 502 that says what it broke) and ends the stream with an error event
//! after.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::*;
use support::mock::{self, MockServer, MockUpstream};

fn hi(alias: &str) -> Value {
    json!({"model": alias, "messages": user("hi")})
}

fn hi_stream(alias: &str) -> Value {
    json!({"model": alias, "stream": true, "messages": user("hi")})
}

fn ask(alias: &str) -> Value {
    json!({"request": hi(alias)})
}

/// `(x-tollgate-backend, x-tollgate-attempts)` of a request that must get
/// `status`.
async fn outcome(gateway: &Gateway, request: Value, status: u16) -> (String, String) {
    let response = gateway.chat(request).await;
    assert_eq!(response.status(), status);
    let served = served_by(&response);
    if status == 200 {
        response.bytes().await.unwrap();
    } else {
        error_of(response).await;
    }
    served
}

fn pair(backend: &str, attempts: usize) -> (String, String) {
    (backend.to_owned(), attempts.to_string())
}

/// Alias `alias`, asked whole and streamed, answered by backend `spare`
/// after one failed attempt.
async fn served_by_the_spare_on_the_second_attempt(gateway: &Gateway, alias: &str) {
    assert_eq!(
        outcome(gateway, hi(alias), 200).await,
        pair("spare", 2),
        "{alias}"
    );
    let (head, events) = gateway
        .stream("/v1/chat/completions", hi_stream(alias))
        .await;
    assert_eq!(head["x-tollgate-backend"], "spare", "{alias} streamed");
    assert_eq!(head["x-tollgate-attempts"], "2", "{alias} streamed");
    assert_eq!(
        events.rest().await.last().map(String::as_str),
        Some("[DONE]")
    );
}

/// Alias `name` on backend `name`, then on `spare`: deployments `name` and
/// `<name>-spare`.
fn with_spare(name: &str) -> Model {
    Model::new(name)
        .deployment(Deployment::named(name, name))
        .deployment(Deployment::named(&format!("{name}-spare"), "spare"))
}

/// Alias `chat` on these backends, in order, each deployment named as
/// given: `(name, backend)`.
fn chat(deployments: &[(&str, &str)]) -> Model {
    deployments
        .iter()
        .fold(Model::new("chat"), |model, (name, backend)| {
            model.deployment(Deployment::named(name, backend))
        })
}

// ---- failover --------------------------------------------------------------------

#[tokio::test]
async fn each_retriable_failure_before_the_first_byte_fails_over_to_the_next_deployment() {
    let refused = mock::refused_base_url().await;
    let silent = MockUpstream::openai()
        .first_byte_after(Duration::from_secs(30))
        .start()
        .await;
    let stalled = MockUpstream::openai()
        .body_after(Duration::from_secs(30))
        .start()
        .await;
    let mut failing = Vec::new();
    for status in [404, 429, 500, 502, 503, 504] {
        let mut mock = MockUpstream::openai().status(status);
        if status == 429 {
            // No cooldown, so that the streamed request is tried there too.
            mock = mock.header("retry-after", "0");
        }
        failing.push((status, mock.start().await));
    }
    let spare = MockUpstream::openai().start().await;
    let mut config = Config::new()
        .backend(Backend::new("refused", "openai", &format!("{refused}/v1")))
        .backend(Backend::new("silent", "openai", &url(&silent)).first_byte_ms(150))
        .backend(Backend::new("stalled", "openai", &url(&stalled)).first_byte_ms(150))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(with_spare("stalled"))
        .model(with_spare("refused"))
        .model(with_spare("silent"));
    for (status, mock) in &failing {
        let name = format!("status-{status}");
        config = config
            .backend(Backend::new(&name, "openai", &url(mock)))
            .model(with_spare(&name));
    }
    let gateway = start(&config).await;

    // Refused connections; no head in time; a head but no body in time;
    // each retriable status.
    let mut aliases = vec![
        "refused".to_owned(),
        "silent".to_owned(),
        "stalled".to_owned(),
    ];
    aliases.extend(failing.iter().map(|(status, _)| format!("status-{status}")));
    for alias in &aliases {
        served_by_the_spare_on_the_second_attempt(&gateway, alias).await;
    }
    assert_eq!((silent.hits(), stalled.hits()), (2, 2));
    for (status, mock) in &failing {
        assert_eq!(mock.hits(), 2, "{status}");
    }
    assert_eq!(spare.hits(), 2 * aliases.len());
}

/// A failover is the request going on to another deployment: a failure
/// with nothing left to try is none, whatever its reason.
#[tokio::test]
async fn only_a_failure_the_request_goes_on_from_counts_as_a_failover() {
    let down = MockUpstream::openai().status(500).start().await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("down", "openai", &url(&down)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("first", "down"), ("second", "spare")]))
        .model(Model::new("alone").deployment(Deployment::named("alone", "down")));
    let gateway = start(&config).await;
    for _ in 0..3 {
        assert_eq!(gateway.chat(hi("alone")).await.status(), 502);
    }
    assert_eq!(gateway.chat(hi("chat")).await.status(), 200);
    let text = gateway.metrics().await;
    let alone = [
        ("alias", "alone"),
        ("deployment", "alone"),
        ("reason", "upstream_error"),
    ];
    assert_eq!(
        metric(&text, "tollgate_failovers_total", &alone),
        None,
        "{text}"
    );
    assert_eq!(
        failovers(&gateway, "first", "upstream_error").await,
        Some(1.0)
    );
}

/// A base URL whose server answers every request with `reply` as it is,
/// then closes the connection: an upstream that does not speak HTTP/1.1.
/// The n-th connection it accepts waits `after[n]`, if there is one,
/// before it answers.
async fn answering_with(reply: &'static [u8], after: &'static [Duration]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let wait = after.get(accepted).copied().unwrap_or_default();
            accepted += 1;
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let _ = stream.read(&mut buf).await;
                tokio::time::sleep(wait).await;
                let _ = stream.write_all(reply).await;
            });
        }
    });
    format!("http://{address}/v1")
}

#[tokio::test]
async fn an_upstream_that_breaks_http_fails_over_and_alone_is_a_502_that_says_what_it_broke() {
    let spare = MockUpstream::openai().start().await;
    let broken: [(&str, &[u8], &str); 6] = [
        (
            "not-http",
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            "invalid response head",
        ),
        (
            "two-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
            "invalid content-length",
        ),
        (
            "switch",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "protocol switch",
        ),
        (
            "bad-chunk",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "in the middle of a response",
        ),
        (
            "gzip-chunks",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
            "a transfer coding other than chunked",
        ),
        ("silent-close", b"", "failed before a response"),
    ];
    let mut config = Config::new().backend(Backend::new("spare", "openai", &url(&spare)));
    for (name, reply, _) in broken {
        config = config
            .backend(Backend::new(
                name,
                "openai",
                &answering_with(reply, &[]).await,
            ))
            .model(with_spare(name))
            .model(
                Model::new(&format!("{name}-alone"))
                    .deployment(Deployment::named(&format!("{name}-only"), name)),
            );
    }
    let gateway = start(&config).await;
    for (name, _, says) in broken {
        served_by_the_spare_on_the_second_attempt(&gateway, name).await;

        let response = gateway.chat(hi(&format!("{name}-alone"))).await;
        assert_eq!(response.status(), 502, "{name}");
        let error = error_of(response).await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{name}: {message}");
        assert!(
            message.contains(&format!("backend \"{name}\"")),
            "{name}: {message}"
        );
    }
    // The gateway is whole after all of it.
    assert_eq!(
        outcome(&gateway, hi("not-http"), 200).await,
        pair("spare", 2)
    );
}

#[tokio::test]
async fn a_client_error_from_the_upstream_is_not_retried() {
    let rejecting = MockUpstream::openai()
        .error(400, json!({"error": {"message": "bad prompt", "type": "invalid_request_error", "param": null, "code": null}}))
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("rejecting", "openai", &url(&rejecting)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("first", "rejecting"), ("second", "spare")]));
    let gateway = start(&config).await;
    assert_eq!(
        outcome(&gateway, hi("chat"), 400).await,
        pair("rejecting", 1)
    );
    assert_eq!((rejecting.hits(), spare.hits()), (1, 0));
}

#[tokio::test]
async fn max_attempts_bounds_how_many_deployments_one_request_tries() {
    let mut mocks = Vec::new();
    let mut config = Config::new().set("routing", "max_attempts", 2);
    for name in ["one", "two", "three"] {
        let mock = MockUpstream::openai().status(503).start().await;
        config = config.backend(Backend::new(name, "openai", &url(&mock)));
        mocks.push(mock);
    }
    let good = MockUpstream::openai().start().await;
    let config = config
        .backend(Backend::new("good", "openai", &url(&good)))
        .model(chat(&[
            ("one", "one"),
            ("two", "two"),
            ("three", "three"),
            ("good", "good"),
        ]));
    let gateway = start(&config).await;

    let response = gateway.chat(hi("chat")).await;
    assert_eq!(response.status(), 503, "the last upstream error");
    assert_eq!(
        served_by(&response),
        pair("two", 2),
        "the last backend tried"
    );
    assert_eq!(error_of(response).await["code"], "upstream_error");
    let hits: Vec<usize> = mocks.iter().map(MockServer::hits).collect();
    assert_eq!(hits, [1, 1, 0]);
    assert_eq!(good.hits(), 0);
}

#[tokio::test]
async fn nothing_is_retried_once_the_client_has_had_a_byte() {
    let breaking = MockUpstream::openai()
        .stream("vllm_chat_usage.sse")
        .reset_after(2)
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("breaking", "vllm", &url(&breaking)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("first", "breaking"), ("second", "spare")]));
    let gateway = start(&config).await;

    let (head, events) = gateway
        .stream("/v1/chat/completions", hi_stream("chat"))
        .await;
    assert_eq!(head["x-tollgate-backend"], "breaking");
    assert_eq!(head["x-tollgate-attempts"], "1");
    let events = events.rest().await;
    assert_eq!(
        events.len(),
        4,
        "two events, an error event, [DONE]: {events:#?}"
    );
    let error = parse(&events[2]);
    check_error_shape(&error);
    assert_eq!(error["error"]["code"], "upstream_disconnected");
    assert_eq!(events[3], "[DONE]");
    assert_eq!(
        (breaking.hits(), spare.hits()),
        (1, 0),
        "the second deployment is never tried"
    );
}

// ---- bounded upstreams -----------------------------------------------------------------

/// The failovers counted away from `deployment` of alias `chat` for `reason`.
async fn failovers(gateway: &Gateway, deployment: &str, reason: &str) -> Option<f64> {
    let labels = [
        ("alias", "chat"),
        ("deployment", deployment),
        ("reason", reason),
    ];
    metric(
        &gateway.metrics().await,
        "tollgate_failovers_total",
        &labels,
    )
}

/// One SSE chat chunk whose content is `size` bytes.
fn content_event(size: usize) -> String {
    let chunk = json!({"id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "x".repeat(size)}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

/// `chat` on `first` (capped at 4096 bytes a response, 1024 an event),
/// then on `spare`.
fn capped_then_spare(first: &MockServer, spare: &MockServer) -> Config {
    Config::new()
        .backend(
            Backend::new("capped", "vllm", &url(first))
                .set("max_response_bytes", 4096)
                .set("max_event_bytes", 1024),
        )
        .backend(Backend::new("spare", "openai", &url(spare)))
        .model(chat(&[("first", "capped"), ("second", "spare")]))
}

#[tokio::test]
async fn a_body_over_max_response_bytes_fails_over_whether_or_not_its_length_is_announced() {
    let huge = format!("{{\"padding\":\"{}\"}}", "x".repeat(8192));
    for chunked in [false, true] {
        let mut upstream = MockUpstream::openai().body(huge.clone());
        if chunked {
            upstream = upstream.chunked();
        }
        let first = upstream.start().await;
        let spare = MockUpstream::openai().start().await;
        let gateway = start(&capped_then_spare(&first, &spare)).await;

        let response = gateway.chat(hi("chat")).await;
        assert_eq!(response.status(), 200, "chunked: {chunked}");
        assert_eq!(served_by(&response), pair("spare", 2));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!((first.hits(), spare.hits()), (1, 1));
        assert_eq!(
            failovers(&gateway, "first", "upstream_too_large").await,
            Some(1.0),
            "chunked: {chunked}"
        );
    }
}

#[tokio::test]
async fn a_first_sse_event_over_max_event_bytes_fails_over() {
    let first = MockUpstream::openai()
        .stream_bytes(format!("{}data: [DONE]\n\n", content_event(2000)))
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let gateway = start(&capped_then_spare(&first, &spare)).await;

    let (head, events) = gateway
        .stream("/v1/chat/completions", hi_stream("chat"))
        .await;
    assert_eq!(head["x-tollgate-backend"], "spare");
    assert_eq!(head["x-tollgate-attempts"], "2");
    assert_eq!(
        events.rest().await.last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(
        failovers(&gateway, "first", "upstream_too_large").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_stream_over_a_cap_after_its_first_chunk_ends_with_an_error_event() {
    // Over max_event_bytes in one event; over max_response_bytes in all.
    let one_big = [content_event(10), content_event(2000)].concat();
    let many = content_event(500).repeat(10);
    for (sse, limit) in [
        (one_big, "max_event_bytes (1024 bytes)"),
        (many, "max_response_bytes (4096 bytes)"),
    ] {
        let first = MockUpstream::openai()
            .stream_bytes(format!("{sse}data: [DONE]\n\n"))
            .event_delay(Duration::from_millis(20))
            .start()
            .await;
        let spare = MockUpstream::openai().start().await;
        let gateway = start(&capped_then_spare(&first, &spare)).await;

        let (head, mut events) = gateway
            .stream("/v1/chat/completions", hi_stream("chat"))
            .await;
        assert_eq!(head["x-tollgate-backend"], "capped");
        let first_chunk = parse(&events.next().await.expect("the first chunk"));
        assert_eq!(first_chunk["id"], "chatcmpl-big");
        let rest = events.rest().await;
        let (error, done) = (&rest[rest.len() - 2], &rest[rest.len() - 1]);
        let error = parse(error);
        check_error_shape(&error);
        assert_eq!(
            error["error"]["code"], "upstream_response_too_large",
            "{limit}"
        );
        assert_eq!(error["error"]["type"], "upstream_error");
        let text = error["error"]["message"].as_str().unwrap();
        assert!(
            text.starts_with("backend \"capped\" sent ") && text.ends_with(limit),
            "{text}"
        );
        assert_eq!(done, "[DONE]");
        assert_eq!(spare.hits(), 0, "nothing is retried after the first byte");
        // The request is recorded once, with the chunks that reached the
        // client metered.
        let labels = [
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "capped"),
            ("status", "502"),
        ];
        gateway
            .eventually_metric("tollgate_requests_total", &labels, 1.0)
            .await;
        let output = [
            ("api", "chat"),
            ("alias", "chat"),
            ("backend", "capped"),
            ("direction", "output"),
            ("estimated", "true"),
        ];
        let metered = metric(&gateway.metrics().await, "tollgate_tokens_total", &output);
        assert!(metered.is_some_and(|tokens| tokens > 0.0), "{metered:?}");
    }
}

#[tokio::test]
async fn a_whole_body_cut_by_a_reset_fails_over() {
    let first = MockUpstream::openai().reset_mid_body().start().await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("breaking", "vllm", &url(&first)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("first", "breaking"), ("second", "spare")]));
    let gateway = start(&config).await;

    let response = gateway.chat(hi("chat")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), pair("spare", 2));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!((first.hits(), spare.hits()), (1, 1));
    assert_eq!(
        failovers(&gateway, "first", "upstream_error").await,
        Some(1.0)
    );
}

// ---- 429 cooldowns ---------------------------------------------------------------------

#[tokio::test]
async fn a_429_with_retry_after_cools_its_deployment_for_that_long() {
    let limited = MockUpstream::openai()
        .status(429)
        .header("retry-after", "0.8")
        .start()
        .await;
    // OpenAI's own hint, in milliseconds.
    let alone = MockUpstream::openai()
        .status(429)
        .header("retry-after-ms", "800")
        .start()
        .await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("limited", "openai", &url(&limited)))
        .backend(Backend::new("alone", "openai", &url(&alone)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("limited", "limited"), ("spare", "spare")]))
        .model(Model::new("alone").deployment(Deployment::named("alone", "alone")))
        .admin();
    let gateway = start(&config).await;

    let limited_at = Instant::now();
    assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("spare", 2));
    let explained = gateway.explain(ask("chat")).await;
    assert_eq!(explained["chosen"], "spare");
    assert_eq!(candidate(&explained, "limited")["kept"], false);
    assert!(
        reason(&explained, "limited")
            .starts_with("rate limited upstream (the last: backend \"limited\" is rate limiting: "),
        "{explained:#}"
    );
    assert_eq!(
        outcome(&gateway, hi("chat"), 200).await,
        pair("spare", 1),
        "the cooling deployment is skipped"
    );
    assert_eq!(limited.hits(), 1);

    gateway
        .explain_until(ask("chat"), |e| e["chosen"] == "limited")
        .await;
    assert!(
        limited_at.elapsed() >= Duration::from_millis(800),
        "not before retry-after"
    );
    limited.set_status(200);
    assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("limited", 1));
    assert_eq!((limited.hits(), spare.hits()), (2, 2));

    // With nothing else to try, the 429 reaches the client; then, while the
    // only deployment cools, the gateway answers 429 itself, as the
    // upstream would.
    let response = gateway.chat(hi("alone")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["retry-after"],
        "1",
        "rounded up to seconds"
    );
    assert_eq!(served_by(&response), pair("alone", 1));
    let response = gateway.chat(hi("alone")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-tollgate-attempts"], "0");
    let error = error_of(response).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "rate_limit_error");
    assert!(
        message(&error).starts_with(
            "every deployment of model \"alone\" is rate limited right now (alone: rate limited upstream (the last: backend \"alone\" is rate limiting: "
        ),
        "{error}"
    );
    assert_eq!(alone.hits(), 1);
}

/// Bedrock's throttling, and some OpenAI-compatible servers' 429s, say no
/// wait: the gateway backs off on its own, and tells the client so.
#[tokio::test]
async fn a_429_that_says_no_wait_cools_its_deployment_for_a_growing_backoff() {
    let limited = MockUpstream::openai().status(429).start().await;
    let config = Config::new()
        .backend(Backend::new("limited", "openai", &url(&limited)))
        .model(Model::new("alone").deployment(Deployment::named("alone", "limited")))
        .admin();
    let gateway = start(&config).await;
    let retry_after = |response: &reqwest::Response| {
        let headers = response.headers();
        (
            response.status().as_u16(),
            headers["retry-after"].to_str().unwrap().to_owned(),
        )
    };

    let response = gateway.chat(hi("alone")).await;
    assert_eq!(retry_after(&response), (429, "1".to_owned()));
    // It cools: the gateway answers for it, as for a 429 that said 1 s.
    let response = gateway.chat(hi("alone")).await;
    assert_eq!(retry_after(&response), (429, "1".to_owned()));
    assert_eq!(limited.hits(), 1);

    // Throttled again once its cooldown is over: twice as long.
    gateway
        .explain_until(ask("alone"), |e| e["chosen"] == "alone")
        .await;
    let response = gateway.chat(hi("alone")).await;
    assert_eq!(retry_after(&response), (429, "2".to_owned()));
    let explained = gateway.explain(ask("alone")).await;
    let reason = reason(&explained, "alone");
    let left: u64 = reason
        .split_once("): cooling down for ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{explained:#}"));
    assert!((1000..=2000).contains(&left), "{left} ms");

    // Once it answers, the next 429 starts over.
    gateway
        .explain_until(ask("alone"), |e| e["chosen"] == "alone")
        .await;
    limited.set_status(200);
    assert_eq!(
        outcome(&gateway, hi("alone"), 200).await,
        pair("limited", 1)
    );
    limited.set_status(429);
    let response = gateway.chat(hi("alone")).await;
    assert_eq!(retry_after(&response), (429, "1".to_owned()));
    assert_eq!(limited.hits(), 4);
}

/// Requests in flight together meet the same throttling: however many
/// 429s come back, they are one step of backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_429s_that_say_no_wait_is_one_step_of_backoff() {
    // Each 429 comes 200 ms late, so that the whole wave is sent first.
    let limited = MockUpstream::openai()
        .status(429)
        .first_byte_after(Duration::from_millis(200))
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::new("limited", "openai", &url(&limited)))
        .model(Model::new("alone").deployment(Deployment::named("alone", "limited")))
        .admin();
    let gateway = start(&config).await;
    let wave = || async {
        let asks = (0..40).map(|_| gateway.chat(hi("alone")));
        let mut waits = Vec::new();
        for response in futures_util::future::join_all(asks).await {
            assert_eq!(response.status(), 429);
            waits.push(
                response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        waits.dedup();
        waits
    };
    assert_eq!(wave().await, ["1"]);
    let reached = limited.hits();
    assert!(reached > 1, "the wave reached the upstream {reached} times");
    gateway
        .explain_until(ask("alone"), |e| e["chosen"] == "alone")
        .await;
    assert_eq!(wave().await, ["2"], "the next wave is the next step");
}

/// A 429 that comes after the backoff it is part of is over, to a request
/// sent before it began, says nothing new of the upstream: no next step,
/// and no new cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_to_a_request_sent_before_the_backoff_began_adds_nothing() {
    const THROTTLED: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    // Of two requests sent together, one is answered at once and the
    // other after the first's backoff of 1 s is over.
    const AFTER: &[Duration] = &[Duration::from_millis(300), Duration::from_millis(1900)];
    let limited = answering_with(THROTTLED, AFTER).await;
    let config = Config::new()
        .backend(Backend::new("limited", "openai", &limited))
        .model(Model::new("alone").deployment(Deployment::named("alone", "limited")))
        .admin();
    let gateway = start(&config).await;
    let (first, late) = tokio::join!(gateway.chat(hi("alone")), gateway.chat(hi("alone")));
    for response in [&first, &late] {
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["x-tollgate-attempts"], "1");
    }
    let explained = gateway.explain(ask("alone")).await;
    assert_eq!(explained["chosen"], "alone", "{explained:#}");
}

// ---- circuit breakers -------------------------------------------------------------------

#[tokio::test]
async fn a_circuit_opens_after_consecutive_failures_then_probes_once_and_closes_or_reopens() {
    let flaky = MockUpstream::openai().status(500).start().await;
    let spare = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("flaky", "openai", &url(&flaky)))
        .backend(Backend::new("spare", "openai", &url(&spare)))
        .model(chat(&[("flaky", "flaky"), ("spare", "spare")]))
        .set("routing", "circuit_failures", 2)
        .set("routing", "circuit_cooldown_ms", 500)
        .admin();
    let gateway = start(&config).await;
    let is_open =
        |e: &Value| reason(e, "flaky").starts_with("circuit open after 2 consecutive failures");
    let is_half_open = |e: &Value| e["chosen"] == "flaky";

    // Closed: each failure fails over; the second one opens the circuit.
    for _ in 0..2 {
        assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("spare", 2));
    }
    let explained = gateway.explain(ask("chat")).await;
    assert!(is_open(&explained), "{explained:#}");
    assert_eq!(candidate(&explained, "flaky")["kept"], false);
    // Open: not tried at all.
    assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("spare", 1));
    assert_eq!(flaky.hits(), 2);

    // Half-open after the cooldown: one probe, which fails and reopens it.
    let opened = Instant::now();
    gateway.explain_until(ask("chat"), is_half_open).await;
    assert!(opened.elapsed() < Duration::from_secs(2));
    assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("spare", 2));
    assert_eq!(flaky.hits(), 3, "one probe");
    let explained = gateway.explain(ask("chat")).await;
    assert!(is_open(&explained), "a failed probe reopens: {explained:#}");

    // The upstream recovers: the next probe succeeds and closes it.
    flaky.set_status(200);
    gateway.explain_until(ask("chat"), is_half_open).await;
    assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("flaky", 1));
    for _ in 0..3 {
        assert_eq!(outcome(&gateway, hi("chat"), 200).await, pair("flaky", 1));
    }
    let explained = gateway.explain(ask("chat")).await;
    assert!(
        !reason(&explained, "flaky").contains("circuit"),
        "{explained:#}"
    );
    assert_eq!((flaky.hits(), spare.hits()), (7, 4));
}

#[tokio::test]
async fn with_every_circuit_open_the_gateway_answers_503_with_retry_after() {
    let down = MockUpstream::openai().status(502).start().await;
    let config = Config::new()
        .backend(Backend::new("down", "openai", &url(&down)))
        .model(chat(&[("down", "down")]))
        .set("routing", "circuit_failures", 1)
        .set("routing", "circuit_cooldown_ms", 1500);
    let gateway = start(&config).await;
    assert_eq!(outcome(&gateway, hi("chat"), 502).await, pair("down", 1));
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "2", "1.5 s, rounded up");
    let error = error_of(response).await;
    assert_eq!(error["code"], "no_deployment_available");
    // It names each deployment, and what last went wrong with it.
    let text = message(&error);
    assert!(
        text.contains("down: circuit open after 1 consecutive failures (the last: backend \"down\" failed with 502"),
        "{text}"
    );
    assert_eq!(down.hits(), 1);
}

// ---- served-by headers ----------------------------------------------------------------------

#[tokio::test]
async fn answers_name_the_last_backend_tried_and_the_attempts_even_when_all_fail() {
    let first = MockUpstream::openai().status(500).start().await;
    let second = MockUpstream::openai()
        .error(502, json!({"error": {"message": "bad gateway upstream", "type": "server_error", "param": null, "code": null}}))
        .start()
        .await;
    let config = Config::new()
        .backend(Backend::new("first", "openai", &url(&first)))
        .backend(Backend::new("second", "openai", &url(&second)))
        .model(chat(&[("a", "first"), ("b", "second")]));
    let gateway = start(&config).await;
    let response = gateway.chat(hi("chat")).await;
    assert_eq!(response.status(), 502);
    assert_eq!(served_by(&response), pair("second", 2));
    assert!(message(&error_of(response).await).contains("bad gateway upstream"));
    let response = gateway.chat(hi_stream("chat")).await;
    assert_eq!(served_by(&response), pair("second", 2), "streamed too");
    assert_eq!((first.hits(), second.hits()), (2, 2));
}
