//! What the gateway tells operators about each request, read the way their
//! tools read it, from the real binary: JSON log lines (`[logging] format =
//! "json"`), and OpenTelemetry spans exported over OTLP/HTTP to a mock
//! collector (`[tracing]`), continuing the client's W3C `traceparent` and
//! passing each attempt's upstream.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{url, user};
use support::mock::{MockServer, MockUpstream};
use support::openai_mock::{CANNED_MODEL, CANNED_PROMPT_TOKENS};
use support::otlp::{Collector, Received};
use support::process::{Process, serve_file};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Alias `chat`: deployment `broken` (answers 500), then `good`, priced
/// so that cost is never zero.
async fn failing_over() -> (MockServer, MockServer, Config) {
    let broken = MockUpstream::openai()
        .error(
            500,
            json!({"error": {"message": "engine crashed", "type": "server_error"}}),
        )
        .start()
        .await;
    let good = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::new("broken", "vllm", &url(&broken)))
        .backend(Backend::new("good", "vllm", &url(&good)))
        .model(
            Model::new("chat")
                .deployment(Deployment::named("chat-broken", "broken").price(1.0, 2.0))
                .deployment(
                    Deployment::new("good", "llama-3.3-70b")
                        .set("name", "chat-good")
                        .price(1.0, 2.0),
                ),
        );
    (broken, good, config)
}

/// Serves `config` with key `team` (secret `team-secret`).
fn serve(config: &Config) -> (Process, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config.to_toml()).unwrap();
    let process = serve_file(file.path(), &[("KEY_TEAM", "team-secret")]);
    (process, file)
}

async fn post(base: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("team-secret")
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

// ---- JSON logs ---------------------------------------------------------------------------

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_every_request_field() {
    let (_broken, _good, config) = failing_over().await;
    let config = config
        .key(Key::new("team"))
        .set("logging", "format", "json");
    let (process, _file) = serve(&config);
    let response = post(
        &process.base,
        json!({"model": "chat", "messages": user("hi")}),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    // A model name that tries to end the line and start a forged one.
    let hostile = "x\n{\"level\":\"ERROR\",\"message\":\"forged\"}\u{1b}[2J";
    let refused = post(
        &process.base,
        json!({"model": hostile, "messages": user("hi")}),
        &[],
    )
    .await;
    assert_eq!(refused.status(), 404);

    process.lines_once("\"request done\"", 1);
    let lines = process.lines_once("\"request failed\"", 1);
    let objects: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        objects.iter().all(|o| o["message"] != "forged"),
        "{lines:#?}"
    );
    let done = objects
        .iter()
        .find(|o| o["message"] == "request done")
        .unwrap();
    assert_eq!(done["level"], "INFO");
    assert!(done["timestamp"].as_str().unwrap().ends_with('Z'), "{done}");
    assert_eq!(done["request_id"], request_id.as_str());
    assert_eq!(done["key"], "team");
    assert_eq!(done["alias"], "chat");
    assert_eq!(done["backend"], "good");
    assert_eq!(done["deployment"], "chat-good");
    assert_eq!(done["status"], 200);
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["input_tokens"], CANNED_PROMPT_TOKENS);
    assert_eq!(done["output_tokens"], 3);
    assert_eq!(done["estimated"], false);
    // 11 tokens at $1 and 3 at $2 per million.
    assert_eq!(done["cost_usd"], 0.000017);
    for duration in ["duration_ms", "upstream_ms"] {
        assert!(done[duration].is_u64(), "{duration}: {done}");
    }
    assert!(done.get("error").is_none(), "{done}");
    let failed = objects
        .iter()
        .find(|o| o["message"] == "request failed")
        .unwrap();
    assert_eq!(failed["status"], 404);
    assert!(
        failed["error"].as_str().unwrap().contains("forged"),
        "{failed}"
    );
}

// ---- traces ------------------------------------------------------------------------------

fn server_spans(spans: &[Received]) -> Vec<&Received> {
    spans.iter().filter(|s| s.span.kind == 2).collect()
}

fn children<'s>(spans: &'s [Received], parent: &Received) -> Vec<&'s Received> {
    let mut children: Vec<&Received> = spans
        .iter()
        .filter(|s| s.parent_span_id() == parent.span_id())
        .collect();
    children.sort_by_key(|s| s.attr("tollgate.attempt"));
    children
}

// The collector answers while the test waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_each_request_and_attempt_and_continue_the_clients_trace() {
    let collector = Collector::start().await;
    let (broken, good, config) = failing_over().await;
    let config = config
        .key(Key::new("team"))
        .set("tracing", "otlp_endpoint", collector.base_url())
        .set("tracing", "service_name", "gateway-under-test");
    let (mut process, _file) = serve(&config);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let answered = post(
        &process.base,
        json!({"model": "chat", "messages": user("hi")}),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(answered.status(), 200);
    answered.bytes().await.unwrap();
    let streamed = post(
        &process.base,
        json!({"model": "chat", "stream": true, "messages": user("hi")}),
        &[],
    )
    .await;
    assert_eq!(streamed.status(), 200);
    streamed.bytes().await.unwrap();
    let refused = post(
        &process.base,
        json!({"model": "nope", "messages": user("hi")}),
        &[],
    )
    .await;
    assert_eq!(refused.status(), 404);

    // Draining sends the spans still queued.
    process.signal("-TERM");
    assert!(process.wait_exit(Duration::from_secs(10)).success());
    let log = process.lines_once("stopped", 1);
    assert!(
        !log.iter().any(|line| line.contains("could not send")),
        "{log:#?}"
    );
    let spans = collector.wait_for(7).await;
    assert_eq!(spans.len(), 7, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "gateway-under-test"));
    let servers = server_spans(&spans);
    assert_eq!(servers.len(), 3, "{servers:#?}");

    // The client's trace, continued: the request's span is the child of
    // the client's, and each attempt's the child of the request's.
    let request = servers
        .iter()
        .find(|s| s.trace_id() == CLIENT_TRACE)
        .expect("a span in the client's trace");
    assert_eq!(request.parent_span_id(), CLIENT_SPAN);
    assert_eq!(request.span.name, "chat chat");
    for (name, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "chat"),
        ("gen_ai.response.model", CANNED_MODEL),
        ("gen_ai.usage.input_tokens", "11"),
        ("gen_ai.usage.output_tokens", "3"),
        ("http.response.status_code", "200"),
        ("tollgate.attempts", "2"),
        ("tollgate.deployment", "chat-good"),
        ("tollgate.backend", "good"),
        ("tollgate.cost_usd", "0.000017"),
    ] {
        assert_eq!(
            request.attr(name).as_deref(),
            Some(value),
            "{name}: {request:#?}"
        );
    }
    let attempts = children(&spans, request);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    // SPAN_KIND_CLIENT; the failed attempt is an error, the other is not.
    assert!(attempts.iter().all(|a| a.span.kind == 3));
    assert_eq!(first.attr("tollgate.attempt").as_deref(), Some("1"));
    assert_eq!(
        first.attr("tollgate.deployment").as_deref(),
        Some("chat-broken")
    );
    assert_eq!(first.attr("error.type").as_deref(), Some("upstream_error"));
    assert_eq!(first.span.status.as_ref().map(|s| s.code), Some(2));
    assert_eq!(first.attr("gen_ai.usage.input_tokens"), None);
    for (name, value) in [
        ("tollgate.attempt", "2"),
        ("gen_ai.provider.name", "vllm"),
        ("gen_ai.request.model", "llama-3.3-70b"),
        ("gen_ai.response.model", CANNED_MODEL),
        ("gen_ai.usage.input_tokens", "11"),
        ("gen_ai.usage.output_tokens", "3"),
        ("tollgate.deployment", "chat-good"),
    ] {
        assert_eq!(
            second.attr(name).as_deref(),
            Some(value),
            "{name}: {second:#?}"
        );
    }
    assert_eq!(second.attr("error.type"), None);
    // Each upstream got its own attempt's context, in the client's trace.
    let sent = |mock: &MockServer, index: usize| {
        mock.requests()[index]
            .header("traceparent")
            .expect("a traceparent upstream")
            .to_owned()
    };
    assert_eq!(
        sent(&broken, 0),
        format!("00-{CLIENT_TRACE}-{}-01", first.span_id())
    );
    assert_eq!(
        sent(&good, 0),
        format!("00-{CLIENT_TRACE}-{}-01", second.span_id())
    );

    // The stream: a trace of its own, metered when it ended.
    let stream = servers
        .iter()
        .find(|s| {
            s.trace_id() != CLIENT_TRACE
                && s.attr("http.response.status_code").as_deref() == Some("200")
        })
        .expect("the stream's span");
    assert_eq!(stream.parent_span_id(), "");
    assert_eq!(
        stream.attr("gen_ai.usage.output_tokens").as_deref(),
        Some("3")
    );
    assert_eq!(children(&spans, stream).len(), 2);
    assert_eq!(
        sent(&good, 1),
        format!(
            "00-{}-{}-01",
            stream.trace_id(),
            children(&spans, stream)[1].span_id()
        )
    );

    // Refused before any upstream: the request's span alone, its error
    // the client's (a 4xx is not the server's error).
    let refused = servers
        .iter()
        .find(|s| s.attr("http.response.status_code").as_deref() == Some("404"))
        .expect("the refused request's span");
    assert_eq!(refused.attr("error.type").as_deref(), Some("not_found"));
    assert_eq!(
        refused.attr("gen_ai.request.model").as_deref(),
        Some("nope")
    );
    assert_eq!(refused.attr("tollgate.attempts").as_deref(), Some("0"));
    assert_ne!(refused.span.status.as_ref().map(|s| s.code), Some(2));
    assert!(children(&spans, refused).is_empty());
}

/// A collector that takes connections and never answers: requests are
/// served as ever, and SIGTERM still ends the process, the last spans
/// given up after the SDK's shutdown timeout (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_holds_up_no_request() {
    // Bound, never accepted: connections complete in the backlog.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_broken, _good, config) = failing_over().await;
    let config = config.key(Key::new("team")).set(
        "tracing",
        "otlp_endpoint",
        format!("http://{}", silent.local_addr().unwrap()),
    );
    let (mut process, _file) = serve(&config);
    for _ in 0..20 {
        let response = post(
            &process.base,
            json!({"model": "chat", "messages": user("hi")}),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    process.signal("-TERM");
    assert!(process.wait_exit(Duration::from_secs(15)).success());
    process.logged("could not send the last spans to the OTLP collector");
}

#[tokio::test]
async fn without_tracing_nothing_is_sent_upstream_but_the_request_id() {
    let (_broken, good, config) = failing_over().await;
    let (process, _file) = serve(&config.key(Key::new("team")));
    let response = post(
        &process.base,
        json!({"model": "chat", "messages": user("hi")}),
        &[(
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        )],
    )
    .await;
    assert_eq!(response.status(), 200);
    let upstream = good.single_request();
    assert!(upstream.header("x-request-id").is_some());
    assert_eq!(upstream.header("traceparent"), None);
}
