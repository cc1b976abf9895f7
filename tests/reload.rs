//! Hot-swapping the config: the file watched (Kubernetes ConfigMap symlink
//! swaps included, writes to other files beside it not taken for changes), `POST /admin/reload` with dry runs and diffs, invalid
//! candidates refused whole, live state carried over by name, the browser
//! origins CORS allows and the keep-alive timeout changed by a reload,
//! and 200 requests in flight across 50 swaps without one failing.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model, line_of};
use support::gateway::*;
use support::mock::MockUpstream;

async fn admin(gateway: &Gateway, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    gateway
        .http
        .request(method, format!("{}{path}", gateway.base))
        .bearer_auth(ADMIN_TOKEN)
}

async fn active_version(gateway: &Gateway) -> String {
    let config: Value = admin(gateway, reqwest::Method::GET, "/admin/config")
        .await
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    config["version"].as_str().unwrap().to_owned()
}

/// Waits, within `WAIT`, until the running config has `version`.
async fn until_version(gateway: &Gateway, version: &str) -> Duration {
    let started = Instant::now();
    while active_version(gateway).await != version {
        assert!(
            started.elapsed() < WAIT,
            "the gateway never took version {version}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Simulated backends `names`, and model `chat` with a deployment on each
/// of `deployed` (which may name a backend that does not exist).
fn simulated_on(names: &[&str], deployed: &[&str]) -> Config {
    let mut config = Config::new();
    for name in names {
        config = config.backend(Backend::simulated(name).answers(1, 5000, 3));
    }
    let mut chat = Model::new("chat");
    for backend in deployed {
        chat = chat.deployment(Deployment::new(backend, "m"));
    }
    config.model(chat)
}

/// Simulated backends `names`, model `chat` on each, and the admin API.
fn simulated(names: &[&str]) -> Config {
    simulated_on(names, names).admin()
}

fn write(path: &Path, config: &Config) {
    // Write then rename, as editors and config tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, config.to_toml()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A gateway serving from `tollgate.toml` in a fresh directory, written
/// with `config`.
async fn serving_file(config: &Config) -> (tempfile::TempDir, std::path::PathBuf, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    write(&path, config);
    let gateway = start_from_file(&path).await;
    (dir, path, gateway)
}

#[tokio::test]
async fn an_edited_file_is_applied_within_a_second_and_an_invalid_edit_never() {
    let (_dir, path, gateway) = serving_file(&simulated(&["one"])).await;
    let first = active_version(&gateway).await;

    let second = simulated(&["one", "two"]);
    write(&path, &second);
    let version = tollgate::config::version(&second.to_toml());
    let took = until_version(&gateway, &version).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_ne!(first, version);

    write(&path, &second.set("routing", "max_attempts", 0));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        active_version(&gateway).await,
        version,
        "an invalid file changes nothing"
    );
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "invalid")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "applied")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "tollgate_config_info", &[("version", &version)]),
        Some(1.0)
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_idle_gateway_stops_reading_its_config_file() {
    let (_dir, path, gateway) = serving_file(&simulated(&["one"])).await;
    let version = active_version(&gateway).await; // it is serving: the watch is on
    // The file is written again as it was: the gateway reads it once to
    // see whether it changed.
    write(&path, &simulated(&["one"]));
    tokio::time::sleep(Duration::from_millis(600)).await;

    let opened = opened_within(&path, tokio::time::sleep(Duration::from_millis(1500))).await;
    // Reading the file is itself a file event: a watch that reacted to it
    // would read the file again every debounce interval, forever.
    assert_eq!(opened, 0, "the gateway kept reading its config file");
    assert_eq!(active_version(&gateway).await, version);
}

/// Counts the times `path` is opened from when this is called until
/// `quiet` is over.
async fn opened_within(path: &Path, quiet: impl std::future::Future<Output = ()>) -> usize {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = tx.send(event.kind);
        }
    })
    .unwrap();
    watcher.watch(path, RecursiveMode::NonRecursive).unwrap();
    quiet.await;
    rx.try_iter()
        .filter(|kind| matches!(kind, EventKind::Access(_)))
        .count()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn writes_to_other_files_beside_the_config_are_not_changes_to_it() {
    let (dir, path, gateway) = serving_file(&simulated(&["one"])).await;
    let first = active_version(&gateway).await;
    // The file's content changes through a hard link in another directory,
    // which the gateway's watch does not see: were the config read now, it
    // would be taken up.
    let elsewhere = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    let link = elsewhere.path().join("tollgate.toml");
    std::fs::hard_link(&path, &link).unwrap();
    let second = simulated(&["one", "two"]);
    std::fs::write(&link, second.to_toml()).unwrap();

    // A log beside the config, written through a second.
    let log = dir.path().join("access.log");
    let logging = async {
        for line in 0..20 {
            std::fs::write(&log, format!("line {line}\n")).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    };
    let opened = opened_within(&path, logging).await;
    assert_eq!(
        opened, 0,
        "the log's writes made the gateway read its config"
    );
    assert_eq!(active_version(&gateway).await, first);

    // The config's own write is seen.
    write(&path, &second);
    until_version(&gateway, &tollgate::config::version(&second.to_toml())).await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_configmap_update_swapping_its_symlink_is_seen() {
    use std::os::unix::fs::symlink;
    // The layout kubelet writes: config.toml -> ..data/config.toml,
    // ..data -> ..2026_11_28_v1; an update swaps ..data in one rename.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let v1 = simulated(&["one"]).to_toml();
    let v2 = simulated(&["one"])
        .set("routing", "max_attempts", 2)
        .to_toml();
    for (name, text) in [("..v1", &v1), ("..v2", &v2)] {
        std::fs::create_dir(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("tollgate.toml"), text).unwrap();
    }
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/tollgate.toml", root.join("tollgate.toml")).unwrap();
    let gateway = start_from_file(&root.join("tollgate.toml")).await;
    assert_eq!(
        active_version(&gateway).await,
        tollgate::config::version(&v1)
    );

    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    let took = until_version(&gateway, &tollgate::config::version(&v2)).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// Release deploys swap the config's whole directory: a link to it
/// pointed at a new release, or the directory moved away and made anew.
/// Either way the new directory is watched, and its edits seen.
#[tokio::test]
async fn a_config_directory_swapped_through_a_link_or_made_anew_is_watched_anew() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let version = |attempts: u32| {
        simulated(&["one"])
            .set("routing", "max_attempts", attempts)
            .to_toml()
    };
    for (release, attempts) in [("v1", 1), ("v2", 2)] {
        std::fs::create_dir(root.join(release)).unwrap();
        std::fs::write(root.join(release).join("tollgate.toml"), version(attempts)).unwrap();
    }
    symlink("v1", root.join("current")).unwrap();
    let file = root.join("current").join("tollgate.toml");
    let gateway = start_from_file(&file).await;
    assert_eq!(
        active_version(&gateway).await,
        tollgate::config::version(&version(1))
    );

    // The link to the release swapped in one rename.
    symlink("v2", root.join("current.new")).unwrap();
    std::fs::rename(root.join("current.new"), root.join("current")).unwrap();
    until_version(&gateway, &tollgate::config::version(&version(2))).await;
    // And an edit in the new release.
    std::fs::write(&file, version(3)).unwrap();
    until_version(&gateway, &tollgate::config::version(&version(3))).await;

    // The release's directory moved away and made anew.
    std::fs::rename(root.join("v2"), root.join("v2.old")).unwrap();
    std::fs::create_dir(root.join("v2")).unwrap();
    std::fs::write(&file, version(4)).unwrap();
    until_version(&gateway, &tollgate::config::version(&version(4))).await;
    std::fs::write(&file, version(5)).unwrap();
    until_version(&gateway, &tollgate::config::version(&version(5))).await;
}

/// What a reload says needs a restart is what differs from what the
/// gateway runs, which is what it started with: a change still waiting is
/// named at every reload after it, and one undone is not.
#[tokio::test]
async fn a_reload_names_what_needs_a_restart_against_what_runs() {
    let started = simulated(&["one"]);
    let gateway = start(&started).await;
    let restart_needed = |candidate: Config| {
        let gateway = &gateway;
        async move {
            let (status, report) = reload_with(gateway, &candidate).await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(report["applied"], true, "{report}");
            report["restart_needed"].clone()
        }
    };
    let moved = || started.clone().set("server", "listen", "127.0.0.1:1");
    assert_eq!(restart_needed(moved()).await, json!(["server.listen"]));
    let moved_and_more = moved().set("routing", "max_attempts", 2);
    assert_eq!(
        restart_needed(moved_and_more).await,
        json!(["server.listen"]),
        "still waiting"
    );
    let back = started.clone().set("routing", "max_attempts", 2);
    assert_eq!(restart_needed(back).await, json!([]), "undone");
}

/// Metrics and logs write `none` for a request that reached no alias,
/// backend or key, so no name in the config may be `none`: its series
/// would be those of the refused requests.
#[tokio::test]
async fn a_candidate_naming_anything_none_is_refused() {
    let gateway = start(&simulated(&["one"])).await;
    let version = active_version(&gateway).await;
    let candidate = simulated(&["one", "none"])
        .model(Model::new("none").deployment(Deployment::named("none", "one")))
        .key(Key::new("none"));
    let (paths, _) = reload_refused(&gateway, candidate).await;
    assert_eq!(
        paths,
        [
            "backends[1].name",
            "models[1].alias",
            "models[1].deployments[0].name",
            "keys[0].name"
        ]
    );
    assert_eq!(active_version(&gateway).await, version);
}

/// Prometheus holds the metrics token: were it the admin token, whoever
/// reads Prometheus's scrape config could reload the gateway's.
#[tokio::test]
async fn a_candidate_whose_metrics_token_is_the_admin_token_is_refused() {
    let gateway = start(&simulated(&["one"])).await;
    let version = active_version(&gateway).await;
    let candidate = simulated(&["one"]).set("metrics", "token_env", "ADMIN_TOKEN");
    let (paths, _) = reload_refused(&gateway, candidate).await;
    assert_eq!(paths, ["metrics.token_env"]);
    assert_eq!(active_version(&gateway).await, version);
}

/// A dry run checks a candidate, as CI does with each proposed change: an
/// invalid one is not a refused reload, for the alert on those to fire.
#[tokio::test]
async fn an_invalid_dry_run_is_not_counted_as_a_refused_reload() {
    let gateway = start(&simulated(&["one"])).await;
    let candidate = simulated(&["one"]).set("routing", "max_attempts", 99);
    let (status, _) = posted(&gateway, DRY_RUN, &candidate).await;
    assert_eq!(status, 422);
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "invalid")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn admin_reload_validates_whole_candidates_and_dry_runs_return_the_diff() {
    let gateway = start(&simulated(&["one", "two"])).await;
    let version = active_version(&gateway).await;

    let candidate = simulated(&["one", "three"]).key(Key::new("team"));
    let (status, report) = posted(&gateway, DRY_RUN, &candidate).await;
    assert_eq!(status, 200);
    assert_eq!(report["applied"], false);
    assert_eq!(
        report["version"],
        version.as_str(),
        "a dry run applies nothing"
    );
    assert_eq!(report["diff"]["backends"]["added"], json!(["three"]));
    assert_eq!(report["diff"]["backends"]["removed"], json!(["two"]));
    assert_eq!(
        report["diff"]["deployments"]["added"],
        json!(["chat/three"])
    );
    assert_eq!(
        report["diff"]["deployments"]["removed"],
        json!(["chat/two"])
    );
    assert_eq!(report["diff"]["keys"]["added"], json!(["team"]));
    assert_eq!(active_version(&gateway).await, version);

    // A misspelt dry run is refused, not applied for real.
    for query in ["dry-run=true", "dry_run=true&dry_run=false", "dry_run="] {
        let response = admin(
            &gateway,
            reqwest::Method::POST,
            &format!("/admin/reload?{query}"),
        )
        .await
        .body(candidate.to_toml())
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let refused: Value = response.json().await.unwrap();
        assert!(
            refused["error"]["param"]
                .as_str()
                .unwrap()
                .starts_with("dry"),
            "{query}: {refused}"
        );
        assert_eq!(active_version(&gateway).await, version, "{query}");
    }

    let invalid = simulated_on(&["one", "three"], &["one", "nowhere"])
        .key(Key::new("team"))
        .set("routing", "max_attempts", 99)
        .admin();
    let response = admin(&gateway, reqwest::Method::POST, "/admin/reload")
        .await
        .body(invalid.to_toml())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let refused: Value = response.json().await.unwrap();
    let paths: Vec<&str> = refused["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["routing.max_attempts", "models[0].deployments[1].backend"],
        "every problem, located: {refused:#}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the running config stays")
    );
    assert_eq!(active_version(&gateway).await, version);

    let response = admin(&gateway, reqwest::Method::POST, "/admin/reload")
        .await
        .body(candidate.to_toml())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["applied"], true);
    assert_eq!(
        report["version"].as_str(),
        Some(tollgate::config::version(&candidate.to_toml()).as_str())
    );
    // The new config has keys: the key it names now opens the gateway.
    let response = gateway
        .post("/v1/chat/completions")
        .bearer_auth("team-secret")
        .json(&json!({"model": "chat", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    let (backend, _) = served_by(&response);
    assert!(["one", "three"].contains(&backend.as_str()), "{backend}");

    // Without a body there is no file to read: the gateway says so.
    let response = admin(&gateway, reqwest::Method::POST, "/admin/reload")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(message(&error_of(response).await).contains("not started from a config file"));

    let config: Value = admin(&gateway, reqwest::Method::GET, "/admin/config")
        .await
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["config"]["keys"][0]["key_env"], "KEY_TEAM");
    assert!(
        !config.to_string().contains("team-secret"),
        "no secret in the active config: {config}"
    );
}

#[tokio::test]
async fn live_state_carries_over_for_names_that_persist() {
    let down = MockUpstream::openai().status(503).start().await;
    let up = MockUpstream::openai().start().await;
    let config = Config::new()
        .backend(Backend::upstream("down", "vllm", &url(&down)))
        .backend(Backend::upstream("up", "vllm", &url(&up)))
        .model(
            Model::new("chat")
                .deployment(Deployment::new("down", "m"))
                .deployment(Deployment::new("up", "m")),
        )
        .set("routing", "circuit_failures", 1)
        .set("routing", "circuit_cooldown_ms", 60_000)
        .admin();
    let gateway = start(&config).await;
    let response = gateway
        .chat(json!({"model": "chat", "messages": user("hi")}))
        .await;
    assert_eq!(served_by(&response).0, "up", "the 503 fails over");

    let response = admin(&gateway, reqwest::Method::POST, "/admin/reload")
        .await
        .body(
            config
                .backend(Backend::upstream("spare", "vllm", &url(&up)))
                .to_toml(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let explained = gateway
        .explain(json!({"request": {"model": "chat", "messages": user("hi")}}))
        .await;
    assert!(
        reason(&explained, "chat/down").starts_with("circuit open"),
        "the open circuit survived the reload: {explained:#}"
    );
    assert_eq!(down.hits(), 1);
}

// ---- 200 requests across 50 swaps -------------------------------------------------

/// Candidate `i`: backends named after it, so an answer's backend tells
/// which config served it; every fifth candidate is invalid.
fn candidate(i: usize, x: &str, y: &str) -> Config {
    let strategy = ["cost", "latency", "weighted", "spillover"][i % 4];
    let mut config = Config::new()
        .backend(Backend::upstream(&format!("x{i}"), "vllm", x))
        .backend(Backend::upstream(&format!("y{i}"), "openai", y));
    if i % 3 == 0 {
        config = config.backend(Backend::upstream(&format!("z{i}"), "vllm", y));
    }
    let backend_y = if i % 5 == 4 {
        "missing".to_owned()
    } else {
        format!("y{i}")
    };
    config
        .model(
            Model::new("chat")
                .strategy(strategy)
                .deployment(Deployment::new(&format!("x{i}"), "m"))
                .deployment(Deployment::new(&backend_y, "m")),
        )
        .admin()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_in_flight_across_fifty_swaps_all_succeed_on_their_own_snapshot() {
    let x = MockUpstream::openai()
        .event_delay(Duration::from_millis(3))
        .record(false)
        .start()
        .await;
    let y = MockUpstream::openai()
        .first_byte_after(Duration::from_millis(5))
        .record(false)
        .start()
        .await;
    let (x_url, y_url) = (url(&x), url(&y));
    let gateway = start(&candidate(0, &x_url, &y_url)).await;

    // The backends of every valid candidate, by version.
    let mut valid: HashMap<String, HashSet<String>> = HashMap::new();
    let mut invalid: HashSet<String> = HashSet::new();
    let first = tollgate::config::parse(&candidate(0, &x_url, &y_url).to_toml(), &env).unwrap();
    valid.insert(
        first.version.clone(),
        first.backends.iter().map(|b| b.name.clone()).collect(),
    );

    let send = |n: usize| {
        let (base, http) = (gateway.base.clone(), gateway.http.clone());
        tokio::spawn(async move {
            let stream = n % 2 == 0;
            let response = http
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": "chat", "stream": stream, "messages": user("hi")}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            };
            let (version, backend) = (
                header("x-tollgate-config-version"),
                header("x-tollgate-backend"),
            );
            let body = response.text().await.unwrap();
            let complete = if stream {
                body.ends_with("data: [DONE]\n\n") && !body.contains("\"error\"")
            } else {
                serde_json::from_str::<Value>(&body).is_ok_and(|b| b["usage"].is_object())
            };
            (status, version, backend, complete)
        })
    };

    // Four requests start before each swap, so each swap has requests in
    // flight on the snapshot it replaces.
    let mut requests = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 1..=50 {
        requests.extend((0..4).map(|k| send(i * 4 + k)));
        tokio::time::sleep(Duration::from_millis(2)).await;
        let text = candidate(i, &x_url, &y_url).to_toml();
        let started = Instant::now();
        let response = admin(&gateway, reqwest::Method::POST, "/admin/reload")
            .await
            .body(text.clone())
            .send()
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        if i % 5 == 4 {
            assert_eq!(response.status(), 422, "candidate {i} is invalid");
            invalid.insert(tollgate::config::version(&text));
        } else {
            assert_eq!(response.status(), 200, "candidate {i} is valid");
            let config = tollgate::config::parse(&text, &env).unwrap();
            valid.insert(
                config.version.clone(),
                config.backends.iter().map(|b| b.name.clone()).collect(),
            );
        }
    }
    assert_eq!(requests.len(), 200);
    println!("slowest reload: {slowest:?}");

    let mut versions_seen = HashSet::new();
    for request in requests {
        let (status, version, backend, complete) = request.await.unwrap();
        assert_eq!(status, 200, "served by {backend} on {version}");
        assert!(complete, "the answer is whole ({backend} on {version})");
        assert!(
            !invalid.contains(&version),
            "an invalid candidate never served"
        );
        let backends = valid
            .get(&version)
            .unwrap_or_else(|| panic!("{version} is a config that was applied"));
        assert!(
            backends.contains(&backend),
            "{backend} existed in the snapshot {version} the request started with"
        );
        versions_seen.insert(version);
    }
    assert!(
        versions_seen.len() > 20,
        "requests ran across many snapshots: {}",
        versions_seen.len()
    );
    let last_valid = tollgate::config::version(&candidate(50, &x_url, &y_url).to_toml());
    assert_eq!(active_version(&gateway).await, last_valid);
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "invalid")]
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "applied")]
        ),
        Some(40.0)
    );
    // Each snapshot resolves its deployments' series anew, while requests
    // of the one it replaced still record through theirs: every request
    // counted once, whichever snapshot it ended on.
    let started = Instant::now();
    loop {
        let text = gateway.metrics().await;
        let answered = sum(&text, "tollgate_requests_total{", "status=\"200\"");
        let streams = sum(&text, "tollgate_time_to_first_token_seconds_count{", "");
        if (answered, streams) == (200.0, 100.0) {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "{answered} answered and {streams} streams recorded, not 200 and 100:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of a family whose series start with `prefix`
/// and name `label`.
fn sum(text: &str, prefix: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn check_diff_compares_two_files_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    let two = simulated_on(&["one", "two"], &["one", "two"]);
    let three = simulated_on(&["one", "three"], &["one", "three"]);
    std::fs::write(&old, two.to_toml()).unwrap();
    std::fs::write(&new, three.to_toml()).unwrap();
    let out = std::process::Command::new(support::process::binary())
        .args(["check", "--diff"])
        .args([&old, &new])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(diff["backends"]["added"], json!(["three"]));
    assert_eq!(diff["backends"]["removed"], json!(["two"]));
    assert_eq!(diff["deployments"]["removed"], json!(["chat/two"]));

    std::fs::write(&new, "[[backends]]\nname = 5\n").unwrap();
    let out = std::process::Command::new(support::process::binary())
        .args(["check", "--diff"])
        .args([&old, &new])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an invalid side fails the check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("new.toml"));
}

// ---- a reload never weakens auth by accident ------------------------------------

/// Simulated backends `names`, model `chat` on each, the admin API and the
/// key `team`.
fn keyed(names: &[&str]) -> Config {
    simulated(names).key(Key::new("team"))
}

fn hi() -> Value {
    json!({"model": "chat", "messages": user("hi")})
}

async fn reloads(gateway: &Gateway, result: &str, count: f64) {
    gateway
        .eventually_metric(
            "tollgate_config_reloads_total",
            &[("result", result)],
            count,
        )
        .await;
}

#[tokio::test]
async fn a_truncated_or_half_written_file_never_switches_auth_off() {
    let (_dir, path, gateway) = serving_file(&keyed(&["one"])).await;
    let version = active_version(&gateway).await;
    assert_eq!(gateway.chat(hi()).await.status(), 401);

    // Truncated in place, as `> tollgate.toml` does before the write.
    std::fs::write(&path, "").unwrap();
    reloads(&gateway, "invalid", 1.0).await;
    // Written in place in two steps: first all but the [[keys]].
    std::fs::write(&path, simulated(&["one"]).to_toml()).unwrap();
    reloads(&gateway, "invalid", 2.0).await;
    assert_eq!(active_version(&gateway).await, version, "nothing applied");
    assert_eq!(gateway.chat(hi()).await.status(), 401, "auth stays on");
    assert_eq!(
        gateway.chat_as("team-secret", hi()).await.status(),
        200,
        "and the key still serves"
    );

    // Then the whole file, with the keys.
    let whole = keyed(&["one", "two"]);
    std::fs::write(&path, whole.to_toml()).unwrap();
    until_version(&gateway, &tollgate::config::version(&whole.to_toml())).await;
    assert_eq!(gateway.chat(hi()).await.status(), 401);

    // Serving without keys is a choice the config states.
    let open = simulated(&["one"]).set("server", "allow_anonymous", true);
    write(&path, &open);
    until_version(&gateway, &tollgate::config::version(&open.to_toml())).await;
    assert_eq!(gateway.chat(hi()).await.status(), 200);
}

#[tokio::test]
async fn a_file_written_in_place_is_read_once_its_writer_closes_it_however_long_it_pauses() {
    let (_dir, path, gateway) = serving_file(&keyed(&["one"]).key(Key::new("ops"))).await;
    let version = active_version(&gateway).await;
    // Through one open file, with a pause in the middle: what is written
    // before it, every table but the last key's, is a valid config.
    let whole = keyed(&["one", "two"]).key(Key::new("ops")).to_toml();
    let cut = whole.rfind("[[keys]]").unwrap();
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&whole.as_bytes()[..cut]).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(active_version(&gateway).await, version, "nothing read yet");
    assert_eq!(gateway.chat_as("ops-secret", hi()).await.status(), 200);
    assert_eq!(gateway.chat_as("team-secret", hi()).await.status(), 200);

    file.write_all(&whole.as_bytes()[cut..]).unwrap();
    drop(file);
    until_version(&gateway, &tollgate::config::version(&whole)).await;
    assert_eq!(gateway.chat_as("ops-secret", hi()).await.status(), 200);
    let invalid = [("result", "invalid")];
    let refused = metric(
        &gateway.metrics().await,
        "tollgate_config_reloads_total",
        &invalid,
    );
    assert_eq!(
        refused.unwrap_or(0.0),
        0.0,
        "the file emptied as it was opened was never read"
    );

    // A link made to a whole file is read as it appears.
    let linked = keyed(&["one"]).to_toml();
    let target = path.with_file_name("release.toml");
    std::fs::write(&target, &linked).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    until_version(&gateway, &tollgate::config::version(&linked)).await;
}

/// `POST /admin/reload` of `candidate`: the status, and the body.
async fn reload_with(gateway: &Gateway, candidate: &Config) -> (u16, Value) {
    posted(gateway, "/admin/reload", candidate).await
}

/// A dry run's path: the candidate is checked, and nothing applied.
const DRY_RUN: &str = "/admin/reload?dry_run=true";

/// `POST` of `candidate` to the admin path `path`: the status, and the
/// body.
async fn posted(gateway: &Gateway, path: &str, candidate: &Config) -> (u16, Value) {
    let response = admin(gateway, reqwest::Method::POST, path)
        .await
        .body(candidate.to_toml())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// `POST /admin/reload` of `candidate`, which must be refused: the paths
/// of its problems, and the error's message.
async fn reload_refused(gateway: &Gateway, candidate: Config) -> (Vec<String>, String) {
    let (status, body) = reload_with(gateway, &candidate).await;
    assert_eq!(status, 422, "{body}");
    let paths: Vec<String> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_owned())
        .collect();
    (paths, message(&body["error"]).to_owned())
}

#[tokio::test]
async fn admin_reload_refuses_a_candidate_that_drops_every_key_or_the_admin_token() {
    let gateway = start(&keyed(&["one"])).await;
    let version = active_version(&gateway).await;
    let (paths, said) = reload_refused(&gateway, simulated(&["one"])).await;
    assert_eq!(paths, ["keys"]);
    assert!(said.contains("server.allow_anonymous = true"), "{said}");
    let no_admin = simulated_on(&["one"], &["one"]).key(Key::new("team"));
    assert_eq!(
        reload_refused(&gateway, no_admin).await.0,
        ["admin.token_env"]
    );
    assert_eq!(
        reload_refused(&gateway, simulated_on(&["one"], &["one"]))
            .await
            .0,
        ["keys", "admin.token_env"]
    );
    assert_eq!(active_version(&gateway).await, version);
    assert_eq!(gateway.chat_as("team-secret", hi()).await.status(), 200);
}

/// A file cut short before its `[policy]` loses the EU regions and the
/// default region of requests that name none, and users in the EU would
/// reach the multimodal Llama: such a reload is refused, whether from the
/// file or the admin API. Widening the rule is taken.
#[tokio::test]
async fn a_reload_never_narrows_the_llama_eu_rule() {
    let vision = || {
        simulated(&["one"]).model(
            Model::new("vision").deployment(
                Deployment::new("one", "llama-4")
                    .set("licence", "llama")
                    .multimodal(&["text", "image"]),
            ),
        )
    };
    let policy = |regions: &[&str], default: &str| {
        vision().set("policy", "eu_regions", regions.to_vec()).set(
            "policy",
            "default_region",
            default,
        )
    };
    let (_dir, path, gateway) = serving_file(&policy(&["eu", "de"], "eu")).await;
    let version = active_version(&gateway).await;
    let ask = json!({"model": "vision", "messages": user("hi")});
    assert_eq!(gateway.chat(ask.clone()).await.status(), 451);

    write(&path, &vision());
    reloads(&gateway, "invalid", 1.0).await;
    assert_eq!(active_version(&gateway).await, version, "nothing applied");
    assert_eq!(gateway.chat(ask.clone()).await.status(), 451);
    let (status, body) = reload_with(&gateway, &policy(&["eu"], "us")).await;
    assert_eq!(status, 422, "{body}");
    let problems = body["problems"].as_array().unwrap();
    let paths: Vec<&str> = problems
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["policy.eu_regions", "policy.default_region"]);
    for problem in problems {
        assert!(
            problem["message"].as_str().unwrap().contains("restart"),
            "{problem}"
        );
    }

    let wider = policy(&["eu", "de", "fr"], "de");
    write(&path, &wider);
    until_version(&gateway, &tollgate::config::version(&wider.to_toml())).await;
    assert_eq!(gateway.chat(ask).await.status(), 451);
}

#[tokio::test]
async fn a_keyless_gateway_on_the_network_takes_no_paid_backend_unless_its_config_says_so() {
    // Running without keys on simulated backends, on an address other
    // hosts reach (the running config's: `serve --listen` sets it).
    let on_network = |config: Config| config.set("server", "listen", "0.0.0.0:8080");
    let gateway = start(&on_network(simulated(&["one"]))).await;
    let version = active_version(&gateway).await;
    let vllm = || Backend::upstream("gpu", "vllm", "http://127.0.0.1:9/v1");
    let paid = || on_network(simulated(&["one"]).backend(vllm()));
    let (paths, said) = reload_refused(&gateway, paid()).await;
    assert_eq!(paths, ["keys"]);
    assert!(
        said.contains("listens on 0.0.0.0:8080") && said.contains("backend \"gpu\""),
        "{said}"
    );
    // The file's own address does not decide: the running one does.
    let loopback = paid().set("server", "listen", "127.0.0.1:8080");
    assert_eq!(reload_refused(&gateway, loopback).await.0, ["keys"]);
    assert_eq!(active_version(&gateway).await, version, "nothing applied");

    let said_so = paid().set("server", "allow_anonymous", true);
    let report = admin(&gateway, reqwest::Method::POST, "/admin/reload")
        .await
        .body(said_so.to_toml())
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200, "{}", report.text().await.unwrap());
    assert_ne!(active_version(&gateway).await, version);
}

#[test]
fn a_reload_that_changes_who_may_call_what_is_logged_as_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    write(&path, &keyed(&["one"]));
    let env = [
        ("KEY_TEAM", "team-secret"),
        ("KEY_OPS", "ops-secret"),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let gateway = support::process::serve_file(&path, &env);
    // It logs its address before its watch starts: a write in between
    // would go unseen.
    gateway.logged("watching the config file for changes");
    write(&path, &keyed(&["one"]).key(Key::new("ops")));
    let line = gateway.logged("changes who may call the gateway");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("keys added: ops"), "{line}");
}

/// The 422 of a refused candidate places each problem at its line, in its
/// message and as `line` and `column`; a problem with a value the
/// candidate does not write (a token it drops) has no line.
#[tokio::test]
async fn a_refused_reload_places_each_problem_at_its_line() {
    let gateway = start(&simulated(&["one"])).await;
    let invalid = simulated_on(&["one"], &["one", "nowhere"])
        .set("routing", "max_attempts", 99)
        .admin();
    let text = invalid.to_toml();
    let (status, body) = reload_with(&gateway, &invalid).await;
    assert_eq!(status, 422, "{body}");
    let placed = |body: &Value| -> Vec<(String, Option<u64>, Option<u64>)> {
        body["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let path = p["path"].as_str().unwrap().to_owned();
                (path, p["line"].as_u64(), p["column"].as_u64())
            })
            .collect()
    };
    let attempts = line_of(&text, "max_attempts = ");
    let nowhere = line_of(&text, "backend = \"nowhere\"");
    assert_eq!(
        placed(&body),
        [
            (
                "routing.max_attempts".into(),
                Some(attempts as u64),
                Some(1)
            ),
            (
                "models[0].deployments[1].backend".into(),
                Some(nowhere as u64),
                Some(1)
            ),
        ]
    );
    let said = message(&body["error"]);
    assert!(
        said.contains(&format!("(line {attempts}, column 1); models[0]")),
        "{said}"
    );
    let (status, body) = reload_with(&gateway, &simulated_on(&["one"], &["one"])).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(placed(&body), [("admin.token_env".into(), None, None)]);
}

/// The log places a warning at its line when the gateway starts, and
/// each problem of a file it refuses to reload at its line.
#[test]
fn the_log_places_warnings_and_a_refused_reloads_problems_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let config = keyed(&["one"]);
    write(&path, &config);
    let env = [("KEY_TEAM", "team-secret"), ("ADMIN_TOKEN", ADMIN_TOKEN)];
    let gateway = support::process::serve_file(&path, &env);
    let short = gateway.logged("warning=keys[0].key_env: ");
    let at = format!(
        "(line {}, column 1)",
        line_of(&config.to_toml(), "key_env = ")
    );
    assert!(short.ends_with(&at), "not at {at}: {short}");
    gateway.logged("watching the config file for changes");
    let invalid = config.set("routing", "max_attempts", 0);
    write(&path, &invalid);
    let refused = gateway.logged("config reload refused");
    let at = format!(
        "(line {}, column 1)",
        line_of(&invalid.to_toml(), "max_attempts = ")
    );
    assert!(
        refused.contains("routing.max_attempts: ") && refused.ends_with(&at),
        "not at {at}: {refused}"
    );
}

#[test]
fn what_check_warns_of_is_logged_when_the_gateway_takes_the_config_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    // No keys: every caller may choose its region, and a multimodal Llama
    // is served.
    let risky = Config::new()
        .backend(Backend::simulated("sim"))
        .model(
            Model::new("vision").deployment(
                Deployment::new("sim", "meta-llama/Llama-4-Scout-17B-16E-Instruct")
                    .set("licence", "llama")
                    .multimodal(&["text", "image"]),
            ),
        )
        .set("policy", "eu_regions", vec!["eu"]);
    write(&path, &risky);
    let gateway = support::process::serve_file(&path, &[]);
    let line = gateway.logged("config warning");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("multimodal Llama"), "{line}");
}

/// The active config's warnings are counted, for an alert: the admin
/// token and the key `team-secret` are too short to be safe, and a
/// reload that gives the key by its digest takes its warning away.
#[tokio::test]
async fn the_active_configs_warnings_are_counted_for_an_alert() {
    let (_dir, path, gateway) = serving_file(&keyed(&["one"])).await;
    let text = gateway.metrics().await;
    assert_eq!(metric(&text, "tollgate_config_warnings", &[]), Some(2.0));
    let digest = "5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b";
    write(&path, &simulated(&["one"]).key(Key::hashed("team", digest)));
    reloads(&gateway, "applied", 1.0).await;
    gateway
        .eventually_metric("tollgate_config_warnings", &[], 1.0)
        .await;
}

#[tokio::test]
async fn a_reload_changes_which_browser_origins_may_call() {
    let origins = |list: &[&str]| {
        let list = list.iter().map(|&o| toml::Value::from(o)).collect();
        simulated(&["one"]).set("server", "cors_origins", toml::Value::Array(list))
    };
    let (first, second) = ("https://a.example", "https://b.example");
    let (_dir, path, gateway) = serving_file(&origins(&[first])).await;
    let allowed = async |origin: &str| {
        let response = gateway
            .post("/v1/chat/completions")
            .header("origin", origin)
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|value| value.to_str().unwrap().to_owned())
    };
    assert_eq!(allowed(first).await.as_deref(), Some(first));
    assert_eq!(allowed(second).await, None);

    let next = origins(&[second]);
    write(&path, &next);
    until_version(&gateway, &tollgate::config::version(&next.to_toml())).await;
    assert_eq!(allowed(first).await, None);
    assert_eq!(allowed(second).await.as_deref(), Some(second));
}

#[tokio::test]
async fn a_reload_changes_the_keepalive_of_connections_opened_after_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keepalive = |ms: i64| simulated(&["one"]).set("server", "keepalive_timeout_ms", ms);
    let (_dir, path, gateway) = serving_file(&keepalive(600_000)).await;
    let address = gateway.base.trim_start_matches("http://").to_owned();
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Answered on `connection`, or `None` if it was closed.
    let ask = async |connection: &mut tokio::net::TcpStream| {
        connection.write_all(request.as_bytes()).await.ok()?;
        let mut answer = vec![0; 64 * 1024];
        let read = connection.read(&mut answer).await.ok()?;
        Some(String::from_utf8_lossy(&answer[..read]).into_owned())
    };
    let mut before = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(ask(&mut before).await.unwrap().starts_with("HTTP/1.1 200"));

    let next = keepalive(300);
    write(&path, &next);
    until_version(&gateway, &tollgate::config::version(&next.to_toml())).await;
    let mut after = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(ask(&mut after).await.unwrap().starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, after.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "idle past 300 ms: closed");
    let kept = ask(&mut before)
        .await
        .expect("opened before the reload: kept");
    assert!(kept.starts_with("HTTP/1.1 200"), "{kept}");
}
