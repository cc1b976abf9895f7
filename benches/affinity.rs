//! What affinity is worth on a self-hosted pool with prefix caches: a
//! replay of multi-turn conversations over four simulated vLLM-like
//! deployments (each with a prefix cache), once per `affinity` setting.
//!
//! `cargo bench --bench affinity` (AFFINITY_SESSIONS, AFFINITY_TURNS and
//! AFFINITY_CONCURRENCY tune it). Each session has its own system prompt
//! and sends its turns one after another, each resending the whole
//! conversation with the answer it got; `AFFINITY_CONCURRENCY` sessions
//! (by default all of them) run at once, so their turns interleave as
//! users' do. Prints, per setting: the share of prompt tokens read from
//! the deployments' caches, time to first token (mean and p95, at the
//! client), the cost the gateway metered, and the busiest deployment's
//! requests over the mean.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_number, metered_cost, percentile};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Model};
use tokio::sync::Semaphore;

const DEPLOYMENTS: usize = 4;

/// Four simulated self-hosted pools: a full prefill takes 400 ms to the
/// first token, answers run 48 tokens at 400 tokens/s, and each cache
/// holds 8192 blocks (about 131k tokens): room for a quarter of the
/// sessions' conversations, not for all of them.
fn config(affinity: &str) -> Config {
    let mut model = Model::new("llama").affinity(affinity);
    let mut config = Config::new();
    for i in 0..DEPLOYMENTS {
        let name = format!("gpu{i}");
        config = config.backend(
            Backend::simulated(&name)
                .answers(400, 400, 48)
                .prefix_cache(8192)
                .pool(2.5, 1, 2500)
                .set("max_concurrency", 64),
        );
        model = model.deployment(Deployment::named(&name, &name).set("context_window", 131_072));
    }
    config.model(model)
}

/// One turn's result as the client saw it.
struct Turn {
    ttft: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
    backend: String,
    answer: String,
}

/// Sends one streamed turn and reads it to the end.
async fn turn(client: &reqwest::Client, url: &str, session: &str, body: &Value) -> Turn {
    let start = Instant::now();
    let response = client
        .post(url)
        .header("x-session-id", session)
        .json(body)
        .send()
        .await
        .expect("the gateway answers");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let backend = response.headers()["x-tollgate-backend"]
        .to_str()
        .expect("a backend name")
        .to_owned();
    let mut ttft = None;
    let (mut answer, mut usage, mut buffer) = (String::new(), Value::Null, Vec::new());
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        buffer.extend_from_slice(&bytes.expect("the stream reads"));
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let data = std::str::from_utf8(&event).expect("UTF-8").trim();
            let Some(data) = data.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
            if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
                ttft.get_or_insert_with(|| start.elapsed());
                answer.push_str(text);
            }
            if !chunk["usage"].is_null() {
                usage = chunk["usage"].clone();
            }
        }
    }
    Turn {
        ttft: ttft.expect("a first token"),
        prompt_tokens: usage["prompt_tokens"].as_u64().expect("usage"),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        backend,
        answer,
    }
}

/// One conversation of `turns` turns, each resending what came before.
async fn session(client: reqwest::Client, url: String, n: usize, turns: usize) -> Vec<Turn> {
    let system = format!(
        "Session {n}. You are the operations assistant of a GPU fleet. {}",
        "Answer from the fleet's runbooks, cite the runbook section, and keep answers short. "
            .repeat(20)
    );
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut results = Vec::with_capacity(turns);
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!(
            "Question {t} of session {n}: which replicas need attention, and why? {}",
            "Include queue depth and cache use. ".repeat(3)
        )}));
        let body = json!({"model": "llama", "stream": true,
                          "stream_options": {"include_usage": true}, "messages": messages});
        let result = turn(&client, &url, &format!("s-{n}"), &body).await;
        messages.push(json!({"role": "assistant", "content": result.answer}));
        results.push(result);
    }
    results
}

fn main() {
    let sessions = env_number("AFFINITY_SESSIONS", 200);
    let turns = env_number("AFFINITY_TURNS", 8);
    let concurrency = env_number("AFFINITY_CONCURRENCY", sessions);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "affinity replay: {sessions} sessions x {turns} turns over {DEPLOYMENTS} simulated self-hosted \
         deployments, {concurrency} sessions at once, {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<9} {:>10} {:>14} {:>13} {:>11} {:>14}",
        "affinity", "cache hit", "TTFT mean ms", "TTFT p95 ms", "cost USD", "max/mean load"
    );
    for affinity in ["none", "session", "prefix"] {
        runtime.block_on(async {
            let gateway = support::gateway::start(&config(affinity)).await;
            let url = format!("{}/v1/chat/completions", gateway.base);
            let gate = Arc::new(Semaphore::new(concurrency));
            let runs: Vec<_> = (0..sessions)
                .map(|n| {
                    let (client, url, gate) = (gateway.http.clone(), url.clone(), gate.clone());
                    tokio::spawn(async move {
                        let _slot = gate.acquire_owned().await.expect("the gate stays open");
                        session(client, url, n, turns).await
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(sessions * turns);
            for run in runs {
                all.extend(run.await.expect("the session ran"));
            }
            let prompt: u64 = all.iter().map(|t| t.prompt_tokens).sum();
            let cached: u64 = all.iter().map(|t| t.cached_tokens).sum();
            let mut ttfts: Vec<Duration> = all.iter().map(|t| t.ttft).collect();
            ttfts.sort_unstable();
            let mean = ttfts.iter().sum::<Duration>() / ttfts.len() as u32;
            let mut load = [0usize; DEPLOYMENTS];
            for t in &all {
                let i: usize = t.backend.trim_start_matches("gpu").parse().expect("gpuN");
                load[i] += 1;
            }
            let max_over_mean = *load.iter().max().expect("deployments") as f64
                / (all.len() as f64 / DEPLOYMENTS as f64);
            let metrics = gateway.metrics().await;
            let cost = metered_cost(
                &metrics,
                "llama",
                (0..DEPLOYMENTS).map(|i| format!("gpu{i}")),
            );
            println!(
                "{affinity:<9} {:>10.3} {:>14.0} {:>13.0} {:>11.6} {:>14.2}",
                cached as f64 / prompt as f64,
                mean.as_secs_f64() * 1e3,
                percentile(&ttfts, 0.95).as_secs_f64() * 1e3,
                cost,
                max_over_mean
            );
        });
    }
}
