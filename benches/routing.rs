//! Time per routing decision for an alias with 8 deployments, for each
//! strategy: policy filters, health checks, scoring and ordering.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::health::LiveState;
use tollgate::routing::{self, RequestFacts};
use tollgate::state::Snapshot;

fn config(strategy: &str) -> String {
    let mut text = String::new();
    for i in 0..8 {
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
    text += &format!("[[models]]\nalias = \"llama\"\nstrategy = \"{strategy}\"\n");
    for i in 0..8 {
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
    let facts = RequestFacts {
        region: Some("us".into()),
        input_tokens: 500,
        max_output_tokens: Some(256),
        stream: true,
        ..RequestFacts::default()
    };
    let mut group = c.benchmark_group("routing decision, 8 deployments");
    for strategy in ["cost", "latency", "spillover", "weighted"] {
        let config = tollgate::config::parse(&config(strategy), &|_| None).expect("valid config");
        let snapshot = Snapshot::build(config, &LiveState::default()).expect("snapshot builds");
        let mut rng = fastrand::Rng::with_seed(7);
        group.bench_function(strategy, |b| {
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
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
