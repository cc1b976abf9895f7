//! What the Llama licence's bookkeeping adds to a request: finding and
//! hashing its end user, then counting it and its usage in the month (the
//! sketch's register, the licence's counters) and the request in its
//! hour, the clock read for it included.
//!
//! `cargo bench --bench licence`

use std::hint::black_box;

use axum::http::HeaderMap;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use time::OffsetDateTime;
use tollgate::config::{Licence, LicenceSettings};
use tollgate::licence::{LicenceBook, end_user, hll};
use tollgate::openai::{Endpoint, InboundRequest, Usage};

const ALIAS: &str = "llama-3.3-70b";

fn per_request(c: &mut Criterion) {
    let body = r#"{"model":"llama-3.3-70b","user":"user-4711@example.com","messages":[{"role":"user","content":"Hello"}]}"#;
    let request =
        InboundRequest::parse(Endpoint::Chat, Bytes::from_static(body.as_bytes())).unwrap();
    let headers = HeaderMap::new();
    let settings = LicenceSettings::default();
    let book = LicenceBook::default();
    let usage = Usage::new(2_000, 500);
    // A month of a million users: most requests come from a user the
    // sketch has seen.
    let users: Vec<u64> = (0..1_000_000u64)
        .map(|i| hll::hash(format!("user-{i}").as_bytes()))
        .collect();
    for &user in &users {
        let now = OffsetDateTime::now_utc();
        book.served(ALIAS, Some(Licence::Llama), Some(user), &usage, 1_000, now);
    }
    let mut group = c.benchmark_group("licence, per request");
    group.bench_function("end user: find and hash", |b| {
        b.iter(|| black_box(end_user(black_box(&request), &headers, &settings)))
    });
    let mut next = 0;
    group.bench_function("count: a Llama request, a user seen before", |b| {
        b.iter(|| {
            next = (next + 1) % users.len();
            book.served(
                ALIAS,
                Some(Licence::Llama),
                Some(black_box(users[next])),
                &usage,
                1_000,
                OffsetDateTime::now_utc(),
            );
        })
    });
    let mut fresh = 0u64;
    group.bench_function("count: a Llama request, a new user", |b| {
        b.iter(|| {
            fresh += 1;
            book.served(
                ALIAS,
                Some(Licence::Llama),
                Some(hll::hash(&fresh.to_le_bytes())),
                &usage,
                1_000,
                OffsetDateTime::now_utc(),
            );
        })
    });
    group.bench_function("count: a request of no licence", |b| {
        b.iter(|| {
            let now = OffsetDateTime::now_utc();
            book.served(black_box(ALIAS), None, None, &usage, 1_000, now)
        })
    });
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
