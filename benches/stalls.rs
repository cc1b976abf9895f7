//! No stalls (issue 23): how long the gateway holds a streamed chunk when
//! 512 streams each get a chunk every 50 ms from their upstream and 32
//! other connections keep the gateway at full load, and what a chunk of
//! such a stream costs it, beside nginx.
//!
//! `cargo bench --bench stalls` (`STALL_STREAMS`, `STALL_LOAD`,
//! `STALL_SECONDS` and `STALL_ROUNDS` tune it; `STALL_LOAD=0` gives each
//! proxy's CPU per chunk alone).
//!
//! The mock upstream writes the time into each chunk just before it writes
//! the chunk to its socket; the client reads the time again when the chunk
//! arrives. The same streams run straight to the mock (the baseline: what
//! the mock, the client and the loaded machine add), through nginx as a
//! plain reverse proxy (when nginx is installed) and through the gateway,
//! each with its load: non-streaming requests from `STALL_LOAD`
//! connections, each sent as soon as the last is answered, through the
//! proxy measured (through the gateway in the baseline). A chunk's time
//! through a proxy minus the baseline, at each percentile, is what the
//! proxy holds it.
//!
//! Placed as `benches/load/run.sh` places its proxies: the gateway is the
//! release binary on CPU 0 alone (so one thread, as the binary runs on one
//! CPU), and so is nginx (one process); this process (the mock, the
//! streams' client and the load) on the other CPUs. Needs `taskset` and at
//! least 2 CPUs.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::url;
use support::mock;
use support::process::serve_config_on_one_cpu;

use common::{env_number, percentile};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// The interval between an upstream's chunks.
const INTERVAL: Duration = Duration::from_millis(50);
/// Chunks in one stream: a 2 s answer, then the client asks again.
const CHUNKS: usize = 40;
const KEY: &str = "stall-bench-key";

/// The clock the mock stamps chunks with and the client reads them by.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------- the mock

/// One SSE event of an OpenAI chat stream, in an HTTP/1.1 chunk.
fn http_chunk(event: &str) -> Vec<u8> {
    format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
}

fn delta_event(content: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"chatcmpl-stall\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\
         \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    )
}

/// What the gateway asks the mock: a chat stream, or its engine metrics.
enum Asked {
    Chat,
    Metrics,
}

/// Reads one request (head and `content-length` body); `None` at the end
/// of the connection.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Asked> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let asked = if head.starts_with("get") {
                Asked::Metrics
            } else {
                Asked::Chat
            };
            let total = end + 4 + length;
            while buffer.len() < total {
                if !fill(socket, buffer).await {
                    return None;
                }
            }
            buffer.drain(..total);
            return Some(asked);
        }
        if !fill(socket, buffer).await {
            return None;
        }
    }
}

async fn fill(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut block = [0u8; 8192];
    match socket.read(&mut block).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&block[..n]);
            true
        }
    }
}

/// Answers every chat request with a stream of `CHUNKS` chunks, one every
/// `INTERVAL`, each holding the time it was written at (`t=<ns>`), and
/// the gateway's scrapes of engine metrics with an empty page.
async fn stamping_upstream(listener: TcpListener) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            while let Some(asked) = read_request(&mut socket, &mut buffer).await {
                let answered = match asked {
                    Asked::Chat => stream(&mut socket).await,
                    Asked::Metrics => {
                        socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                    }
                };
                if answered.is_err() {
                    return;
                }
            }
        });
    }
}

async fn stream(socket: &mut TcpStream) -> std::io::Result<()> {
    socket
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
    let mut ticks = tokio::time::interval(INTERVAL);
    for _ in 0..CHUNKS {
        ticks.tick().await;
        let event = delta_event(&format!("t={}", now_ns()), None);
        socket.write_all(&http_chunk(&event)).await?;
    }
    let usage = format!(
        "data: {{\"id\":\"chatcmpl-stall\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\
         \"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{CHUNKS},\"total_tokens\":{}}}}}\n\n",
        12 + CHUNKS
    );
    let mut end = http_chunk(&delta_event("", Some("stop")));
    end.extend(http_chunk(&usage));
    end.extend(http_chunk("data: [DONE]\n\n"));
    end.extend(b"0\r\n\r\n");
    socket.write_all(&end).await
}

// ---------------------------------------------------------------- nginx

/// nginx as a plain reverse proxy on CPU 0, set as `benches/load` sets
/// it: streams (`/stream/…`) to the stamping mock unbuffered, the load to
/// the canned mock, kept-alive upstream connections, its access log on.
/// One process (no master), so its CPU is that process's.
struct Nginx {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `None` when there is no nginx to run.
    fn start(stamping: &str, canned: &str) -> Option<Self> {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())?;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let work = dir.path().display();
        let host = |url: &str| {
            let rest = url.trim_start_matches("http://");
            rest.split('/').next().unwrap_or(rest).to_owned()
        };
        let (stamping, canned) = (host(stamping), host(canned));
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {work}/nginx.pid;\n\
             error_log {work}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n access_log {work}/access.log;\n client_body_temp_path {work}/body;\n\
             proxy_temp_path {work}/proxy;\n fastcgi_temp_path {work}/fastcgi;\n\
             uwsgi_temp_path {work}/uwsgi;\n scgi_temp_path {work}/scgi;\n\
             keepalive_requests 10000000;\n keepalive_timeout 300s;\n\
             client_body_buffer_size 16k;\n tcp_nodelay on;\n\
             upstream stamping {{ server {stamping}; keepalive 1024; }}\n\
             upstream canned {{ server {canned}; keepalive 64; }}\n\
             server {{\n  listen 127.0.0.1:{port} backlog=4096;\n  proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n\
             location /stream/ {{ proxy_pass http://stamping/; proxy_buffering off; }}\n\
             location / {{ proxy_pass http://canned; }}\n }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf written");
        let child = std::process::Command::new("taskset")
            .args(["-c", "0", binary, "-c"])
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "nginx listens on {address}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self {
            child,
            base: format!("http://{address}"),
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- the client

/// Per-chunk delays of the chunks that arrived while
/// recording.
#[derive(Default)]
struct Delays {
    recording: AtomicBool,
    samples: Mutex<Vec<Duration>>,
    failures: AtomicU64,
}

/// Reads the stamps of the events in `bytes` (whole events only; a part
/// stays in `pending`).
fn stamps(pending: &mut Vec<u8>, bytes: &[u8], mut each: impl FnMut(u64)) {
    pending.extend_from_slice(bytes);
    let mut consumed = 0;
    while let Some(end) = pending[consumed..].windows(2).position(|w| w == b"\n\n") {
        let event = &pending[consumed..consumed + end];
        if let Some(at) = event.windows(2).position(|w| w == b"t=") {
            let digits = event[at + 2..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
            each(digits);
        }
        consumed += end + 2;
    }
    pending.drain(..consumed);
}

/// One stream after another until `until`, recording each chunk's delay.
async fn streamer(
    client: reqwest::Client,
    url: String,
    body: Vec<u8>,
    start_after: Duration,
    until: Instant,
    delays: Arc<Delays>,
) {
    tokio::time::sleep(start_after).await;
    let mut local = Vec::new();
    while Instant::now() < until {
        let response = post(&client, &url, &body).send().await;
        let Ok(response) = response.and_then(reqwest::Response::error_for_status) else {
            delays.failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(INTERVAL).await;
            continue;
        };
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(Ok(bytes)) = body.next().await {
            let arrived = now_ns();
            if delays.recording.load(Ordering::Relaxed) {
                stamps(&mut pending, &bytes, |sent| {
                    local.push(Duration::from_nanos(arrived.saturating_sub(sent)));
                });
            }
        }
    }
    delays.samples.lock().expect("not poisoned").extend(local);
}

/// A chat request with the bench's key.
fn post(client: &reqwest::Client, url: &str, body: &[u8]) -> reqwest::RequestBuilder {
    client
        .post(url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_vec())
}

/// Requests sent one after another on each of `connections` until `stop`.
fn load(
    runtime: &Runtime,
    url: &str,
    connections: u64,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let filler = "Summarise the following support ticket in two sentences. ".repeat(30);
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "load",
        "messages": [{"role": "user", "content": filler}],
        "max_tokens": 64,
    }))
    .expect("serialises");
    let client = reqwest::Client::new();
    (0..connections)
        .map(|_| {
            let (client, url, body, stop, done) = (
                client.clone(),
                url.to_owned(),
                body.clone(),
                stop.clone(),
                done.clone(),
            );
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let sent = post(&client, &url, &body).send().await;
                    if let Ok(response) = sent {
                        let _ = response.bytes().await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// What a proxy added to each percentile in a round, and its CPU per
/// chunk.
struct Added {
    round: u64,
    proxy: &'static str,
    figures: [f64; 5],
    per_chunk: f64,
}

/// Where one phase's streams and load go, and whose CPU it reads.
struct Route<'a> {
    name: &'static str,
    streams: &'a str,
    load: &'a str,
    /// The proxy the phase measures; in the direct phase, the gateway
    /// under load.
    proxy: u32,
}

struct Phase {
    delays: Vec<Duration>,
    failures: u64,
    load_per_second: f64,
    /// The proxy's CPU time over the time recorded.
    proxy_busy: f64,
    /// The proxy's CPU time per chunk recorded: what a chunk costs it when
    /// there is no load.
    proxy_per_chunk: Duration,
    /// The CPU time of everything else on the machine (other builds, say)
    /// over the time recorded, in CPUs: what makes one round differ from
    /// the next.
    others_busy: f64,
}

/// The CPU time of every CPU of the machine so far, in seconds: all but
/// idle and waiting for I/O.
fn machine_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (ticks.iter().take(8).sum::<f64>() - idle) / 100.0
}

/// A process's CPU time (user and system) so far, in seconds (the ticks
/// of `/proc` are hundredths).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime
    // are the 14th and 15th of the line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = fields[11..13]
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// `streams` streams along `route` for `seconds` (after a second's
/// warm-up), with its load.
fn phase(
    client_rt: &Runtime,
    load_rt: &Runtime,
    route: &Route<'_>,
    streams: u64,
    connections: u64,
    seconds: u64,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load_tasks = load(load_rt, route.load, connections, &stop, &done);
    let delays = Arc::new(Delays::default());
    let warm_up = Duration::from_secs(1);
    let until = Instant::now() + warm_up + Duration::from_secs(seconds);
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "stream",
        "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }))
    .expect("serialises");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(streams as usize)
        .build()
        .expect("client");
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            // Streams start spread over one interval, as real ones do not
            // tick together.
            let offset = INTERVAL.mul_f64(i as f64 / streams as f64);
            client_rt.spawn(streamer(
                client.clone(),
                route.streams.to_owned(),
                body.clone(),
                offset,
                until,
                delays.clone(),
            ))
        })
        .collect();
    std::thread::sleep(warm_up);
    let load_before = done.load(Ordering::Relaxed);
    delays.recording.store(true, Ordering::Relaxed);
    let ours = || {
        (
            cpu_seconds(route.proxy),
            cpu_seconds(std::process::id()),
            machine_seconds(),
        )
    };
    let (recorded, before) = (Instant::now(), ours());
    std::thread::sleep(Duration::from_secs(seconds));
    delays.recording.store(false, Ordering::Relaxed);
    let after = ours();
    let elapsed = recorded.elapsed().as_secs_f64();
    let load_per_second = (done.load(Ordering::Relaxed) - load_before) as f64 / elapsed;
    let proxy_seconds = after.0 - before.0;
    let others_busy =
        ((after.2 - before.2) - (after.0 - before.0) - (after.1 - before.1)) / elapsed;
    client_rt.block_on(async {
        for task in tasks {
            task.await.expect("streamer ran");
        }
    });
    stop.store(true, Ordering::Relaxed);
    load_rt.block_on(async {
        for task in load_tasks {
            task.await.expect("load ran");
        }
    });
    let mut samples = std::mem::take(&mut *delays.samples.lock().expect("not poisoned"));
    samples.sort_unstable();
    Phase {
        proxy_busy: proxy_seconds / elapsed,
        proxy_per_chunk: Duration::from_secs_f64(proxy_seconds / samples.len().max(1) as f64),
        delays: samples,
        failures: delays.failures.load(Ordering::Relaxed),
        load_per_second,
        others_busy,
    }
}

const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("max", 1.0),
];

fn main() {
    let streams = env_number("STALL_STREAMS", 512);
    let connections = env_number("STALL_LOAD", 32);
    let seconds = env_number("STALL_SECONDS", 10);
    let rounds = env_number("STALL_ROUNDS", 3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "the gateway needs a CPU of its own, and this bench another"
    );
    // This process on every CPU but the gateway's; its threads inherit it.
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &format!("1-{}", cores - 1)])
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(pinned.success(), "taskset pins this process");
    let _ = *EPOCH;

    let client_rt = runtime(cores - 1);
    let load_rt = runtime(1);

    let stamping = client_rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(stamping_upstream(listener));
        format!("http://{addr}")
    });
    let canned = load_rt.block_on(mock::MockUpstream::canned(20).start());
    let config = Config::new()
        .backend(Backend::new("stamping", "vllm", &stamping))
        .backend(Backend::new("canned", "vllm", &url(&canned)))
        .model(
            Model::new("stream")
                .deployment(Deployment::new("stamping", "m").set("context_window", 131_072)),
        )
        .model(
            Model::new("load")
                .deployment(Deployment::new("canned", "m").set("context_window", 131_072)),
        )
        .key(Key::hashed(
            "bench",
            &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(KEY)),
        ));
    let gateway = serve_config_on_one_cpu(&config);
    let nginx = Nginx::start(&stamping, &url(&canned));
    let gateway_load = format!("{}/v1/chat/completions", gateway.base);
    let direct = format!("{stamping}/v1/chat/completions");
    let through = gateway_load.clone();
    let nginx_urls = nginx.as_ref().map(|n| {
        (
            format!("{}/stream/v1/chat/completions", n.base),
            format!("{}/v1/chat/completions", n.base),
        )
    });
    let mut routes = vec![Route {
        name: "direct",
        streams: &direct,
        load: &gateway_load,
        proxy: gateway.child.id(),
    }];
    if let (Some(nginx), Some((streams, load))) = (&nginx, &nginx_urls) {
        routes.push(Route {
            name: "nginx",
            streams,
            load,
            proxy: nginx.child.id(),
        });
    }
    routes.push(Route {
        name: "tollgate",
        streams: &through,
        load: &gateway_load,
        proxy: gateway.child.id(),
    });

    println!(
        "stalls: {streams} streams of a chunk every {} ms, {connections} connections of \
         non-streaming load on the proxy, {seconds} s a phase, {rounds} rounds; the proxy \
         on CPU 0, this process on CPUs 1-{}{}\n",
        INTERVAL.as_millis(),
        cores - 1,
        if nginx.is_some() {
            ""
        } else {
            "; no nginx found, so no nginx phase"
        }
    );
    println!(
        "{:<6} {:<9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>11} {:>10} {:>13} {:>13}",
        "round",
        "target",
        "chunks",
        "failed",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "load req/s",
        "proxy CPU",
        "CPU µs/chunk",
        "others' CPUs"
    );
    let mut added = Vec::new();
    for round in 1..=rounds {
        let mut direct_figures = [0.0; 5];
        for route in &routes {
            let p = phase(&client_rt, &load_rt, route, streams, connections, seconds);
            let figures = PERCENTILES.map(|(_, q)| percentile(&p.delays, q).as_secs_f64() * 1e6);
            let per_chunk = p.proxy_per_chunk.as_secs_f64() * 1e6;
            // With load, the proxy's CPU is mostly the load's.
            let per_chunk_shown = if connections == 0 {
                format!("{per_chunk:.1}")
            } else {
                "-".to_owned()
            };
            println!(
                "{round:<6} {:<9} {:>8} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0} {:>11.0} {:>9.0}% {:>13} {:>13.2}",
                route.name,
                p.delays.len(),
                p.failures,
                figures[0],
                figures[1],
                figures[2],
                figures[3],
                figures[4],
                p.load_per_second,
                p.proxy_busy * 100.0,
                per_chunk_shown,
                p.others_busy
            );
            if route.name == "direct" {
                direct_figures = figures;
            } else {
                added.push(Added {
                    round,
                    proxy: route.name,
                    figures: std::array::from_fn(|i| figures[i] - direct_figures[i]),
                    per_chunk,
                });
            }
        }
    }
    println!();
    for a in &added {
        let parts: Vec<String> = PERCENTILES
            .iter()
            .zip(a.figures)
            .map(|((label, _), us)| format!("{label} {us:+.0} µs"))
            .collect();
        println!(
            "round {}: added by {}: {}",
            a.round,
            a.proxy,
            parts.join(", ")
        );
    }
    for route in routes.iter().skip(1) {
        let of = |figure: fn(&Added) -> f64| {
            let mut values: Vec<f64> = added
                .iter()
                .filter(|a| a.proxy == route.name)
                .map(figure)
                .collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let cpu = if connections == 0 {
            format!("; CPU {:.1} µs a chunk", of(|a| a.per_chunk))
        } else {
            String::new()
        };
        println!(
            "median over the rounds, {}: added p50 {:+.0} µs, p99 {:+.0} µs{cpu}",
            route.name,
            of(|a| a.figures[0]),
            of(|a| a.figures[2]),
        );
    }
    println!("target (issue 23): tollgate's p99 added ≤ 5000 µs");
}
