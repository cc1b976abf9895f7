//! Bad input, as a client or an attacker sends it, gets an error in the
//! shape of the API it was sent to — JSON with a status, a type and a
//! message that says what to change — never plain text, a hang, a secret
//! or a dead process. Each request goes on a connection of its own, as
//! raw bytes, so that nothing a client library would fix up is fixed.

mod support;

use serde_json::Value;
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{ADMIN_TOKEN, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "team-secret";

/// The answer to `request`, read until the gateway closes the connection
/// (every request here says `connection: close`, or is refused, which
/// closes it).
async fn answer(addr: &str, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // A request refused from its head may be answered before the rest is
    // written, and the connection closed under the writer.
    let _ = tcp.write_all(request).await;
    let mut read = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0; 8192];
        while let Ok(n @ 1..) = tcp.read(&mut chunk).await {
            read.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer in time to {:?}", head_of(request)));
    let end = read
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&read)));
    let head = String::from_utf8(read[..end].to_vec())
        .unwrap()
        .to_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head, read[end + 4..].to_vec())
}

fn head_of(request: &[u8]) -> String {
    String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned()
}

/// A POST of `body` to `path` with the key, closing after the answer.
fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A request with the key and any head lines, closing after the answer.
fn raw(line: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{line}\r\nhost: g\r\nauthorization: Bearer {KEY}\r\n{headers}connection: close\r\n\r\n{body}"
    )
    .into_bytes()
}

/// `GET /admin/spend?{query}` with the admin token, closing after.
fn spend(query: &str) -> Vec<u8> {
    format!(
        "GET /admin/spend?{query} HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
}

const CHAT: &str = "/v1/chat/completions";

fn chat(members: &str) -> Vec<u8> {
    post(
        CHAT,
        format!(r#"{{"model":"chat","messages":[{{"role":"user","content":"hi"}}]{members}}}"#)
            .as_bytes(),
    )
}

#[tokio::test]
async fn every_bad_request_gets_an_error_in_its_apis_shape_and_the_gateway_stays_up() {
    let gateway = support::gateway::start(&admin_gateway()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    let deep = format!("[{}{}", "[".repeat(100_000), "]".repeat(100_001));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        // HTTP/1.1 framing and head.
        ("not a request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("HTTP/2.0 as text", b"GET /v1/models HTTP/2.0\r\n\r\n".to_vec(), 400),
        (
            "a 100 KB target",
            format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).into_bytes(),
            431,
        ),
        (
            "10,000 headers",
            format!(
                "GET /v1/models HTTP/1.1\r\n{}\r\n",
                "x-a: b\r\n".repeat(10_000)
            )
            .into_bytes(),
            431,
        ),
        (
            "a header of 1 MB",
            format!("GET /v1/models HTTP/1.1\r\nx-a: {}\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
            431,
        ),
        ("a NUL in a header", b"GET /v1/models HTTP/1.1\r\nx-a: a\0b\r\n\r\n".to_vec(), 400),
        ("a folded header", b"GET /v1/models HTTP/1.1\r\nx-a: a\r\n b\r\n\r\n".to_vec(), 400),
        ("a space before a colon", b"GET /v1/models HTTP/1.1\r\nhost : g\r\n\r\n".to_vec(), 400),
        ("a negative length", raw(&format!("POST {CHAT} HTTP/1.1"), "content-length: -1\r\n", ""), 400),
        (
            "a length of 20 digits",
            raw(&format!("POST {CHAT} HTTP/1.1"), "content-length: 99999999999999999999\r\n", ""),
            400,
        ),
        ("two lengths", raw(&format!("POST {CHAT} HTTP/1.1"), "content-length: 2\r\ncontent-length: 3\r\n", "{}"), 400),
        (
            "a length and chunks",
            raw(&format!("POST {CHAT} HTTP/1.1"), "content-length: 5\r\ntransfer-encoding: chunked\r\n", "0\r\n\r\n"),
            400,
        ),
        ("gzip framing", raw(&format!("POST {CHAT} HTTP/1.1"), "transfer-encoding: gzip\r\n", "abc"), 400),
        (
            "a gzip body in chunks",
            raw(&format!("POST {CHAT} HTTP/1.1"), "transfer-encoding: gzip, chunked\r\n", "4\r\nabcd\r\n0\r\n\r\n"),
            415,
        ),
        (
            "a chunk size past 64 bits",
            raw(&format!("POST {CHAT} HTTP/1.1"), "transfer-encoding: chunked\r\n", "ffffffffffffffffffff\r\n"),
            400,
        ),
        (
            "a declared body over the limit",
            raw(&format!("POST {CHAT} HTTP/1.1"), "content-length: 5000000\r\n", ""),
            413,
        ),
        ("GET of chat", raw(&format!("GET {CHAT} HTTP/1.1"), "", ""), 405),
        ("an unknown path", raw("GET /v1/nope HTTP/1.1", "", ""), 404),
        ("CONNECT", raw("CONNECT evil:443 HTTP/1.1", "", ""), 404),
        ("a model id not UTF-8", raw("GET /v1/models/%ff%00 HTTP/1.1", "", ""), 400),
        // The key.
        (
            "no key",
            format!("POST {CHAT} HTTP/1.1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}")
                .into_bytes(),
            401,
        ),
        (
            "a wrong key",
            format!(
                "POST {CHAT} HTTP/1.1\r\nauthorization: Bearer nope\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            )
            .into_bytes(),
            401,
        ),
        (
            // RFC 9110: the scheme's name is case-insensitive. The key is
            // taken; the empty object is not a chat request.
            "the scheme in capitals",
            format!(
                "POST {CHAT} HTTP/1.1\r\nauthorization: BEARER {KEY}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            )
            .into_bytes(),
            400,
        ),
        (
            "a key of 64 KB",
            format!(
                "POST {CHAT} HTTP/1.1\r\nauthorization: Bearer {}\r\ncontent-length: 2\r\n\r\n{{}}",
                "k".repeat(1 << 16)
            )
            .into_bytes(),
            431,
        ),
        // The body.
        ("an empty body", post(CHAT, b""), 400),
        ("null", post(CHAT, b"null"), 400),
        ("an array", post(CHAT, b"[]"), 400),
        ("a byte-order mark", post(CHAT, "\u{feff}{}".as_bytes()), 400),
        ("nesting 100,000 deep", chat(&format!(r#","x":{deep}"#)), 400),
        ("bytes that are not UTF-8", post(CHAT, b"{\"model\":\"\xff\",\"messages\":[]}"), 400),
        ("a raw NUL in a string", post(CHAT, b"{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"a\0b\"}]}"), 400),
        ("a lone surrogate", post(CHAT, br#"{"model":"chat","messages":[{"role":"user","content":"\ud800"}]}"#), 400),
        ("more after the object", post(CHAT, br#"{"model":"chat","messages":[]}{}"#), 400),
        ("the model twice", chat(r#","model":"chat""#), 400),
        ("a model that is an object", post(CHAT, br#"{"model":{},"messages":[]}"#), 400),
        ("a model of 1 MB", post(CHAT, format!(r#"{{"model":"{}","messages":[{{"role":"user","content":"hi"}}]}}"#, "m".repeat(1 << 20)).as_bytes()), 404),
        ("no messages", post(CHAT, br#"{"model":"chat","messages":[]}"#), 400),
        ("max_tokens past f64", chat(r#","max_tokens":1e999"#), 400),
        ("max_tokens negative", chat(r#","max_tokens":-1"#), 400),
        ("NaN", chat(r#","temperature":NaN"#), 400),
        ("n of 0", chat(r#","n":0"#), 400),
        ("stream as a string", chat(r#","stream":"true""#), 400),
        ("a gzip body", {
            let mut request = raw(&format!("POST {CHAT} HTTP/1.1"), "content-encoding: gzip\r\ncontent-length: 4\r\n", "");
            request.extend_from_slice(b"\x1f\x8b\x08\x00");
            request
        }, 415),
        ("an embeddings input of 100,000", post("/v1/embeddings", format!(r#"{{"model":"chat","input":{:?}}}"#, vec!["x"; 100_000]).as_bytes()), 400),
        ("Messages: nothing", post("/v1/messages", b"{}"), 400),
        ("Messages: nesting", post("/v1/messages", format!(r#"{{"model":"chat","max_tokens":5,"messages":{deep}}}"#).as_bytes()), 400),
        ("Responses: nothing", post("/v1/responses", b"{}"), 400),
        ("Responses: stored state", post("/v1/responses", br#"{"model":"chat","input":"x","previous_response_id":"r"}"#), 400),
        // The admin API.
        ("spend with a bad date", spend("from=yesterday"), 400),
        ("spend for two keys", spend("key=a&key=b"), 400),
        ("spend for an empty key", spend("key="), 400),
        (
            "explain of garbage",
            format!("POST /admin/explain HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc").into_bytes(),
            400,
        ),
    ];
    for (case, request, status) in &cases {
        let (got, head, body) = answer(&addr, request).await;
        assert_eq!(got, *status, "{case}: {}", String::from_utf8_lossy(&body));
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{case}: {head}"
        );
        let text = String::from_utf8(body).unwrap_or_else(|_| panic!("{case}: not UTF-8"));
        assert!(
            !text.contains(KEY) && !text.contains(ADMIN_TOKEN),
            "{case} leaks a key: {text}"
        );
        let error: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: {e}: {text}"));
        // The Messages API's errors are Anthropic's shape; the rest OpenAI's.
        let anthropic = head_of(request).contains("/v1/messages");
        if anthropic {
            assert_eq!(error["type"], "error", "{case}: {error}");
        } else {
            assert!(
                error["error"]["code"].is_string() || error["error"]["code"].is_null(),
                "{case}: {error}"
            );
        }
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.len() > 10 && message.len() <= 4096,
            "{case}: {error}"
        );
        assert!(error["error"]["type"].is_string(), "{case}: {error}");
    }
    // A request no route serves is named as its line named it.
    let (_, _, body) = answer(&addr, &raw("CONNECT evil:443 HTTP/1.1", "", "")).await;
    let error: Value = serde_json::from_slice(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("no route for CONNECT evil:443; "),
        "{message}"
    );
    let health = gateway.get("/healthz", None).await;
    assert_eq!(
        health.status(),
        200,
        "the gateway is up after {} bad requests",
        cases.len()
    );
}

#[tokio::test]
async fn an_output_limit_of_zero_is_refused_as_each_api_names_it() {
    let gateway = support::gateway::start(&keyed()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    let cases: [(Vec<u8>, &str); 4] = [
        (chat(r#","max_tokens":0"#), "max_tokens"),
        (
            chat(r#","max_completion_tokens":0"#),
            "max_completion_tokens",
        ),
        (
            post(
                "/v1/responses",
                br#"{"model":"chat","input":"x","max_output_tokens":0}"#,
            ),
            "max_output_tokens",
        ),
        (
            post(
                "/v1/messages",
                br#"{"model":"chat","max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#,
            ),
            "max_tokens",
        ),
    ];
    for (request, field) in cases {
        let (status, _, body) = answer(&addr, &request).await;
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("`{field}` must be at least 1")),
            "{message}"
        );
    }
    // Legacy completions take 0 with `echo`, to score a prompt.
    let scoring = post(
        "/v1/completions",
        br#"{"model":"chat","prompt":"x","max_tokens":0,"echo":true}"#,
    );
    assert_eq!(answer(&addr, &scoring).await.0, 200);
}

/// `METHOD PATH` with the admin token and `body`, closing after.
fn admin(line: &str, body: &str) -> Vec<u8> {
    format!(
        "{line} HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A simulated chat model `chat` and the key `team`.
fn keyed() -> Config {
    Config::new()
        .backend(Backend::simulated("sim").answers(5, 1000, 5))
        .model(Model::new("chat").deployment(Deployment::new("sim", "m")))
        .key(Key::new("team"))
}

/// `keyed`, with the admin API.
fn admin_gateway() -> Config {
    keyed().admin()
}

const EXPLAIN: &str = r#"{"request":{"model":"chat","messages":[{"role":"user","content":"hi"}]}}"#;

#[tokio::test]
async fn every_admin_call_refuses_a_query_parameter_it_does_not_take() {
    let gateway = support::gateway::start(&admin_gateway()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    // Each call, with a parameter it does not take: a misspelt or
    // misplaced one is never read as something else, nor ignored.
    for (line, body) in [
        ("GET /admin/status?verbose=true", ""),
        ("GET /admin/config?version=1", ""),
        ("POST /admin/explain?dry_run=true", EXPLAIN),
        ("GET /admin/spend?month=2026-12", ""),
        ("GET /admin/licence?key=team", ""),
        ("POST /admin/reload?dry-run=true", ""),
    ] {
        let (status, _, body) = answer(&addr, &admin(line, body)).await;
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400, "{line}: {error}");
        let param = error["error"]["param"].as_str().unwrap_or_default();
        assert!(line.contains(&format!("?{param}=")), "{line}: {error}");
    }
}

#[tokio::test]
async fn an_admin_error_echoes_what_the_caller_sent_up_to_256_characters() {
    let gateway = support::gateway::start(&admin_gateway()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    let long = "x".repeat(3000);
    for (line, body) in [
        (format!("POST /admin/reload?dry_run={long}"), String::new()),
        (format!("GET /admin/licence?month={long}"), String::new()),
        (
            "POST /admin/explain".to_owned(),
            EXPLAIN.replace(r#""request""#, &format!(r#""key":"{long}","request""#)),
        ),
        (
            "POST /admin/explain".to_owned(),
            EXPLAIN.replace(r#""request""#, &format!(r#""api":"{long}","request""#)),
        ),
        (
            "POST /admin/explain".to_owned(),
            EXPLAIN.replace(r#""request""#, &format!(r#""{long}":1,"request""#)),
        ),
    ] {
        let (status, _, body) = answer(&addr, &admin(&line, &body)).await;
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400, "{line}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        let longest_run = message
            .split(|c| c != 'x')
            .map(str::len)
            .max()
            .unwrap_or_default();
        assert!(
            (1..=256).contains(&longest_run) && message.contains('…'),
            "{line}: {longest_run} characters echoed: {message}"
        );
    }
}

#[tokio::test]
async fn spend_and_licence_refuse_a_year_the_ledger_cannot_hold() {
    let gateway = support::gateway::start(&admin_gateway()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    // Year 0, a negative year, the day before the clock starts, a signed
    // year (`+` is `%2B` in a query) and one of five digits: each a 400
    // naming the parameter, the range told when the date is one.
    for (query, param, range) in [
        ("from=0000-01-01", "from", true),
        ("to=-0001-12-31", "to", false),
        ("from=1969-12-31", "from", true),
        ("from=%2B2026-11-28", "from", false),
        ("to=99999-01-01", "to", false),
    ] {
        let (status, _, body) = answer(&addr, &spend(query)).await;
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400, "{query}: {error}");
        assert_eq!(error["error"]["param"], param, "{query}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert_eq!(
            message.contains("from 1970-01-01 to 9999-12-31"),
            range,
            "{query}: {message}"
        );
    }
    for query in ["from=1970-01-01&to=9999-12-31", "from=2026-11-28"] {
        assert_eq!(answer(&addr, &spend(query)).await.0, 200, "{query}");
    }
    let licence = |month: &str| admin(&format!("GET /admin/licence?month={month}"), "");
    let (status, _, body) = answer(&addr, &licence("0000-12")).await;
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "month", "{error}");
    assert_eq!(answer(&addr, &licence("1970-01")).await.0, 200);
}

#[tokio::test]
async fn without_an_admin_token_every_admin_path_is_404_whatever_the_method() {
    let gateway = support::gateway::start(&keyed()).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    // A 405 would tell a scanner which admin paths exist, and with which
    // method; a path that never existed is the 404 to compare with.
    let paths = [
        "/admin/explain",
        "/admin/spend",
        "/admin/licence",
        "/admin/status",
        "/admin/reload",
        "/admin/config",
        "/admin/nothing",
    ];
    for path in paths {
        for method in ["GET", "POST", "PUT", "DELETE"] {
            let line = format!("{method} {path}");
            let (status, _, body) = answer(&addr, &admin(&line, "")).await;
            let error: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(status, 404, "{line}: {error}");
            assert_eq!(
                error["error"]["message"].as_str().unwrap(),
                format!(
                    "no route for {line}; this gateway serves /v1/chat/completions, /v1/completions, \
                     /v1/embeddings, /v1/messages, /v1/responses and /v1/models"
                ),
                "{line}"
            );
        }
    }
}
