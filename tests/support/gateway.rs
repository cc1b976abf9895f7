//! The gateway under test and its client: the environment it sees,
//! starting it in-process on 127.0.0.1, reading SSE events and OpenAI errors
//! as a client does.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::bedrock_mock::{Auth, Expect};
use super::config::Config;
use super::mock::{MockServer, MockUpstream};

/// The longest any single step may take before a test gives up: a bound
/// against hangs, never a measure of speed.
pub const WAIT: Duration = Duration::from_secs(10);

// ---- the environment -----------------------------------------------------

/// The environment the gateway under test sees; nothing comes from the
/// process environment.
pub fn env(name: &str) -> Option<String> {
    if let Some(backend) = name.strip_prefix("UPSTREAM_KEY_") {
        return Some(format!(
            "sk-test-{}",
            backend.to_lowercase().replace('_', "-")
        ));
    }
    if name == "ADMIN_TOKEN" {
        return Some(ADMIN_TOKEN.to_owned());
    }
    if name == "METRICS_TOKEN" {
        return Some(METRICS_TOKEN.to_owned());
    }
    match name {
        "AWS_KEY_ID_TEST" => Some(AWS_KEY_ID.into()),
        "AWS_SECRET_TEST" => Some(AWS_SECRET.into()),
        "AWS_TOKEN_TEST" => Some(AWS_TOKEN.into()),
        // A secret the mock Bedrock does not know: its signatures fail.
        "AWS_WRONG_SECRET_TEST" => Some("not/the/secret".into()),
        "BEDROCK_API_KEY_TEST" => Some(BEDROCK_API_KEY.into()),
        // KEY_TEAM is "team-secret".
        _ => name
            .strip_prefix("KEY_")
            .map(|key| format!("{}-secret", key.to_lowercase().replace('_', "-"))),
    }
}

/// The admin token the environment holds under `ADMIN_TOKEN`, for
/// `[admin] token_env = "ADMIN_TOKEN"`.
pub const ADMIN_TOKEN: &str = "admin-token";

/// The token the environment holds under `METRICS_TOKEN`, for
/// `[metrics] token_env = "METRICS_TOKEN"`.
pub const METRICS_TOKEN: &str = "metrics-token";

/// The AWS credentials `env` gives the gateway, for the mock Bedrock to
/// expect.
pub const AWS_KEY_ID: &str = "AKIDTOLLGATETEST";
pub const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYTOLLGATE";
pub const AWS_TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN";
pub const BEDROCK_API_KEY: &str = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl";

pub fn url(mock: &MockServer) -> String {
    format!("{}/v1", mock.base_url())
}

// ---- the gateway and its client ------------------------------------------

pub struct Gateway {
    pub base: String,
    pub http: reqwest::Client,
}

/// A gateway on `config`; reloads see the same injected environment.
pub async fn start(config: &Config) -> Gateway {
    let config = tollgate::config::parse(&config.to_toml(), &env).expect("valid test config");
    let options = tollgate::server::GatewayOptions {
        env: std::sync::Arc::new(env),
        config_file: None,
    };
    serve(tollgate::Gateway::with_options(config, options).expect("gateway builds")).await
}

/// A gateway started from a config file, which it watches and reloads;
/// reloads see the same injected environment.
pub async fn start_from_file(path: &std::path::Path) -> Gateway {
    let text = std::fs::read_to_string(path).expect("config file is readable");
    let config = tollgate::config::parse(&text, &env).expect("valid test config");
    let options = tollgate::server::GatewayOptions {
        env: std::sync::Arc::new(env),
        config_file: Some(path.to_owned()),
    };
    serve(tollgate::Gateway::with_options(config, options).expect("gateway builds")).await
}

async fn serve(gateway: tollgate::Gateway) -> Gateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    Gateway { base, http }
}

impl Gateway {
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.post("/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A streamed request that must succeed: its headers, and its events
    /// to read one by one.
    pub async fn stream(&self, path: &str, body: Value) -> (reqwest::header::HeaderMap, Events) {
        let response = self.post(path).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200, "the stream starts");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        (response.headers().clone(), Events::new(response))
    }

    /// A chat request with the API key `key`.
    pub async fn chat_as(&self, key: &str, body: Value) -> reqwest::Response {
        self.post_as(key, "/v1/chat/completions", body).await
    }

    /// `body` to `path` with the API key `key`.
    pub async fn post_as(&self, key: &str, path: &str, body: Value) -> reqwest::Response {
        self.post(path)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn completion(&self, body: Value) -> reqwest::Response {
        self.post("/v1/completions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Waits until `value` output tokens, as the upstream counted them,
    /// are metered for `alias` on `backend`, asked through `api`.
    pub async fn eventually_exact_output_tokens(
        &self,
        api: &str,
        alias: &str,
        backend: &str,
        value: u64,
    ) {
        let labels = [
            ("api", api),
            ("alias", alias),
            ("backend", backend),
            ("direction", "output"),
            ("estimated", "false"),
        ];
        self.eventually_metric("tollgate_tokens_total", &labels, value as f64)
            .await;
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.unwrap()
    }

    /// `GET /admin/spend{query}`, which must answer 200.
    pub async fn spend(&self, query: &str) -> Value {
        self.admin(&format!("/admin/spend{query}")).await
    }

    /// `GET` of an admin endpoint with the admin token, which must answer
    /// 200 with JSON.
    pub async fn admin(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics", None).await.text().await.unwrap()
    }

    /// Polls /metrics until `name{labels}` has `value`; bounded by WAIT.
    pub async fn eventually_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            if metric(&text, name, labels) == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} never reached {value}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until one request is recorded under `labels`, and checks a
    /// moment later that it still is one: recorded once, never twice.
    pub async fn recorded_once(&self, labels: &[(&str, &str)]) {
        self.eventually_metric("tollgate_requests_total", labels, 1.0)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = self.metrics().await;
        assert_eq!(
            metric(&text, "tollgate_requests_total", labels),
            Some(1.0),
            "{text}"
        );
    }
}

/// The value of one sample in a Prometheus text exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let inner = if rest.is_empty() {
                ""
            } else {
                rest.strip_prefix('{')?.strip_suffix('}')?
            };
            let found: Vec<(&str, &str)> = inner
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            let matches = found.len() == labels.len() && labels.iter().all(|l| found.contains(l));
            matches.then(|| value.parse().ok()).flatten()
        })
}

/// The `data:` payloads of an SSE body, read incrementally.
pub struct Events {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl Events {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next event's payload; `None` at the end of the body.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(event).expect("events are UTF-8");
                let payload = text
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {text:?}"));
                return Some(payload.to_owned());
            }
            match tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("the gateway sends the next event in time")
            {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.expect("body reads")),
                None => {
                    assert!(self.buffer.is_empty(), "a partial event at the end");
                    return None;
                }
            }
        }
    }

    /// Every payload left, to the end of the body.
    pub async fn rest(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(event) = self.next().await {
            out.push(event);
        }
        out
    }
}

pub fn is_usage_only(payload: &str) -> bool {
    serde_json::from_str::<Value>(payload)
        .is_ok_and(|c| c["choices"] == json!([]) && c["usage"].is_object())
}

pub fn parse(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap_or_else(|e| panic!("{payload}: {e}"))
}

/// The value of the header `name` of `response`, which must have it.
pub fn header<'r>(response: &'r reqwest::Response, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

/// The OpenAI error object of an error response, checked for shape.
pub async fn error_of(response: reqwest::Response) -> Value {
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    check_error_shape(&body);
    body["error"].clone()
}

pub fn check_error_shape(body: &Value) {
    let error = &body["error"];
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

pub fn message(error: &Value) -> &str {
    error["message"].as_str().unwrap()
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// The base64 of a PNG `width` by `height` pixels, as far as its header:
/// all an image's size is read from, and all a mock loads.
pub fn png_base64(width: u32, height: u32) -> String {
    use base64::Engine as _;
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    bytes.extend(width.to_be_bytes());
    bytes.extend(height.to_be_bytes());
    bytes.extend(b"\x08\x06\0\0\0\0\0\0\0");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `png_base64` as a data URL.
pub fn png(width: u32, height: u32) -> String {
    format!("data:image/png;base64,{}", png_base64(width, height))
}

/// The mock Bedrock that accepts what `Backend::sigv4_with_token` signs
/// with.
pub fn bedrock_mock_with_token() -> MockUpstream {
    MockUpstream::bedrock(Expect {
        region: "us-east-1".into(),
        auth: Auth::SigV4 {
            access_key_id: AWS_KEY_ID.into(),
            secret_access_key: AWS_SECRET.into(),
            session_token: Some(AWS_TOKEN.into()),
        },
    })
}

// ---- explain -------------------------------------------------------------

impl Gateway {
    /// `POST /admin/explain` with the admin token.
    pub async fn ask_explain(&self, ask: &Value) -> reqwest::Response {
        self.post("/admin/explain")
            .bearer_auth(ADMIN_TOKEN)
            .json(ask)
            .send()
            .await
            .unwrap()
    }

    /// `POST /admin/explain`, which must succeed.
    pub async fn explain(&self, ask: Value) -> Value {
        let response = self.ask_explain(&ask).await;
        assert_eq!(response.status(), 200, "explain answers");
        response.json().await.unwrap()
    }

    /// Polls `POST /admin/explain` until `done` holds for its answer, and
    /// returns that answer; bounded by WAIT.
    pub async fn explain_until(&self, ask: Value, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let explained = self.explain(ask.clone()).await;
            if done(&explained) {
                return explained;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "explain never got there; last:\n{explained:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The candidate for deployment `name` in an explain answer.
pub fn candidate<'e>(explained: &'e Value, name: &str) -> &'e Value {
    explained["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .find(|c| c["deployment"] == name)
        .unwrap_or_else(|| panic!("no candidate {name} in {explained:#}"))
}

/// The `reason` explain gives for deployment `name`.
pub fn reason<'e>(explained: &'e Value, name: &str) -> &'e str {
    candidate(explained, name)["reason"]
        .as_str()
        .expect("a reason")
}

/// Waits until `mock` has served `count` scrapes of `GET /metrics`.
pub async fn scraped(mock: &MockServer, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while mock.scrapes() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} scrapes",
            mock.scrapes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `x-tollgate-backend` and `x-tollgate-attempts` of a response.
pub fn served_by(response: &reqwest::Response) -> (String, String) {
    let header = |name| {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    (header("x-tollgate-backend"), header("x-tollgate-attempts"))
}

/// The events of an SSE body written with `event:` lines (Messages,
/// Responses), in order: each event's name and its data parsed as JSON.
/// Every event must have both lines.
pub fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event
                .split_once('\n')
                .unwrap_or_else(|| panic!("not a named event: {event:?}"));
            let name = name
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event line: {event:?}"));
            let data = data
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no data line: {event:?}"));
            (name.to_owned(), parse(data))
        })
        .collect()
}

/// That `ours` has the shape of `reference`, an object from a provider's
/// own recording: every member it has, the reference has too, with a value
/// of the same JSON type (objects compared the same way, arrays by their
/// first elements); `optional` names members the reference may lack.
pub fn check_shape(ours: &Value, reference: &Value, optional: &[&str], at: &str) {
    match (ours, reference) {
        (Value::Object(ours), Value::Object(reference)) => {
            for (name, value) in ours {
                let path = format!("{at}.{name}");
                match reference.get(name) {
                    Some(theirs) => check_shape(value, theirs, optional, &path),
                    None => assert!(
                        optional.contains(&name.as_str()),
                        "{path} is not in the reference"
                    ),
                }
            }
        }
        (Value::Array(ours), Value::Array(reference)) => {
            if let (Some(ours), Some(theirs)) = (ours.first(), reference.first()) {
                check_shape(ours, theirs, optional, &format!("{at}[0]"));
            }
        }
        // `null` where the reference has a value (or the other way) is
        // the optional field's other state.
        (Value::Null, _) | (_, Value::Null) => {}
        (ours, reference) => assert_eq!(
            std::mem::discriminant(ours),
            std::mem::discriminant(reference),
            "{at}: {ours} where the reference has {reference}"
        ),
    }
}

/// A streamed chat request to alias `chat` of the gateway at `base` over
/// HTTP/2 with prior knowledge, from a client whose streams' window is
/// HTTP/2's default.
pub async fn http2_stream(base: &str) -> hyper::Response<hyper::body::Incoming> {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let addr = base.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let body = json!({"model": "chat", "stream": true, "messages": user("hi")}).to_string();
    let request = hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.send_request(request).await.unwrap()
}
