//! What TTFT hedging buys against a slow tail, and what it costs: the
//! same streamed requests through four simulated per-token deployments,
//! 5% of whose answers wait 2 s for their first token instead of 150 ms,
//! once without a hedge and once per hedge setting.
//!
//! `cargo bench --bench hedging` (HEDGING_REQUESTS and
//! HEDGING_CONCURRENCY tune it). Prints, per setting: time to first token
//! at the client (p50, p95, p99), the cost the gateway metered (the
//! cancelled attempts' prompts included), and the hedges by outcome.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_number, metered_cost, percentile};
use futures_util::StreamExt;
use serde_json::json;
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::metric;
use tokio::sync::Semaphore;

const DEPLOYMENTS: usize = 4;

/// Four per-token deployments at $0.88 per Mtok each way, spread by
/// weight; answers of 32 tokens at 1,000 tokens/s after 150 ms, or after
/// 2 s for 5% of them. `hedge` sets the alias's hedge, if any.
fn config(hedge: Setting) -> Config {
    let mut model = hedge(Model::new("llama").strategy("weighted"));
    let mut config = Config::new();
    for i in 0..DEPLOYMENTS {
        let name = format!("api{i}");
        config = config.backend(
            Backend::simulated(&name)
                .answers(150, 1_000, 32)
                .set_simulated("slow_fraction", 0.05)
                .set_simulated("slow_ttft_ms", 2_000),
        );
        model = model.deployment(
            Deployment::named(&name, &name)
                .price(0.88, 0.88)
                .set("context_window", 131_072),
        );
    }
    config.model(model)
}

/// Time to the first content chunk of one streamed request.
async fn ttft(client: &reqwest::Client, url: &str, n: usize) -> Duration {
    let body = json!({"model": "llama", "stream": true, "max_tokens": 32, "messages": [
        {"role": "system", "content": "You are the operations assistant of a GPU fleet. ".repeat(20)},
        {"role": "user", "content": format!("Request {n}: which replicas need attention?")}]});
    let start = Instant::now();
    let response = client
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let mut stream = response.bytes_stream();
    let mut first = None;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.expect("the stream reads");
        if first.is_none() && bytes.windows(9).any(|w| w == b"\"content\"") {
            first = Some(start.elapsed());
        }
    }
    first.expect("a first token")
}

/// How a setting changes the alias.
type Setting = fn(Model) -> Model;

fn main() {
    let requests = env_number("HEDGING_REQUESTS", 2_000);
    let concurrency = env_number("HEDGING_CONCURRENCY", 64);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "hedging: {requests} streamed requests, {concurrency} at once, over {DEPLOYMENTS} simulated \
         deployments with a 5% tail of 2 s first tokens (150 ms otherwise), {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>11} {:>10} {:>10} {:>10}",
        "hedge", "p50 ms", "p95 ms", "p99 ms", "cost USD", "hedge won", "first won", "over"
    );
    let settings: [(&str, Setting); 3] = [
        ("none", |model| model),
        ("after_ms = 400", |model| model.hedge_after(400, 0.001)),
        ("after_quantile = 0.95", |model| {
            model
                .hedge("after_quantile", 0.95)
                .hedge("max_extra_usd_per_request", 0.001)
        }),
    ];
    for (name, hedge) in settings {
        runtime.block_on(async {
            let gateway = support::gateway::start(&config(hedge)).await;
            let url = format!("{}/v1/chat/completions", gateway.base);
            let gate = Arc::new(Semaphore::new(concurrency));
            let runs: Vec<_> = (0..requests)
                .map(|n| {
                    let (client, url, gate) = (gateway.http.clone(), url.clone(), gate.clone());
                    tokio::spawn(async move {
                        let _slot = gate.acquire_owned().await.expect("the gate stays open");
                        ttft(&client, &url, n).await
                    })
                })
                .collect();
            let mut ttfts = Vec::with_capacity(requests);
            for run in runs {
                ttfts.push(run.await.expect("the request ran"));
            }
            ttfts.sort_unstable();
            let metrics = gateway.metrics().await;
            let cost = metered_cost(
                &metrics,
                "llama",
                (0..DEPLOYMENTS).map(|i| format!("api{i}")),
            );
            let hedges = |outcome| {
                metric(
                    &metrics,
                    "tollgate_hedges_total",
                    &[("alias", "llama"), ("outcome", outcome)],
                )
                .unwrap_or(0.0)
            };
            let ms = |p| percentile(&ttfts, p).as_secs_f64() * 1e3;
            println!(
                "{name:<28} {:>8.0} {:>8.0} {:>8.0} {:>11.6} {:>10} {:>10} {:>10}",
                ms(0.5),
                ms(0.95),
                ms(0.99),
                cost,
                hedges("hedge_won"),
                hedges("first_won"),
                hedges("over_allowance"),
            );
        });
    }
}
