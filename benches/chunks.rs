//! What reading a stream's chunks costs the gateway, per upstream: the
//! chunks of each recorded stream in `tests/fixtures/openai/` (vLLM, OpenAI,
//! Together, Groq), read as the streamed response reads them. Upstreams
//! differ in what their content chunks
//! carry (`"usage": null` on each of OpenAI's and Together's, Groq's usage
//! under `x_groq`), which decides which chunks are parsed in full.
//!
//! `cargo bench --bench chunks`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::metering::usage::StreamReader;

const STREAMS: [(&str, &str); 4] = [
    (
        "vllm",
        include_str!("../tests/fixtures/openai/vllm_chat_usage.sse"),
    ),
    (
        "openai",
        include_str!("../tests/fixtures/openai/openai_chat_usage.sse"),
    ),
    (
        "together",
        include_str!("../tests/fixtures/openai/together_chat.sse"),
    ),
    (
        "groq",
        include_str!("../tests/fixtures/openai/groq_chat.sse"),
    ),
];

/// The JSON of each event, as the SSE parser hands it on.
fn chunks(sse: &str) -> Vec<&[u8]> {
    sse.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(str::as_bytes)
        .collect()
}

fn read_chunks(c: &mut Criterion) {
    let mut group = c.benchmark_group("read a stream's chunks");
    for (upstream, sse) in STREAMS {
        let chunks = chunks(sse);
        group.throughput(Throughput::Elements(chunks.len() as u64));
        group.bench_function(upstream, |b| {
            b.iter(|| {
                let mut reader = StreamReader::default();
                for chunk in &chunks {
                    let facts = reader.read("b", black_box(chunk)).unwrap();
                    black_box(facts);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, read_chunks);
criterion_main!(benches);
