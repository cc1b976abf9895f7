//! What the accept loop serves: HTTP/1.1, and HTTP/2 with prior knowledge,
//! told apart by a connection's first bytes however they arrive; and what
//! a client that sends its body slowly, or not at all, gets.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::config::{Backend, Config, Deployment, Model};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAM: &str =
    r#"{"model":"llama","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn config() -> Config {
    Config::new()
        .backend(Backend::simulated("sim").answers(5, 1000, 5))
        .model(Model::new("llama").deployment(Deployment::new("sim", "m")))
}

/// The gateway's address.
async fn start() -> String {
    address(&config()).await
}

async fn address(config: &Config) -> String {
    let gateway = support::gateway::start(config).await;
    gateway.base.trim_start_matches("http://").to_owned()
}

/// Sends `head` and the first `sent` bytes of a body of `length`, then
/// nothing more; returns the answer, read until the gateway closes.
async fn body_withheld(addr: &str, head: &str, length: usize, sent: usize) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{head}content-length: {length}\r\ncontent-type: application/json\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b' '; sent]).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(support::gateway::WAIT, tcp.read(&mut answer))
        .await
        .expect("answered without the rest of the body")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

/// The JSON error at the end of an HTTP/1.1 answer.
fn error_body(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408() {
    let addr = address(&config().set("server", "body_timeout_ms", 200)).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n";
    let answer = body_withheld(&addr, head, 1000, 10).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let error = error_body(&answer);
    assert_eq!(error["error"]["code"], "request_timeout");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("200 ms"),
        "{error}"
    );
}

#[tokio::test]
async fn admin_checks_its_token_before_reading_a_byte_of_body() {
    let addr = address(&config().admin()).await;
    for (path, token) in [
        ("/admin/reload", ""),
        ("/admin/explain", "authorization: Bearer wrong\r\n"),
    ] {
        let head = format!("POST {path} HTTP/1.1\r\nhost: gateway\r\n{token}");
        // 2 MB promised, none sent: answered at once all the same.
        let answer = body_withheld(&addr, &head, 2 << 20, 0).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert_eq!(error_body(&answer)["error"]["code"], "invalid_api_key");
    }
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_streams_included() {
    let addr = start().await;
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("the gateway speaks HTTP/2");
    tokio::spawn(connection);

    let health = sender
        .send_request(
            Request::get(format!("http://{addr}/healthz"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.version(), hyper::Version::HTTP_2);
    assert_eq!(health.status(), 200);

    let stream = sender
        .send_request(
            Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(STREAM.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let body = stream.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(text.matches("\"content\"").count(), 5, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn an_http1_request_whose_first_byte_comes_alone_is_served() {
    let addr = start().await;
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    // "P" could open "POST" or HTTP/2's "PRI": the gateway waits for more.
    tcp.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rest = format!(
        "OST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{STREAM}",
        STREAM.len()
    );
    tcp.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("data: [DONE]"), "{answer}");
}

#[tokio::test]
async fn a_connection_closed_before_its_first_byte_leaves_the_gateway_serving() {
    let addr = start().await;
    drop(TcpStream::connect(&addr).await.unwrap());
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");
}

#[tokio::test]
async fn an_http2_preface_sent_in_two_parts_is_served_as_http2() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let addr = start().await;
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(&PREFACE[..12]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&PREFACE[12..]).await.unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut frame = [0; 9];
    tokio::time::timeout(support::gateway::WAIT, tcp.read_exact(&mut frame))
        .await
        .expect("answered in time")
        .unwrap();
    assert_eq!(
        frame[3], 4,
        "an HTTP/2 server opens with SETTINGS: {frame:?}"
    );
}

#[tokio::test]
async fn a_client_that_closes_after_an_ambiguous_first_byte_is_let_go_at_once() {
    let addr = start().await;
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"P").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    // Not held until the head timeout (30 s), nor spun on meanwhile; the
    // "P" left unread makes the close a reset.
    let closed = tokio::time::timeout(support::gateway::WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("closed at once");
    match closed {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// Sends `raw` and reads the answer until the gateway closes (a reset
/// included: closing with part of a head unread is one).
async fn answer_to(addr: &str, raw: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let read = tokio::time::timeout(support::gateway::WAIT, tcp.read(&mut chunk))
            .await
            .expect("answered and closed in time");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn requests_that_break_http_get_an_openai_error_body_that_says_what_to_change() {
    let addr = start().await;
    let post = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n";
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "a Content-Length that is not a number",
            format!("{post}content-length: abc\r\n\r\n").into_bytes(),
            "400",
            "Content-Length",
        ),
        (
            "two different Content-Lengths",
            format!("{post}content-length: 2\r\ncontent-length: 3\r\n\r\n{{}}").into_bytes(),
            "400",
            "Content-Length",
        ),
        (
            "a Transfer-Encoding that does not end in chunked",
            format!("{post}transfer-encoding: gzip\r\n\r\n").into_bytes(),
            "400",
            "Transfer-Encoding",
        ),
        (
            "both Content-Length and Transfer-Encoding",
            format!("{post}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
                .into_bytes(),
            "400",
            "not both",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /v1/chat/completions HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            "400",
            "HTTP/1.0",
        ),
        (
            "no version on the request line",
            b"POST /v1/chat/completions\r\nhost: gateway\r\n\r\n".to_vec(),
            "400",
            "METHOD /path HTTP/1.1",
        ),
        (
            "a control byte in a header name",
            format!("{post}x-bad\u{1}: v\r\n\r\n").into_bytes(),
            "400",
            "header names",
        ),
        (
            "a head over 8 KiB",
            format!("{post}x-big: {}\r\n\r\n", "a".repeat(9000)).into_bytes(),
            "431",
            "8 KiB",
        ),
        (
            "101 headers",
            format!("{post}{many}\r\n").into_bytes(),
            "431",
            "100 headers",
        ),
    ];
    for (case, raw, status, names) in cases {
        let answer = answer_to(&addr, &raw).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{case}: {answer}"
        );
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{case}: {answer}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{case}: {answer}"
        );
        let error: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{case}: {e}: {body}"));
        assert_eq!(error["error"]["type"], "invalid_request_error", "{case}");
        assert!(error["error"]["param"].is_null(), "{case}");
        assert!(error["error"]["code"].is_string(), "{case}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{case}: {message}");
    }
}

#[tokio::test]
async fn a_body_cut_short_or_badly_chunked_is_a_400_that_says_what_to_send() {
    let addr = start().await;
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n";
    for (framing, body, says) in [
        (
            "transfer-encoding: chunked\r\n",
            "zz\r\n{}\r\n0\r\n\r\n",
            "an invalid chunk size; send the body in valid chunks, or whole with a Content-Length",
        ),
        (
            "transfer-encoding: chunked\r\n",
            "2\r\n{}}\r\n0\r\n\r\n",
            "a chunk longer than its size",
        ),
        (
            "content-length: 100\r\n",
            "{\"model\":",
            "before the body's end; send as many bytes as the Content-Length says",
        ),
    ] {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let request = format!("{head}{framing}\r\n{body}");
        tcp.write_all(request.as_bytes()).await.unwrap();
        // The client sends no more, and says so.
        tcp.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(support::gateway::WAIT, tcp.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{body:?}: {answer}");
        let message = error_body(&answer)["error"]["message"].clone();
        let message = message.as_str().unwrap();
        assert!(
            message.starts_with("the request body could not be read: ") && message.contains(says),
            "{body:?}: {message}"
        );
    }
}

#[tokio::test]
async fn a_compressed_body_is_a_415_that_says_to_send_it_uncompressed() {
    let gateway = support::gateway::start(&config()).await;
    let send = |coding: &'static str, body: &'static [u8]| {
        gateway
            .post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(body)
            .send()
    };
    // A gzip member's first bytes: magic, deflate, no flags, no time.
    let gzipped: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\x56\xca\xcd";
    for coding in ["gzip", "br, gzip", "zstd"] {
        let response = send(coding, gzipped).await.unwrap();
        assert_eq!(response.status(), 415, "{coding}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unsupported_content_encoding");
        assert_eq!(
            error["error"]["message"],
            format!(
                "the request body is compressed (Content-Encoding: {coding}), which this gateway does not decode; send it uncompressed"
            )
        );
    }
    // Only a body that does not parse is judged by its label: JSON sent
    // as it is, under any label, is served.
    for coding in ["identity", "gzip"] {
        let response = send(coding, STREAM.as_bytes()).await.unwrap();
        assert_eq!(response.status(), 200, "{coding}");
    }
    // An admin call is refused for its label before its body is read.
    let admin = support::gateway::start(&config().admin()).await;
    let response = admin
        .post("/admin/explain")
        .bearer_auth(support::gateway::ADMIN_TOKEN)
        .header("content-encoding", "gzip")
        .body(r#"{"request":{"model":"llama","messages":[]}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test]
async fn a_refusal_after_a_served_request_on_the_same_connection_has_its_body() {
    let addr = start().await;
    let answer = answer_to(
        &addr,
        b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n\
          GET /healthz HTTP/1.1\r\nhost: gateway\r\ncontent-length: 1x\r\n\r\n",
    )
    .await;
    let (served, refused) = answer.split_once("ok\n").expect("the first is served");
    assert!(served.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(refused.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(refused.contains("\"code\":\"malformed_http\""), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_sends_reaches_the_log_escaped_and_cut() {
    let gateway =
        support::process::serve_config(&config().set("server", "max_body_bytes", 8 << 20));
    let forged = "m\n2026-12-04T00:00:00.000000Z  INFO tollgate: forged line";
    let huge = "x".repeat(3 << 20);
    let bodies = [
        serde_json::json!({"model": forged, "messages": [{"role": "user", "content": "hi"}]}),
        serde_json::json!({"model": huge, "messages": [{"role": "user", "content": "hi"}]}),
        serde_json::json!({"model": "llama", "stream": huge, "messages": []}),
        serde_json::json!({"model": "llama", "max_tokens": huge, "messages": [{"role": "user", "content": "hi"}]}),
    ];
    let client = reqwest::Client::new();
    for (i, body) in bodies.iter().enumerate() {
        let answer = client
            .post(format!("{}/v1/chat/completions", gateway.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_client_error(),
            "{i}: {}",
            answer.status()
        );
        let error: serde_json::Value = answer.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.len() < 1024, "{}", message.len());
    }
    let lines = gateway.lines_once("request failed", bodies.len());
    for line in &lines {
        assert!(
            !line.contains("forged line") || line.contains("m\\n2026"),
            "{line}"
        );
        assert!(
            line.starts_with("20"),
            "a line that is not the log's: {line}"
        );
        let longest_run = line
            .split(|c: char| c != 'x')
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(
            longest_run <= 256,
            "{longest_run} of the client's x's: {}",
            &line[..200]
        );
        assert!(line.len() < 2048, "{}: {}", line.len(), &line[..200]);
    }
}

#[tokio::test]
async fn browsers_get_cors_for_the_origins_the_config_names_and_no_others() {
    use support::gateway::start as start_gateway;
    let allowed = "https://app.example.com";
    let gateway = start_gateway(&config().set(
        "server",
        "cors_origins",
        toml::Value::Array(vec![allowed.into()]),
    ))
    .await;
    let preflight = |origin: &'static str| {
        gateway
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", gateway.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            )
            .send()
    };
    let response = preflight(allowed).await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], allowed);
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        headers["access-control-allow-headers"],
        "authorization, content-type, x-stainless-os"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let response = gateway
        .post("/v1/chat/completions")
        .header("origin", allowed)
        .json(
            &serde_json::json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], allowed);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    // A page's script can read a refusal's wait and limit as the SDKs do.
    for name in [
        "x-request-id",
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "anthropic-ratelimit-tokens-remaining",
    ] {
        assert!(
            exposed.split(',').any(|e| e.trim() == name),
            "{name}: {exposed}"
        );
    }

    // None by default.
    let plain = start_gateway(&config()).await;
    let response = plain
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", plain.base),
        )
        .header("origin", allowed)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn a_trailing_slash_names_the_same_route() {
    let gateway = support::gateway::start(&config()).await;
    let response = gateway
        .post("/v1/chat/completions/")
        .json(
            &serde_json::json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for path in ["/v1/models/", "/v1/models/llama/"] {
        assert_eq!(gateway.get(path, None).await.status(), 200, "{path}");
    }
}
