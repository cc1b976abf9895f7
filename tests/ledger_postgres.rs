//! The ledger in PostgreSQL, as a fleet lives it: real gateway processes
//! sharing a real PostgreSQL (`support::postgres`) on 127.0.0.1. Each
//! test compares what the database and `/admin/spend` say against what
//! the clients received, through a shared database, its outage, a killed
//! replica, a stopped one, a full restart of the fleet and replicas
//! starting at once.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::certs::{ServerTls, TestCa};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{ADMIN_TOKEN, WAIT, check_error_shape, metric, user};
use support::postgres::Postgres;
use support::process::{Process, serve_file};

const URL_ENV: &str = "TOLLGATE_POSTGRES_URL";
const READY: &str = "the ledger's PostgreSQL is ready";
const UNREACHABLE: &str = "cannot ship spend to the ledger's PostgreSQL";

/// Nano-dollars per input and output token: $5 and $15 per Mtok.
const NANO_PER_TOKEN: (u64, u64) = (5_000, 15_000);

/// What clients were told they used, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Received {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

impl Received {
    fn add(&mut self, usage: &Value) {
        self.requests += 1;
        self.input_tokens += usage["prompt_tokens"].as_u64().unwrap();
        self.output_tokens += usage["completion_tokens"].as_u64().unwrap();
    }

    fn merge(&mut self, other: &Received) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }

    fn cost_usd(&self) -> f64 {
        (self.input_tokens * NANO_PER_TOKEN.0 + self.output_tokens * NANO_PER_TOKEN.1) as f64 / 1e9
    }

    /// Whether a `/admin/spend` total says the same.
    fn matches(&self, total: &Value) -> bool {
        total["requests"] == self.requests
            && total["input_tokens"] == self.input_tokens
            && total["output_tokens"] == self.output_tokens
            && (total["cost_usd"].as_f64().unwrap() - self.cost_usd()).abs() < 1e-9
    }
}

/// One gateway of the fleet: its config file and data_dir under `dir`.
struct Replica {
    config: PathBuf,
    data_dir: PathBuf,
    url: String,
}

impl Replica {
    /// Replica `name` of the fleet on `postgres`, shipping every
    /// `flush_ms`; the key `capped` may spend `capped_daily_usd` a day.
    fn new(dir: &Path, name: &str, postgres: &Postgres, flush_ms: u32) -> Self {
        let data_dir = dir.join(name);
        let config = dir.join(format!("{name}.toml"));
        let text = Config::new()
            .backend(Backend::simulated("sim").answers(1, 100_000, 20))
            .model(Model::new("chat").deployment(Deployment::new("sim", "m").price(5.0, 15.0)))
            .key(Key::new("team"))
            .key(Key::new("capped").set("budget_daily_usd", 0.001))
            .set("ledger", "backend", "postgres")
            .set("ledger", "url_env", URL_ENV)
            .set("ledger", "data_dir", data_dir.to_str().unwrap())
            .set("ledger", "flush_interval_ms", flush_ms)
            .admin()
            .to_toml();
        std::fs::write(&config, text).unwrap();
        Self {
            config,
            data_dir,
            url: postgres.url(),
        }
    }

    /// Starts the gateway; it serves at once, whether the database
    /// answers or not.
    fn serve(&self) -> Process {
        serve_file(
            &self.config,
            &[
                (URL_ENV, self.url.as_str()),
                ("ADMIN_TOKEN", ADMIN_TOKEN),
                ("KEY_TEAM", "team-secret"),
                ("KEY_CAPPED", "capped-secret"),
            ],
        )
    }

    /// Records waiting in this replica's spool.
    fn spooled(&self) -> u64 {
        let spool = rusqlite::Connection::open_with_flags(
            self.data_dir.join("tollgate-spool.sqlite3"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        spool.busy_timeout(WAIT).unwrap();
        spool
            .query_row("SELECT count(*) FROM spool", [], |r| r.get(0))
            .unwrap()
    }

    /// Waits, within `WAIT`, until the spool holds `count` records.
    fn eventually_spooled(&self, count: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.spooled() != count {
            assert!(
                std::time::Instant::now() < deadline,
                "the spool never held {count} records, but {}",
                self.spooled()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// A chat request as `key`, with `request_id` as its `x-request-id`.
async fn chat(base: &str, key: &str, request_id: &str, text: &str) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", request_id)
        .json(&json!({"model": "chat", "messages": user(text)}))
        .send()
        .await
        .expect("the gateway answers in time")
}

/// Sends `count` requests as `team`, spread over `replicas` in turn, each
/// of which must succeed; adds what each response says was used.
async fn load(replicas: &[&Process], count: usize, received: &mut Received) {
    for i in 0..count {
        let base = &replicas[i % replicas.len()].base;
        // Prompts of different lengths, so token sums tell requests apart.
        let text = format!("request {i}: {}", "word ".repeat(i % 7));
        let response = chat(base, "team-secret", &format!("load-{i}"), &text).await;
        assert_eq!(response.status(), 200, "request {i} to {base}");
        received.add(&response.json::<Value>().await.unwrap()["usage"]);
    }
}

async fn spend(base: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/admin/spend"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

/// Polls `/admin/spend` on `base` until its total is `expected`; returns
/// the answer.
async fn eventually_spend(base: &str, expected: &Received) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = spend(base).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        if status == 200 && expected.matches(&body["total"]) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{base}/admin/spend never reached {expected:?}; last ({status}): {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tollgate_ledger_write_failing` of `process`.
async fn write_failing(process: &Process) -> Option<f64> {
    metric(
        &process.metrics().await,
        "tollgate_ledger_write_failing",
        &[],
    )
}

async fn records_in(postgres: &Postgres) -> i64 {
    postgres
        .client()
        .await
        .query_one("SELECT count(*) FROM ledger_records", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn every_replica_answers_for_the_fleet_with_one_record_per_request() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Process> = ["a", "b", "c"]
        .iter()
        .map(|name| Replica::new(dir.path(), name, &postgres, 100).serve())
        .collect();
    let all: Vec<&Process> = replicas.iter().collect();
    let mut received = Received::default();
    load(&all, 30, &mut received).await;
    // A client that reuses its request id still gets a record per request.
    for process in &all {
        let response = chat(&process.base, "team-secret", "reused-id", "again").await;
        assert_eq!(response.status(), 200);
        received.add(&response.json::<Value>().await.unwrap()["usage"]);
    }

    for process in &all {
        let answer = eventually_spend(&process.base, &received).await;
        let rows = answer["rows"].as_array().unwrap();
        assert_eq!(
            rows.len(),
            1,
            "one day, key, model and deployment: {answer}"
        );
        assert_eq!(rows[0]["key"], "team");
        assert_eq!(rows[0]["deployment"], "chat/sim");
        assert_eq!(rows[0]["api"], "chat");
        assert_eq!(rows[0]["requests"], 33);
    }
    let db = postgres.client().await;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE request_id = 'reused-id')
             FROM ledger_records",
            &[],
        )
        .await
        .unwrap();
    let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(counts, (33, 33, 3));
    // Filters are asked of the database too.
    let filtered = client()
        .get(format!("{}/admin/spend?key=capped", all[1].base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let filtered: Value = filtered.json().await.unwrap();
    assert_eq!(filtered["rows"], json!([]), "{filtered}");
}

#[tokio::test]
async fn a_spent_budget_stays_spent_after_the_whole_fleet_restarts() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<Process> = ["a", "b"]
        .iter()
        .map(|name| Replica::new(dir.path(), name, &postgres, 100).serve())
        .collect();
    for process in &first {
        process.logged(READY);
    }
    // The key `capped` spends its $0.001 a day, across both replicas.
    let mut received = Received::default();
    let mut exhausted = false;
    for i in 0..60 {
        let base = &first[i % 2].base;
        let response = chat(base, "capped-secret", &format!("capped-{i}"), "spend").await;
        if response.status() == 200 {
            received.add(&response.json::<Value>().await.unwrap()["usage"]);
            continue;
        }
        assert_eq!(response.status(), 429);
        let body: Value = response.json().await.unwrap();
        if body["error"]["code"] == "insufficient_quota" {
            exhausted = true;
            break;
        }
        // The last request's reservation is freed once it is recorded,
        // just after its response.
        assert_eq!(body["error"]["code"], "budget_held", "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exhausted, "the budget runs out");
    eventually_spend(&first[0].base, &received).await;
    drop(first);

    // A new fleet, with new data_dirs: only PostgreSQL remembers.
    let second: Vec<Process> = ["c", "d"]
        .iter()
        .map(|name| Replica::new(dir.path(), name, &postgres, 100).serve())
        .collect();
    for process in &second {
        process.logged(READY);
        let response = chat(&process.base, "capped-secret", "after", "spend").await;
        assert_eq!(response.status(), 429, "{}", process.base);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        let response = chat(&process.base, "team-secret", "after", "spend").await;
        assert_eq!(response.status(), 200, "other keys are served");
    }
}

/// Requests as `team` across `bases` in turn, `count` in all, two at a
/// time, each of which must succeed; `done` counts them as they end.
async fn steady_load(bases: Vec<String>, count: usize, done: Arc<AtomicUsize>) -> Received {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (bases, next, done) = (bases.clone(), next.clone(), done.clone());
            tokio::spawn(async move {
                let mut received = Received::default();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return received;
                    }
                    let base = &bases[i % bases.len()];
                    let text = format!("request {i}: {}", "word ".repeat(i % 7));
                    let response = chat(base, "team-secret", &format!("load-{i}"), &text).await;
                    assert_eq!(response.status(), 200, "request {i} to {base}");
                    received.add(&response.json::<Value>().await.unwrap()["usage"]);
                    done.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    let mut received = Received::default();
    for worker in workers {
        received.merge(&worker.await.unwrap());
    }
    received
}

/// Waits, within `WAIT`, until `done` reaches `count`.
async fn until_done(done: &AtomicUsize, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while done.load(Ordering::SeqCst) < count {
        assert!(tokio::time::Instant::now() < deadline, "the load stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_postgres_fails_no_request_and_loses_or_doubles_no_spend() {
    let Some(mut postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Process> = ["a", "b"]
        .iter()
        .map(|name| Replica::new(dir.path(), name, &postgres, 100).serve())
        .collect();
    for process in &replicas {
        process.logged(READY);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let bases = replicas.iter().map(|p| p.base.clone()).collect();
    let load = tokio::spawn(steady_load(bases, 120, done.clone()));

    // The database goes away while requests run, and comes back.
    until_done(&done, 20).await;
    postgres.stop();
    for process in &replicas {
        process.logged(UNREACHABLE);
        assert_eq!(write_failing(process).await, Some(1.0));
        let response = spend(&process.base).await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.unwrap();
        check_error_shape(&body);
        assert_eq!(body["error"]["code"], "ledger_unavailable", "{body}");
    }
    until_done(&done, 60).await;
    postgres.start_again();
    let received = load.await.unwrap();
    assert_eq!(received.requests, 120);

    for process in &replicas {
        eventually_spend(&process.base, &received).await;
        process.logged("the ledger's PostgreSQL answers again");
        assert_eq!(write_failing(process).await, Some(0.0));
        let log = process.lines_once(UNREACHABLE, 1);
        let errors = log.iter().filter(|l| l.contains(UNREACHABLE)).count();
        assert_eq!(errors, 1, "one ERROR per outage:\n{}", log.join("\n"));
    }
    assert_eq!(records_in(&postgres).await, 120);
}

#[tokio::test]
async fn a_replica_stopped_gracefully_ships_its_spool_before_it_exits() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::new(dir.path(), "a", &postgres, 60_000);
    let mut process = replica.serve();
    process.logged(READY);
    let mut received = Received::default();
    load(&[&process], 5, &mut received).await;
    process.signal("-TERM");
    assert!(process.child.wait().unwrap().success());
    assert_eq!(records_in(&postgres).await, 5);
    assert_eq!(replica.spooled(), 0);
}

#[tokio::test]
async fn a_replica_killed_with_spend_in_its_spool_ships_it_when_restarted_once_only() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Ships at start, then not for a minute: what it serves stays spooled.
    let replica = Replica::new(dir.path(), "a", &postgres, 60_000);
    let mut first = replica.serve();
    first.logged(READY);
    let mut received = Received::default();
    load(&[&first], 10, &mut received).await;
    replica.eventually_spooled(10);
    assert_eq!(records_in(&postgres).await, 0, "none shipped yet");
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    // A copy of the spool, as if a second replica had the same records.
    let copy = Replica::new(dir.path(), "copy", &postgres, 60_000);
    std::fs::create_dir_all(&copy.data_dir).unwrap();
    for file in ["tollgate-spool.sqlite3", "tollgate-spool.sqlite3-wal"] {
        let from = replica.data_dir.join(file);
        if from.exists() {
            std::fs::copy(&from, copy.data_dir.join(file)).unwrap();
        }
    }

    let second = replica.serve();
    second.logged("replayed=10");
    eventually_spend(&second.base, &received).await;
    replica.eventually_spooled(0);
    let third = copy.serve();
    third.logged("replayed=10");
    eventually_spend(&third.base, &received).await;
    assert_eq!(
        records_in(&postgres).await,
        10,
        "shipped twice, stored once"
    );
}

#[tokio::test]
async fn replicas_starting_at_once_on_an_empty_database_migrate_it_once() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fleet: Vec<Replica> = ["a", "b"]
        .iter()
        .map(|name| Replica::new(dir.path(), name, &postgres, 100))
        .collect();
    let processes: Vec<Process> = std::thread::scope(|scope| {
        let started: Vec<_> = fleet
            .iter()
            .map(|replica| scope.spawn(|| replica.serve()))
            .collect();
        started.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let logs: Vec<Vec<String>> = processes.iter().map(|p| p.lines_once(READY, 1)).collect();
    // One replica applied every migration; the other found them done.
    let applied: Vec<usize> = logs
        .iter()
        .map(|log| {
            log.iter()
                .filter(|l| l.contains("applied a ledger migration"))
                .count()
        })
        .collect();
    assert!(applied == [3, 0] || applied == [0, 3], "{logs:#?}");
    for log in &logs {
        assert!(
            !log.iter().any(|l| l.contains("ERROR")),
            "{}",
            log.join("\n")
        );
    }
    let versions: Vec<(i32, String)> = postgres
        .client()
        .await
        .query("SELECT version, name FROM schema_migrations", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        versions,
        [
            (1, "records".to_owned()),
            (2, "api".to_owned()),
            (3, "licence".to_owned())
        ]
    );
    let mut received = Received::default();
    load(&[&processes[0], &processes[1]], 2, &mut received).await;
    eventually_spend(&processes[1].base, &received).await;
}

/// The ledger over TLS. A server whose certificate the CA in
/// `sslrootcert` signed gets every record, over encrypted connections
/// only. A server whose certificate another CA signed, and one that offers
/// no TLS, get none: the records wait in the spool, no request fails, and
/// the log says why.
#[tokio::test]
async fn spend_is_shipped_over_tls_only_to_a_server_whose_certificate_verifies() {
    let ca = TestCa::new("ledger");
    let Some(postgres) = Postgres::start_tls(ServerTls::Server(&ca)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let verified = |name: &str, server: &Postgres, ca: &TestCa, mode: &str| {
        let mut replica = Replica::new(dir.path(), name, server, 50);
        replica.url = format!(
            "{}?sslmode={mode}&sslrootcert={}",
            server.url(),
            ca.ca_file().display()
        );
        replica
    };

    let replica = verified("good", &postgres, &ca, "verify-full");
    let process = replica.serve();
    process.logged(READY);
    let mut received = Received::default();
    load(&[&process], 3, &mut received).await;
    eventually_spend(&process.base, &received).await;
    assert_eq!(records_in(&postgres).await, 3);
    let row = postgres
        .client()
        .await
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'tollgate'",
            &[],
        )
        .await
        .unwrap();
    let (connections, all_tls): (i64, bool) = (row.get(0), row.get(1));
    assert!(
        connections > 0 && all_tls,
        "{connections} connections, all TLS: {all_tls}"
    );

    // Another CA's server, and a server without TLS under `require`.
    let other = TestCa::new("other");
    let Some(plain) = Postgres::start() else {
        return;
    };
    for (name, server, ca, mode, why) in [
        ("forged", &postgres, &other, "verify-full", "UnknownIssuer"),
        (
            "plain",
            &plain,
            &ca,
            "require",
            "server does not support TLS",
        ),
    ] {
        let replica = verified(name, server, ca, mode);
        let process = replica.serve();
        let line = process.logged(UNREACHABLE);
        assert!(line.contains(why), "{name}: {line}");
        let mut received = Received::default();
        load(&[&process], 2, &mut received).await;
        replica.eventually_spooled(2);
        assert_eq!(write_failing(&process).await, Some(1.0), "{name}");
    }
    assert_eq!(records_in(&postgres).await, 3);
    // The plaintext server was never even migrated.
    let row = plain
        .client()
        .await
        .query_one("SELECT to_regclass('ledger_records') IS NULL", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

/// A PostgreSQL that lets TLS connections in only with a client
/// certificate (`cert` authentication) gets the ledger's records from a
/// gateway whose URL names one (`sslcert`, `sslkey`), and none from one
/// whose URL does not: those wait in its spool.
#[tokio::test]
async fn a_database_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let ca = TestCa::new("mutual");
    let Some(postgres) = Postgres::start_tls(ServerTls::ClientsCertified(&ca)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = ca.client();
    for (name, identity) in [
        (
            "certified",
            format!(
                "&sslcert={}&sslkey={}",
                client.cert.display(),
                client.key.display()
            ),
        ),
        ("anonymous", String::new()),
    ] {
        let mut replica = Replica::new(dir.path(), name, &postgres, 50);
        replica.url = format!(
            "{}?sslmode=verify-full&sslrootcert={}{identity}",
            postgres.url(),
            ca.ca_file().display()
        );
        let process = replica.serve();
        let mut received = Received::default();
        if identity.is_empty() {
            let line = process.logged(UNREACHABLE);
            assert!(line.contains("certificate"), "{line}");
            load(&[&process], 2, &mut received).await;
            replica.eventually_spooled(2);
        } else {
            process.logged(READY);
            load(&[&process], 3, &mut received).await;
            eventually_spend(&process.base, &received).await;
        }
    }
    assert_eq!(records_in(&postgres).await, 3);
}
