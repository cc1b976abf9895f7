//! The observability deliverables against the gateway's metrics: every
//! metric `deploy/grafana/tollgate.json` and `deploy/prometheus/alerts.yml`
//! query is one the gateway declares (and, where the scenario here can make
//! it happen, exports with samples on `/metrics`); every declared metric
//! follows the Prometheus naming conventions; `docs/metrics.md` lists what
//! the table declares; and the dashboard and the rules file have the shape
//! Grafana and Prometheus expect. "Declared" means `METRICS` in
//! `src/metrics.rs`, the table the gateway registers its metrics from.
//!
//! The gateway is built in-process from a config of `simulated` backends
//! plus one `vllm` backend, the shared mock, whose `/metrics` page is
//! scraped.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::{METRICS_TOKEN, png, url};
use support::mock::{MockServer, MockUpstream};
use tokio::net::TcpListener;
use tollgate::metrics::{Kind, Label, METRICS, MetricDef};

const DASHBOARD: &str = "deploy/grafana/tollgate.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";

/// Declared names whose unit is not a base unit, kept knowingly: USD per
/// million tokens is how every LLM price list reads.
const UNIT_EXCEPTIONS: &[&str] = &["tollgate_selfhosted_effective_usd_per_mtok"];

// ---- docs/metrics.md, generated from the table ----------------------------------------

const METRICS_DOC: &str = "docs/metrics.md";

/// The line between the page's prose, written by hand, and what
/// `metrics_doc_list` renders from `METRICS`.
const GENERATED_BELOW: &str = "<!-- Generated from METRICS in src/metrics.rs: edit above this \
     line only, and regenerate with `UPDATE_DOCS=1 cargo test --test observability`. -->";

/// A Markdown table cell: a `|` would end the cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The families, the values each label takes, and the histograms' buckets.
fn metrics_doc_list() -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out += &text;
        out.push('\n');
    };
    line("## Families\n".into());
    line("| metric | type | labels | help |\n| --- | --- | --- | --- |".into());
    for def in METRICS {
        let labels: Vec<String> = def.labels.iter().map(|l| format!("`{}`", l.name)).collect();
        line(format!(
            "| `{}` | {} | {} | {} |",
            def.name,
            def.kind.name(),
            labels.join(", "),
            cell(def.help)
        ));
    }
    // One row per distinct meaning: a name used with two meanings gets two.
    let labels: BTreeSet<(&str, &str)> = METRICS
        .iter()
        .flat_map(|def| def.labels)
        .map(|l| (l.name, l.values))
        .collect();
    line("\n## Labels\n".into());
    line("| label | values |\n| --- | --- |".into());
    for (name, values) in labels {
        line(format!("| `{name}` | {} |", cell(values)));
    }
    line("\n## Histogram buckets\n".into());
    line("Upper bounds (`le`), in the metric's unit; each histogram also has `+Inf`.\n".into());
    line("| metric | buckets |\n| --- | --- |".into());
    for def in METRICS.iter().filter(|def| def.kind == Kind::Histogram) {
        let bounds: Vec<String> = def.buckets.iter().map(f64::to_string).collect();
        line(format!("| `{}` | {} |", def.name, bounds.join(", ")));
    }
    out
}

// ---- what the dashboard and the alerts query -------------------------------------------

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every `tollgate_…` metric name in a PromQL expression (a name is
/// `tollgate_` and the `[a-z0-9_:]` that follow, not preceded by a name
/// character).
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("tollgate_") {
        let start = from + at;
        let mut end = start + "tollgate_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_'
                || bytes[end] == b':')
        {
            end += 1;
        }
        let preceded = start > 0 && {
            let b = bytes[start - 1];
            b.is_ascii_alphanumeric() || b == b'_' || b == b':'
        };
        if !preceded {
            names.push(expr[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// The PromQL strings of the dashboard: panel targets, annotations and
/// template-variable queries, with where each is.
fn dashboard_queries(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let here = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("{at} > {title:?}"),
                    None => at.to_owned(),
                };
                match (key.as_str(), v) {
                    ("expr" | "definition" | "query", Value::String(s)) => {
                        out.push((format!("{here} {key}"), s.clone()));
                    }
                    _ => dashboard_queries(v, &here, out),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_queries(item, at, out);
            }
        }
        _ => {}
    }
}

/// The `expr` of every rule in the rules file, read as text: `expr: …` on
/// one line, or a `|`/`>` block of the lines indented under it.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len()
                && (lines[i].trim().is_empty()
                    || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block += lines[i].trim();
                block.push('\n');
                i += 1;
            }
            exprs.push(block);
        } else {
            exprs.push(rest.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    exprs
}

/// Each name the dashboard and alerts query, with where: histogram series
/// (`_bucket`, `_sum`, `_count`) count as their family.
fn referenced(histograms: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut queries = Vec::new();
    dashboard_queries(&dashboard(), DASHBOARD, &mut queries);
    for (n, expr) in rule_exprs(&read(ALERTS)).into_iter().enumerate() {
        queries.push((format!("{ALERTS} expr #{}", n + 1), expr));
    }
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, expr) in queries {
        for name in metric_names(&expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| histograms.contains(*base))
                .map_or(name.clone(), str::to_owned);
            names.entry(family).or_default().insert(at.clone());
        }
    }
    names
}

// ---- a gateway with samples in every family it can have ------------------------------

/// A vLLM engine whose `/metrics` page reports a queue, a batch and KV
/// cache use; it is only scraped.
async fn engine() -> MockServer {
    let engine = MockUpstream::openai().start().await;
    engine.set_metrics(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3.0\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n\
         # TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name=\"m\"} 400.0\n\
         # TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name=\"m\"} 300.0\n",
    );
    engine
}

const KEY: &str = "obs-test-key";

/// Upstreams that misbehave: one streams past the limit it is sent, one
/// reports usage that cannot be true.
struct Misbehaving {
    runaway: MockServer,
    liar: MockServer,
}

impl Misbehaving {
    async fn start() -> Self {
        let liar = json!({"id": "chatcmpl-liar", "object": "chat.completion", "created": 1, "model": "m",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": -1, "completion_tokens": 1, "total_tokens": 0}});
        Self {
            runaway: MockUpstream::openai()
                .answers_of_ignoring_max_tokens(50)
                .start()
                .await,
            liar: MockUpstream::openai().json(liar).start().await,
        }
    }
}

fn config(engine_url: &str, misbehaving: &Misbehaving) -> Config {
    let on =
        |backend: &str, model: &str| Deployment::new(backend, model).set("context_window", 131_072);
    Config::new()
        .backend(
            Backend::simulated("sim-gpu")
                .answers(5, 2000, 6)
                .pool(2.5, 2, 3000)
                .set("max_concurrency", 16),
        )
        .backend(Backend::simulated("sim-api").answers(5, 2000, 6))
        .backend(Backend::simulated("sim-broken").always_fails())
        .backend(Backend::simulated("sim-slow").answers(5_000, 2000, 6))
        .backend(
            Backend::new("engine", "vllm", engine_url)
                .pool(2.0, 1, 1000)
                .set("max_concurrency", 8)
                .engine_metrics("interval_ms", 100),
        )
        .model(
            Model::new("chat")
                .strategy("spillover")
                .deployment(on("sim-gpu", "gpu-model"))
                .deployment(on("sim-api", "api-model").price(0.5, 1.5)),
        )
        // The cheapest deployment always fails: every request fails over.
        .model(
            Model::new("flaky")
                .strategy("cost")
                .deployment(on("sim-broken", "broken-model").price(0.01, 0.01))
                .deployment(on("sim-api", "api-model").price(0.5, 1.5)),
        )
        // The cheapest deployment is slow to its first token: every
        // request is hedged, and the hedge wins.
        .model(
            Model::new("hedged")
                .hedge_after(50, 0.01)
                .deployment(on("sim-slow", "slow-model").price(0.01, 0.01))
                .deployment(on("sim-api", "api-model").price(0.5, 1.5)),
        )
        // Multimodal Llama: refused to EU requests by policy.
        .model(
            Model::new("vision").deployment(
                on("sim-api", "vision-model")
                    .price(0.3, 0.9)
                    .multimodal(&["text", "image"])
                    .set("licence", "llama"),
            ),
        )
        // Never called: only here so the vLLM engine is scraped.
        .model(Model::new("engine-pool").deployment(on("engine", "m")))
        .backend(Backend::new(
            "runaway",
            "openai",
            &url(&misbehaving.runaway),
        ))
        .model(Model::new("runaway").deployment(on("runaway", "m").price(0.5, 1.5)))
        .backend(Backend::new("liar", "openai", &url(&misbehaving.liar)))
        .model(Model::new("liar").deployment(on("liar", "m").price(0.5, 1.5)))
        .key(
            Key::new("team")
                .set("key_env", "OBS_TEST_KEY")
                .set("budget_daily_usd", 100.0)
                .set("budget_monthly_usd", 1000.0)
                .set("region_header", true),
        )
}

/// Starts the gateway, sends requests that touch every family a request can
/// touch, and returns its `/metrics` page once the engine's signals are in.
async fn scraped_metrics() -> String {
    let engine = engine().await;
    let misbehaving = Misbehaving::start().await;
    let config = tollgate::config::parse(&config(&url(&engine), &misbehaving).to_toml(), &|name| {
        (name == "OBS_TEST_KEY").then(|| KEY.to_owned())
    })
    .unwrap_or_else(|problems| panic!("test config is invalid: {problems:?}"));
    let gateway = tollgate::Gateway::new(config).expect("gateway builds");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(gateway.serve(listener, std::future::pending()));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let chat = |body: Value, region: Option<&'static str>| {
        let mut request = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body);
        if let Some(region) = region {
            request = request.header("x-tollgate-region", region);
        }
        async move {
            let response = request.send().await.expect("gateway answers");
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
    };
    let hi = json!([{"role": "user", "content": "hi"}]);
    let image = json!([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": png(640, 480)}},
    ]}]);
    let cases = [
        (json!({"model": "chat", "messages": hi}), None, 200),
        (
            json!({"model": "chat", "messages": hi, "stream": true}),
            None,
            200,
        ),
        (
            json!({"model": "flaky", "messages": hi, "stream": true}),
            None,
            200,
        ),
        (json!({"model": "flaky", "messages": hi}), None, 200),
        (json!({"model": "hedged", "messages": hi}), None, 200),
        (
            json!({"model": "vision", "messages": image}),
            Some("eu"),
            451,
        ),
        (json!({"model": "no-such-model", "messages": hi}), None, 404),
        (
            json!({"model": "runaway", "messages": hi, "stream": true, "max_tokens": 5}),
            None,
            200,
        ),
        (json!({"model": "liar", "messages": hi}), None, 200),
    ];
    for (body, region, want) in cases {
        let status = chat(body.clone(), region).await;
        assert_eq!(status, want, "{body} (region {region:?})");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics answers")
            .text()
            .await
            .expect("metrics body");
        if page.contains("tollgate_engine_kv_cache_usage_ratio{") || Instant::now() > deadline {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Family name → type, from the page's `# TYPE` lines.
fn exported_types(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Declared families with at least one sample line on the page.
fn with_samples(page: &str) -> BTreeSet<&'static str> {
    let sampled: BTreeSet<&str> = page
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    METRICS
        .iter()
        .filter(|def| match def.kind {
            Kind::Histogram => sampled.contains(format!("{}_count", def.name).as_str()),
            _ => sampled.contains(def.name),
        })
        .map(|def| def.name)
        .collect()
}

// ---- tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_one_the_gateway_exports() {
    let page = scraped_metrics().await;
    let exported = exported_types(&page);

    let mut names: BTreeSet<String> = METRICS.iter().map(|def| def.name.to_owned()).collect();
    names.extend(exported.keys().cloned());
    let histograms: BTreeSet<String> = METRICS
        .iter()
        .filter(|def| def.kind == Kind::Histogram)
        .map(|def| def.name.to_owned())
        .collect();

    let referenced = referenced(&histograms);
    assert!(
        referenced.len() >= 20,
        "the dashboard and alerts should query most families; found only {:?}",
        referenced.keys().collect::<Vec<_>>()
    );
    let missing: Vec<String> = referenced
        .iter()
        .filter(|(name, _)| !names.contains(*name))
        .map(|(name, at)| {
            format!(
                "{name} (in {})",
                at.iter().cloned().collect::<Vec<_>>().join("; ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not declared or exported by the gateway:\n  {}\ndeclared or exported: {:?}",
        missing.join("\n  "),
        names
    );

    // What the scenario above makes happen has samples to graph and alert on.
    let sampled = with_samples(&page);
    let silent: Vec<&String> = referenced
        .keys()
        .filter(|name| !sampled.contains(name.as_str()))
        .collect();
    assert!(
        silent.is_empty(),
        "queried, declared, but no samples after the scenario: {silent:?}\n---\n{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_family_is_in_the_table_with_its_type_and_help() {
    let declared: BTreeMap<&str, &MetricDef> = METRICS.iter().map(|def| (def.name, def)).collect();
    let page = scraped_metrics().await;
    let helps: BTreeMap<&str, &str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    for (name, kind) in exported_types(&page) {
        let def = declared.get(name.as_str()).unwrap_or_else(|| {
            panic!("{name} is exported but not in METRICS (src/metrics.rs): declare it there")
        });
        assert_eq!(kind, def.kind.name(), "{name}: exported type");
        assert_eq!(
            helps.get(name.as_str()).copied(),
            Some(def.help),
            "{name}: exported help text"
        );
    }
}

#[test]
fn declared_metrics_follow_prometheus_naming_conventions() {
    // Units in a name must be base units; these are the scaled ones.
    const NOT_BASE: &[&str] = &[
        "ms",
        "milliseconds",
        "us",
        "microseconds",
        "ns",
        "nanoseconds",
        "minutes",
        "hours",
        "days",
        "kb",
        "mb",
        "gb",
        "kilobytes",
        "megabytes",
        "gigabytes",
        "percent",
        "pct",
        "cents",
        "dollars",
        "ktok",
        "mtok",
    ];
    const BASE_UNITS: &[&str] = &["seconds", "bytes", "usd", "ratio"];
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for def in METRICS {
        let name = def.name;
        if !seen.insert(name) {
            problems.push(format!("{name}: declared twice"));
        }
        if !name.starts_with("tollgate_") {
            problems.push(format!("{name}: no tollgate_ prefix"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || name.contains("__")
            || name.ends_with('_')
        {
            problems.push(format!("{name}: not snake_case"));
        }
        match def.kind {
            Kind::Counter if !name.ends_with("_total") => {
                problems.push(format!("{name}: a counter without the _total suffix"))
            }
            Kind::Gauge | Kind::Histogram if name.ends_with("_total") => problems.push(format!(
                "{name}: a {} with the _total suffix",
                def.kind.name()
            )),
            _ => {}
        }
        if def.kind == Kind::Histogram
            && !BASE_UNITS.iter().any(|u| name.ends_with(&format!("_{u}")))
        {
            problems.push(format!("{name}: a histogram without a base-unit suffix"));
        }
        let tokens: Vec<&str> = name.split('_').collect();
        if let Some(unit) = tokens.iter().find(|t| NOT_BASE.contains(t))
            && !UNIT_EXCEPTIONS.contains(&name)
        {
            problems.push(format!("{name}: unit {unit:?} is not a base unit"));
        }
        // A unit, when there is one, comes last (before _total).
        let stem = name.strip_suffix("_total").unwrap_or(name);
        for unit in BASE_UNITS {
            if tokens.contains(unit)
                && !stem.ends_with(&format!("_{unit}"))
                && !UNIT_EXCEPTIONS.contains(&name)
            {
                problems.push(format!("{name}: unit {unit} is not the name's suffix"));
            }
        }
        if def.help.trim().is_empty() {
            problems.push(format!("{name}: no help text"));
        }
        for Label {
            name: label,
            values,
        } in def.labels
        {
            if values.trim().is_empty() {
                problems.push(format!(
                    "{name}: label {label:?} does not say where its values come from"
                ));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                || label.starts_with("__")
            {
                problems.push(format!("{name}: label {label:?} is not snake_case"));
            }
            // Bounded label sets: never per-request or per-user values.
            if ["request_id", "user", "prompt", "ip", "url", "message"].contains(label) {
                problems.push(format!("{name}: label {label:?} is unbounded"));
            }
        }
    }
    for exception in UNIT_EXCEPTIONS {
        assert!(
            seen.contains(*exception),
            "{exception} is no longer declared: drop it from UNIT_EXCEPTIONS"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn docs_metrics_md_lists_what_the_table_declares() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(METRICS_DOC);
    let current = read(METRICS_DOC);
    let Some(at) = current.find(GENERATED_BELOW) else {
        panic!(
            "{METRICS_DOC} has lost its marker line; put it back under the prose:\n{GENERATED_BELOW}"
        );
    };
    let expected = format!(
        "{}{GENERATED_BELOW}\n\n{}",
        &current[..at],
        metrics_doc_list()
    );
    if current == expected {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, expected).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
        return;
    }
    let has: Vec<&str> = current.split('\n').collect();
    let wants: Vec<&str> = expected.split('\n').collect();
    let first = (0..=has.len().max(wants.len()))
        .find(|&i| has.get(i) != wants.get(i))
        .expect("texts that differ differ in some line");
    panic!(
        "{METRICS_DOC} does not match METRICS in src/metrics.rs; regenerate it with \
         `UPDATE_DOCS=1 cargo test --test observability` and commit the result.\n\
         First difference, line {}:\n  has:   {}\n  wants: {}",
        first + 1,
        has.get(first).unwrap_or(&"<end of file>"),
        wants.get(first).unwrap_or(&"<end of file>")
    );
}

#[test]
fn docs_operations_md_names_every_metric_and_alert() {
    let doc = read("docs/operations.md");
    let alerts = read(ALERTS);
    let alert_names = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "));
    let missing: Vec<&str> = METRICS
        .iter()
        .map(|def| def.name)
        .chain(alert_names)
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name {missing:?}"
    );
}

#[test]
fn the_dashboard_is_a_grafana_model_over_a_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: duplicate id"
        );
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: gridPos {grid}"
        );
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: description"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        let mut queried = 0;
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId"
            );
            queried += metric_names(t["expr"].as_str().expect("expr")).len();
        }
        assert!(queried > 0, "{title}: queries no tollgate metric");
    }
    assert!(graphs >= 30, "{graphs} panels");
    // The panels the issue asks for, by what they query.
    let text = d.to_string();
    for needle in [
        "tollgate_cost_usd_total",
        "tollgate_counterfactual_cost_usd_total",
        "tollgate_selfhosted_cost_usd_total",
        "tollgate_selfhosted_utilization_ratio",
        "tollgate_tokens_total",
        "histogram_quantile(0.99, sum by (backend, le) (rate(tollgate_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (backend, le) (rate(tollgate_time_to_first_token_seconds_bucket",
        "tollgate_errors_total",
        "tollgate_failovers_total",
        "tollgate_budget_remaining_usd",
        "tollgate_circuit_state",
        "tollgate_backend_load_ratio",
    ] {
        assert!(
            text.contains(needle),
            "the dashboard has no panel with {needle}"
        );
    }
}

#[test]
fn every_alert_rule_has_an_expr_a_for_a_severity_and_annotations() {
    let yaml = read(ALERTS);
    assert!(
        yaml.starts_with("#") || yaml.starts_with("groups:"),
        "groups: at the top"
    );
    assert!(
        yaml.lines().any(|l| l == "groups:"),
        "a top-level groups: key"
    );
    let blocks: Vec<&str> = yaml.split("- alert: ").skip(1).collect();
    assert!(blocks.len() >= 5, "{} alert rules", blocks.len());
    assert_eq!(
        rule_exprs(&yaml).len(),
        blocks.len(),
        "one expr per alert rule"
    );
    let mut names = BTreeSet::new();
    for block in blocks {
        let name = block.lines().next().unwrap_or("").trim();
        assert!(names.insert(name.to_owned()), "{name}: defined twice");
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(key), "{name}: no {key}");
        }
        let severity = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(str::trim)
            .unwrap_or("");
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        assert!(
            block.contains("{{ $labels."),
            "{name}: annotations name no label"
        );
    }
    // The alerts the issue asks for, by what they query.
    let exprs = rule_exprs(&yaml).join("\n");
    for needle in [
        "tollgate_budget_remaining_usd{period=\"daily\"}",
        "tollgate_requests_total{status=~\"5..\"}",
        "tollgate_time_to_first_token_seconds_bucket",
        "tollgate_circuit_state{state=\"open\"}",
        "tollgate_config_reloads_total{result=\"invalid\"}",
    ] {
        assert!(exprs.contains(needle), "no alert queries {needle}");
    }
}

#[test]
fn metric_names_are_found_where_they_are_names() {
    assert_eq!(
        metric_names("sum(rate(tollgate_a_total{x=\"y\"}[5m])) / xtollgate_c + tollgate_d_bucket"),
        ["tollgate_a_total", "tollgate_d_bucket"]
    );
    let yaml = "      - alert: A\n        expr: |\n          tollgate_x\n            > 1\n        for: 1m\n      - alert: B\n        expr: tollgate_y > 2\n";
    assert_eq!(rule_exprs(yaml), ["tollgate_x\n> 1\n", "tollgate_y > 2"]);
}

#[tokio::test]
async fn metrics_ask_for_their_token_when_one_is_configured() {
    let config = Config::new()
        .backend(Backend::simulated("sim"))
        .model(Model::new("chat").deployment(Deployment::new("sim", "m")))
        .set("metrics", "token_env", "METRICS_TOKEN");
    let gateway = support::gateway::start(&config).await;
    let without = gateway.get("/metrics", None).await;
    assert_eq!(without.status(), 401);
    let error: Value = without.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("metrics token"),
        "{error}"
    );
    assert_eq!(gateway.get("/metrics", Some("wrong")).await.status(), 401);
    let with = gateway.get("/metrics", Some(METRICS_TOKEN)).await;
    assert_eq!(with.status(), 200);
    let page = with.text().await.unwrap();
    assert!(page.contains("tollgate_requests_in_flight"), "{page}");
}

/// Each scrape sets the live-state gauges afresh (circuits, budgets…),
/// clearing them first so that names a reload removed disappear: two
/// scrapes at once, as a pair of Prometheus servers makes, must each see
/// every series all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrapes_at_once_each_see_every_live_state_series() {
    const DEPLOYMENTS: usize = 50;
    let mut config = Config::new().backend(Backend::simulated("sim"));
    for i in 0..DEPLOYMENTS {
        config = config.model(Model::new(&format!("m{i}")).deployment(Deployment::new("sim", "m")));
    }
    let gateway = support::gateway::start(&config).await;
    let scrapers = (0..8).map(|_| {
        let (base, http) = (gateway.base.clone(), gateway.http.clone());
        tokio::spawn(async move {
            let mut short = Vec::new();
            for _ in 0..25 {
                let page = http.get(format!("{base}/metrics")).send().await.unwrap();
                let page = page.text().await.unwrap();
                let circuits = page
                    .lines()
                    .filter(|l| l.starts_with("tollgate_circuit_state{"))
                    .count();
                if circuits != 3 * DEPLOYMENTS {
                    short.push(circuits);
                }
            }
            short
        })
    });
    for scraper in scrapers.collect::<Vec<_>>() {
        let short = scraper.await.unwrap();
        assert!(
            short.is_empty(),
            "scrapes that lacked circuit series (their counts): {short:?}"
        );
    }
}
