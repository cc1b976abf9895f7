//! A gateway's traffic in miniature, through the real binary: chat,
//! legacy completions, embeddings, Anthropic Messages and OpenAI Responses,
//! whole and streamed, to an OpenAI-compatible server (vLLM), TGI and
//! Bedrock, over HTTP/1.1 and HTTP/2, with key auth, routing, metering
//! into the ledger and the odd refused request. `deploy/release/build.sh`
//! lays out the shipped binary's code by what this traffic runs (BOLT);
//! on its own it checks every answer and prints what it sent.
//!
//! `cargo bench --profile dev --bench workload` (`TOLLGATE_TEST_BIN` picks
//! the binary, else the one cargo built; `WORKLOAD_ROUNDS` [60] and
//! `WORKLOAD_CONCURRENCY` [8] size it). The mix is not the load test's
//! (`benches/load`): that one request is a small part of it.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{bedrock_mock_with_token, env, url};
use support::kinds::Kind;
use support::mock::MockUpstream;
use support::process::{binary, serve_file};

use common::env_number;

/// One kind of request, and the status it must get.
struct Ask {
    name: &'static str,
    path: &'static str,
    body: Value,
    key: &'static str,
    expect: StatusCode,
}

impl Ask {
    fn ok(name: &'static str, path: &'static str, body: Value) -> Self {
        Self {
            name,
            path,
            body,
            key: "team-secret",
            expect: StatusCode::OK,
        }
    }
}

/// A conversation of `turns` user turns, each a little longer than the
/// last: prompts from a few words to a few kilobytes.
fn conversation(turns: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a concise assistant."})];
    for turn in 0..turns {
        let text = "Summarise the following support ticket in two sentences. ".repeat(1 + turn * 6);
        messages.push(json!({"role": "user", "content": text}));
        if turn + 1 < turns {
            messages.push(json!({"role": "assistant", "content": "Noted."}));
        }
    }
    Value::Array(messages)
}

fn chat(model: &str, turns: usize, stream: bool) -> Value {
    let mut body = json!({"model": model, "messages": conversation(turns), "max_tokens": 256});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The mix, most of it chat over vLLM as most of a gateway's traffic is;
/// each worker goes round it from its own place.
fn asks() -> Vec<Ask> {
    let mut asks = Vec::new();
    for turns in [1, 2, 4] {
        asks.push(Ask::ok(
            "chat",
            "/v1/chat/completions",
            chat("llama", turns, false),
        ));
        asks.push(Ask::ok(
            "chat stream",
            "/v1/chat/completions",
            chat("llama", turns, true),
        ));
    }
    for (model, name, stream_name) in [
        ("llama-tgi", "chat tgi", "chat stream tgi"),
        ("llama-bedrock", "chat bedrock", "chat stream bedrock"),
    ] {
        asks.push(Ask::ok(name, "/v1/chat/completions", chat(model, 2, false)));
        asks.push(Ask::ok(
            stream_name,
            "/v1/chat/completions",
            chat(model, 2, true),
        ));
    }
    let prompt = "Write a haiku about load balancers.";
    asks.extend([
        Ask::ok(
            "completion",
            "/v1/completions",
            json!({"model": "llama", "prompt": prompt, "max_tokens": 64}),
        ),
        Ask::ok(
            "completion stream",
            "/v1/completions",
            json!({"model": "llama", "prompt": prompt, "max_tokens": 64, "stream": true}),
        ),
        Ask::ok(
            "completion tgi",
            "/v1/completions",
            json!({"model": "llama-tgi", "prompt": prompt, "max_tokens": 64}),
        ),
        Ask::ok(
            "embeddings",
            "/v1/embeddings",
            json!({"model": "embed", "input": ["a support ticket", "another one"]}),
        ),
        Ask::ok(
            "messages",
            "/v1/messages",
            json!({"model": "llama", "max_tokens": 256, "messages": [{"role": "user", "content": prompt}]}),
        ),
        Ask::ok(
            "messages stream",
            "/v1/messages",
            json!({"model": "llama", "max_tokens": 256, "stream": true, "messages": [{"role": "user", "content": prompt}]}),
        ),
        Ask::ok(
            "responses",
            "/v1/responses",
            json!({"model": "llama", "input": prompt}),
        ),
        Ask::ok(
            "responses stream",
            "/v1/responses",
            json!({"model": "llama", "input": prompt, "stream": true}),
        ),
        Ask {
            key: "not-a-key",
            expect: StatusCode::UNAUTHORIZED,
            ..Ask::ok("wrong key", "/v1/chat/completions", chat("llama", 1, false))
        },
        Ask {
            expect: StatusCode::NOT_FOUND,
            ..Ask::ok("unknown model", "/v1/chat/completions", chat("gpt-9", 1, false))
        },
        Ask {
            expect: StatusCode::BAD_REQUEST,
            ..Ask::ok(
                "no messages",
                "/v1/chat/completions",
                json!({"model": "llama"}),
            )
        },
    ]);
    asks
}

/// Two vLLM servers behind `llama`, with `embed` on the first; TGI
/// behind `llama-tgi`; Bedrock behind `llama-bedrock`.
fn config(vllm: [&str; 2], tgi: &str, bedrock: &str, ledger: &std::path::Path) -> Config {
    let llama = |name: &str| Deployment::named(name, name).price(0.1, 0.2);
    Config::new()
        .backend(Backend::upstream("vllm-a", "vllm", vllm[0]))
        .backend(Backend::upstream("vllm-b", "vllm", vllm[1]))
        .backend(Backend::upstream("tgi", "tgi", tgi))
        .backend(Backend::bedrock("bedrock", bedrock).sigv4_with_token())
        .model(
            Model::new("llama")
                .deployment(llama("vllm-a"))
                .deployment(llama("vllm-b")),
        )
        .model(
            Model::new("embed").deployment(
                Deployment::named("embed", "vllm-a")
                    .set("endpoints", vec!["embeddings"])
                    .price(0.02, 0.0),
            ),
        )
        .model(Model::new("llama-tgi").deployment(llama("tgi")))
        .model(Model::new("llama-bedrock").deployment(
            Deployment::new("bedrock", Kind::Bedrock.upstream_model()).price(0.72, 0.72),
        ))
        .key(Key::new("team"))
        .set("ledger", "data_dir", ledger.to_str().expect("a UTF-8 path"))
}

/// What went wrong with one answer, if anything.
async fn send(client: &reqwest::Client, base: &str, ask: &Ask) -> Option<String> {
    let response = client
        .post(format!("{base}{}", ask.path))
        .bearer_auth(ask.key)
        .json(&ask.body)
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(e) => return Some(format!("{}: {e}", ask.name)),
    };
    let status = response.status();
    // The whole body: a stream is read to its end, as a client reads it.
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return Some(format!("{}: {e}", ask.name)),
    };
    let body_text = || String::from_utf8_lossy(&body);
    if status != ask.expect {
        return Some(format!(
            "{}: {status}, expected {}: {}",
            ask.name,
            ask.expect,
            body_text()
        ));
    }
    match stream_end(ask) {
        Some(end) if memchr::memmem::find(&body, end.as_bytes()).is_none() => Some(format!(
            "{}: the stream never reached `{end}`: {}",
            ask.name,
            body_text()
        )),
        None if body.is_empty() => Some(format!("{}: an empty body", ask.name)),
        _ => None,
    }
}

/// What a successful stream of `ask`'s API ends with: a stream that
/// stopped short, or with an error event, is a wrong answer.
fn stream_end(ask: &Ask) -> Option<&'static str> {
    if ask.expect != StatusCode::OK || ask.body["stream"] != true {
        return None;
    }
    Some(match ask.path {
        "/v1/messages" => "event: message_stop",
        "/v1/responses" => "event: response.completed",
        _ => "data: [DONE]",
    })
}

#[tokio::main]
async fn main() {
    let rounds: usize = env_number("WORKLOAD_ROUNDS", 60);
    let concurrency: usize = env_number("WORKLOAD_CONCURRENCY", 8);

    let vllm_a = MockUpstream::canned(20).start().await;
    let vllm_b = MockUpstream::canned(20).start().await;
    let tgi = MockUpstream::tgi()
        .answers_of(20)
        .record(false)
        .start()
        .await;
    let bedrock = bedrock_mock_with_token()
        .answers_of(20)
        .record(false)
        .start()
        .await;
    let work = tempfile::tempdir().expect("a temp dir");
    let config = config(
        [&url(&vllm_a), &url(&vllm_b)],
        &tgi.base_url(),
        &bedrock.base_url(),
        &work.path().join("ledger"),
    );
    let config_file = work.path().join("tollgate.toml");
    std::fs::write(&config_file, config.to_toml()).expect("the config is written");
    let secrets: Vec<(String, String)> = [
        "UPSTREAM_KEY_VLLM_A",
        "UPSTREAM_KEY_VLLM_B",
        "UPSTREAM_KEY_TGI",
        "AWS_KEY_ID_TEST",
        "AWS_SECRET_TEST",
        "AWS_TOKEN_TEST",
        "KEY_TEAM",
    ]
    .into_iter()
    .map(|name| (name.to_owned(), env(name).expect("a test secret")))
    .collect();
    let secrets: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut gateway = serve_file(&config_file, &secrets);

    let asks = Arc::new(asks());
    let client = |http2: bool| {
        let builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30));
        if http2 {
            builder.http2_prior_knowledge()
        } else {
            builder
        }
        .build()
        .expect("a client")
    };
    // One worker in eight speaks HTTP/2, as a client behind a proxy that
    // keeps one connection per origin might.
    let (http1, http2) = (client(false), client(true));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let client = if worker % 8 == 7 { &http2 } else { &http1 }.clone();
            let (asks, base) = (asks.clone(), gateway.base.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0..rounds * asks.len() {
                    let ask = &asks[(worker * 7 + i) % asks.len()];
                    failures.extend(send(&client, &base, ask).await);
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.expect("a worker finishes"));
    }
    let sent = rounds * asks.len() * concurrency;
    let elapsed = started.elapsed();

    // A clean exit, so an instrumented binary writes its profile.
    gateway.signal("-TERM");
    let status = gateway.wait_exit(Duration::from_secs(30));
    println!(
        "{sent} requests ({} kinds × {rounds} rounds × {concurrency} workers) in {:.1} s through {}; {} failed; gateway exited {status}",
        asks.len(),
        elapsed.as_secs_f64(),
        binary().display(),
        failures.len(),
    );
    for failure in failures.iter().take(10) {
        eprintln!("  {failure}");
    }
    assert!(failures.is_empty(), "{} answers were wrong", failures.len());
    assert!(status.success(), "the gateway exits cleanly on SIGTERM");
}
