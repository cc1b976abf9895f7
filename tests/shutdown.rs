//! SIGTERM and SIGINT on the real binary: stop accepting, let streams in
//! flight finish within the grace period, end those still open with their
//! API's error event, exit 0.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::config::{Backend, Config, Deployment, Model};
use support::mock::MockUpstream;
use support::process::{Process, serve_config, serve_config_on_one_cpu};

/// A stream of 20 tokens at 20 per second: about a second long.
fn config(grace_ms: u32) -> Config {
    Config::new()
        .set("server", "shutdown_grace_ms", grace_ms)
        .backend(Backend::simulated("slow").answers(50, 20, 20))
        .model(Model::new("llama").deployment(Deployment::new("slow", "m")))
}

fn start(grace_ms: u32) -> Process {
    serve_config(&config(grace_ms))
}

async fn open_stream(base: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "llama", "stream": true,
                                  "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_lets_streams_in_flight_finish_then_exits_zero() {
    sigterm_drains(start(10_000)).await;
}

/// On one CPU the gateway runs on a single-threaded runtime: it serves and
/// drains the same.
#[tokio::test]
async fn on_one_cpu_one_thread_serves_and_drains() {
    let server = serve_config_on_one_cpu(&config(10_000));
    assert!(
        server.listening.contains("threads=1"),
        "{}",
        server.listening
    );
    sigterm_drains(server).await;
}

async fn sigterm_drains(mut server: Process) {
    let response = open_stream(&server.base).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    server.signal("-TERM");
    // The listener closes: a new connection is refused once the signal lands.
    let mut refused = false;
    for _ in 0..100 {
        if reqwest::get(format!("{}/healthz", server.base))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused while draining");

    let mut rest = Vec::from(&first[..]);
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream in flight is not cut"));
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream finished: {text}"
    );
    assert_eq!(
        text.matches("\"content\"").count(),
        20,
        "every token arrived"
    );
    assert_eq!(server.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// What a client read of a stream opened on `path` with `body`, when
/// the gateway is stopped by SIGINT a chunk in, with a grace period of
/// 200 ms for a stream that takes a second; and the line the gateway
/// logged as it metered the request.
async fn cut_by_the_grace_period(path: &str, body: serde_json::Value) -> (String, String) {
    let mut server = start(200);
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    server.signal("-INT");
    assert_eq!(server.wait_exit(Duration::from_secs(5)).code(), Some(0));
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (text, server.logged("request done"))
}

#[tokio::test]
async fn sigint_exits_zero_when_the_grace_period_runs_out_and_ends_each_stream_in_its_api() {
    let ask = serde_json::json!({"model": "llama", "stream": true, "max_tokens": 100,
                                 "messages": [{"role": "user", "content": "hi"}]});
    let (chat, logged) = cut_by_the_grace_period("/v1/chat/completions", ask.clone()).await;
    let events: Vec<&str> = chat.split_terminator("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{chat}");
    let error = &events[events.len() - 2];
    assert!(
        error.starts_with(r#"data: {"error":"#) && error.contains(r#""code":"shutting_down""#),
        "the stream was cut at the deadline, saying so: {chat}"
    );
    assert!(
        logged.contains("status=503"),
        "metered as cut by the gateway, not left by its client: {logged}"
    );
    let (messages, logged) = cut_by_the_grace_period("/v1/messages", ask).await;
    let last = messages.split_terminator("\n\n").last().unwrap();
    assert!(last.starts_with("event: error\n"), "{messages}");
    assert!(last.contains(r#""type":"api_error""#), "{messages}");
    assert!(!messages.contains("message_stop"), "{messages}");
    assert!(logged.contains("status=503"), "{logged}");
    let ask = serde_json::json!({"model": "llama", "stream": true, "max_output_tokens": 100,
                                 "input": "hi"});
    let (responses, logged) = cut_by_the_grace_period("/v1/responses", ask).await;
    let events: Vec<&str> = responses.split_terminator("\n\n").collect();
    let [.., error, failed] = events[..] else {
        panic!("{responses}");
    };
    assert!(
        error.starts_with("event: error\n") && error.contains(r#""code":"shutting_down""#),
        "{responses}"
    );
    assert!(
        failed.starts_with("event: response.failed\n"),
        "{responses}"
    );
    assert!(failed.contains(r#""status":"failed""#), "{responses}");
    assert!(!responses.contains("response.completed"), "{responses}");
    assert!(logged.contains("status=503"), "{logged}");
}

#[tokio::test]
async fn readyz_and_healthz_answer_while_serving() {
    let server = start(1_000);
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let healthy = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(healthy.status(), 200);
}

/// A stream whose client has stopped reading when the grace period runs
/// out cannot be sent its error event: it is still metered as cut by the
/// gateway, and written to the ledger before the process exits. Over
/// HTTP/1.1 the client's socket buffers are full; over HTTP/2 its stream
/// has no window left, and hyper stops polling the answer.
#[tokio::test]
async fn a_stream_whose_client_stopped_reading_is_metered_and_kept_when_the_grace_period_runs_out()
{
    for http2 in [false, true] {
        stopped_reader_at_the_grace_periods_end(http2).await;
    }
}

async fn stopped_reader_at_the_grace_periods_end(http2: bool) {
    use tokio::io::AsyncWriteExt;
    // Far more than the buffers and windows between the two hold.
    let upstream = MockUpstream::openai().bulky_answers_of(4_000).start().await;
    let data = tempfile::tempdir().unwrap();
    let config = Config::new()
        .set("server", "shutdown_grace_ms", 200)
        .set("ledger", "data_dir", data.path().to_str().unwrap())
        .backend(Backend::new("vllm", "vllm", &upstream.base_url()))
        .model(Model::new("chat").deployment(Deployment::new("vllm", "m")));
    let mut server = serve_config(&config);
    let mut held = None;
    let mut answer = None;
    if http2 {
        answer = Some(support::gateway::http2_stream(&server.base).await);
    } else {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let addr = server.base.trim_start_matches("http://").parse().unwrap();
        let mut client = socket.connect(addr).await.unwrap();
        let body = serde_json::json!({"model": "chat", "stream": true,
                                      "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(body.as_bytes()).await.unwrap();
        held = Some(client);
    }
    // Never read: the gateway's writes fill what is between and wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("-TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(5)).code(), Some(0));
    let logged = server.logged("request done");
    assert!(logged.contains("status=503"), "HTTP/2 {http2}: {logged}");
    drop((held, answer));
    // The ledger kept it: a gateway started again on it reports it.
    let again = support::gateway::start(&config.admin()).await;
    let report = again.spend("").await;
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "HTTP/2 {http2}: {report:#}");
    assert_eq!(rows[0]["requests"], 1, "{report:#}");
    assert!(
        rows[0]["output_tokens"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
}
