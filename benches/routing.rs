//! Time per routing decision for an alias with 8 deployments, for each
//! strategy: policy filters, health checks, scoring and ordering; without
//! affinity, then binding the request's session (`+session`), then
//! matching its prompt's blocks (`+prefix`). Then the same for an alias
//! of 64 deployments, the largest issue 23 plans for.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use tollgate::health::LiveState;
use tollgate::openai::{Endpoint, InboundRequest};
use tollgate::routing::{self, RequestFacts, Session};
use tollgate::state::Snapshot;

/// An alias of `deployments` deployments, each on a backend of its own:
/// half self-hosted in the EU, half per-token in the US.
fn config(strategy: &str, affinity: &str, deployments: usize) -> String {
    let mut text = String::new();
    for i in 0..deployments {
        let (region, pricing) = if i % 2 == 0 {
            (
                "eu-west-1",
                "gpu_hour_usd = 2.5\ngpus = 4\nthroughput_tokens_per_second = 2500\nmax_concurrency = 64",
            )
        } else {
            ("us-east-1", "")
        };
        text += &format!(
            "[[backends]]\nname = \"b{i}\"\nkind = \"simulated\"\nregion = \"{region}\"\n{pricing}\n"
        );
    }
    text += &format!(
        "[[models]]\nalias = \"llama\"\nstrategy = \"{strategy}\"\naffinity = \"{affinity}\"\n"
    );
    for i in 0..deployments {
        let price = if i % 2 == 0 {
            ""
        } else {
            "input_usd_per_mtok = 0.88\noutput_usd_per_mtok = 0.88\n"
        };
        text += &format!(
            "[[models.deployments]]\nbackend = \"b{i}\"\nmodel = \"m\"\ncontext_window = 131072\nlicence = \"llama\"\ntools = true\nweight = {}\n{price}",
            i + 1
        );
    }
    text += "[policy]\n[[policy.residency]]\nrequest_region = \"eu\"\nbackend_regions = [\"eu-west-1\"]\n";
    text
}

fn decisions(c: &mut Criterion) {
    // A 500-token prompt: a system prompt and a question.
    let body = serde_json::json!({"model": "llama", "messages": [
        {"role": "system", "content": "You are a careful assistant. ".repeat(60)},
        {"role": "user", "content": "Which of these replicas needs attention first?"}]});
    let request = InboundRequest::parse(Endpoint::Chat, body.to_string().into()).expect("parses");
    let strategies = ["cost", "latency", "spillover", "weighted"].map(|s| (s, "none"));
    let with_affinity = [
        ("cost", "session"),
        ("weighted", "session"),
        ("cost", "prefix"),
    ];
    for deployments in [8, 64] {
        let mut group = c.benchmark_group(format!("routing decision, {deployments} deployments"));
        for (strategy, affinity) in strategies.into_iter().chain(with_affinity) {
            plans(&mut group, &request, strategy, affinity, deployments);
        }
        group.finish();
    }
    // What affinity adds before planning: the session read from the
    // request, from its header or by hashing its opening.
    let mut group = c.benchmark_group("session of a 500-token request");
    for (name, header) in [("x-session-id", Some(&b"session-1"[..])), ("opening", None)] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(Session::of(black_box(&request), header)))
        });
    }
    group.finish();
}

/// Benchmarks one plan of the alias of `config(strategy, affinity, deployments)`.
fn plans(
    group: &mut BenchmarkGroup<'_, WallTime>,
    request: &InboundRequest,
    strategy: &str,
    affinity: &str,
    deployments: usize,
) {
    let text = config(strategy, affinity, deployments);
    let config = tollgate::config::parse(&text, &|_| None).expect("valid config");
    let facts = RequestFacts {
        region: Some("us".into()),
        input_tokens: 500,
        max_output_tokens: Some(256),
        stream: true,
        ..RequestFacts::default()
    }
    .with_affinity(request, config.models[0].affinity, Some(b"session-1"));
    let snapshot = Snapshot::build(config, &LiveState::default()).expect("snapshot builds");
    let mut rng = fastrand::Rng::with_seed(7);
    let name = match affinity {
        "none" => strategy.to_owned(),
        _ => format!("{strategy}+{affinity}"),
    };
    group.bench_function(name, |b| {
        b.iter(|| {
            black_box(routing::plan(
                &snapshot,
                0,
                black_box(&facts),
                Instant::now(),
                &mut rng,
            ))
        })
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
