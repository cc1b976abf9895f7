//! What the gateway adds: latency and throughput through tollgate versus
//! calling the mock upstream directly, non-streaming and streaming.
//!
//! `cargo bench --bench overhead` (BENCH_SECONDS, BENCH_REQUESTS and
//! BENCH_CONCURRENCY tune it). Everything runs in one process on one
//! runtime — client, gateway and mock share the machine's cores — so the
//! figures are the gateway's cost on a loaded box, not a proxy shoot-out;
//! `benches/load/` is the pinned, multi-process harness against nginx.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{env_number, percentile};
use support::config::{Backend, Config, Deployment, Model};
use support::gateway::url;
use support::mock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpListener;

/// A ~2 KB chat request, the size of a typical prompt with a system message.
fn request_body(stream: bool) -> Vec<u8> {
    let filler = "Summarise the following support ticket in two sentences. ".repeat(30);
    serde_json::to_vec(&serde_json::json!({
        "model": "bench",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": filler},
        ],
        "max_tokens": 64,
    }))
    .expect("serialises")
}

struct Target {
    name: &'static str,
    url: String,
}

/// One request; returns (time to first body byte, total time).
async fn one(client: &reqwest::Client, url: &str, body: &[u8]) -> (Duration, Duration) {
    let start = Instant::now();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .expect("request succeeds");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let mut stream = response.bytes_stream();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        chunk.expect("body reads");
        first.get_or_insert_with(|| start.elapsed());
    }
    (first.unwrap_or_else(|| start.elapsed()), start.elapsed())
}

struct Latency {
    first_p50: Duration,
    total_p50: Duration,
    total_p99: Duration,
}

async fn latency(target: &Target, body: &[u8], requests: u64) -> Latency {
    let client = reqwest::Client::new();
    for _ in 0..requests / 10 {
        one(&client, &target.url, body).await; // warm up the pools
    }
    let mut firsts = Vec::with_capacity(requests as usize);
    let mut totals = Vec::with_capacity(requests as usize);
    for _ in 0..requests {
        let (first, total) = one(&client, &target.url, body).await;
        firsts.push(first);
        totals.push(total);
    }
    firsts.sort_unstable();
    totals.sort_unstable();
    Latency {
        first_p50: percentile(&firsts, 0.5),
        total_p50: percentile(&totals, 0.5),
        total_p99: percentile(&totals, 0.99),
    }
}

async fn throughput(target: &Target, body: &[u8], concurrency: u64, seconds: u64) -> f64 {
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, body, done) = (
                client.clone(),
                target.url.clone(),
                body.to_vec(),
                done.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    one(&client, &url, &body).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for worker in workers {
        worker.await.expect("worker ran");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let seconds = env_number("BENCH_SECONDS", 5);
        let requests = env_number("BENCH_REQUESTS", 2000);
        let concurrency = env_number("BENCH_CONCURRENCY", 32);
        let upstream = mock::MockUpstream::canned(20).start().await;
        let config = Config::new()
            .backend(Backend::new("mock", "vllm", &url(&upstream)))
            .model(
                Model::new("bench").deployment(
                    Deployment::new("mock", "meta-llama/Llama-3.1-8B-Instruct")
                        .set("context_window", 131_072),
                ),
            );
        let config =
            tollgate::config::parse(&config.to_toml(), &|_| None).expect("bench config is valid");
        let gateway = tollgate::Gateway::new(config).expect("gateway builds");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway_url = format!("http://{}/v1/chat/completions", listener.local_addr().expect("addr"));
        tokio::spawn(gateway.serve(listener, std::future::pending()));

        let targets = [
            Target {
                name: "direct",
                url: format!("{}/v1/chat/completions", upstream.base_url()),
            },
            Target {
                name: "tollgate",
                url: gateway_url,
            },
        ];
        println!(
            "gateway overhead: {requests} sequential requests for latency, {concurrency} connections for {seconds} s for throughput, {} cores\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<14} {:<9} {:>12} {:>12} {:>12} {:>10}",
            "mode", "target", "first p50 µs", "total p50 µs", "total p99 µs", "req/s"
        );
        for (mode, stream) in [("non-streaming", false), ("streaming x20", true)] {
            let body = request_body(stream);
            let mut rows = Vec::new();
            for target in &targets {
                let l = latency(target, &body, requests).await;
                let rps = throughput(target, &body, concurrency, seconds).await;
                println!(
                    "{mode:<14} {:<9} {:>12.0} {:>12.0} {:>12.0} {:>10.0}",
                    target.name,
                    micros(l.first_p50),
                    micros(l.total_p50),
                    micros(l.total_p99),
                    rps
                );
                rows.push((l, rps));
            }
            let (direct, gateway) = (&rows[0], &rows[1]);
            println!(
                "{mode:<14} added: first byte p50 +{:.0} µs, total p50 +{:.0} µs; throughput ratio {:.2} (tollgate / direct)\n",
                micros(gateway.0.first_p50) - micros(direct.0.first_p50),
                micros(gateway.0.total_p50) - micros(direct.0.total_p50),
                gateway.1 / direct.1
            );
        }
    });
}
