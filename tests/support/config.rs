//! The one way tests build a gateway config: typed pieces rendered to
//! TOML, so each test names only what it is about.
//!
//! ```ignore
//! let config = Config::new()
//!     .backend(Backend::upstream("api", "openai", &url(&mock)))
//!     .backend(Backend::simulated("gpu").set("region", "eu-west-1").one_dollar_pool())
//!     .model(
//!         Model::new("chat")
//!             .strategy("cost")
//!             .deployment(Deployment::named("per-token", "api").price(0.5, 0.5))
//!             .deployment(Deployment::new("gpu", "m")),
//!     )
//!     .key(Key::new("team").set("rpm", 2))
//!     .set("routing", "max_attempts", 2)
//!     .admin();
//! let gateway = start(&config).await;
//! ```
//!
//! Only what a test sets is written: everything else keeps the gateway's
//! default. Typed methods cover what takes several fields or follows a
//! convention; `set` writes any other single field. The secrets the
//! pieces name are the ones `gateway::env` holds: `Backend::credential`
//! is `sk-test-<name>`, `Key::new("team")` is `team-secret`,
//! `Config::admin` is `gateway::ADMIN_TOKEN`.

use toml::{Table, Value};

/// A whole config file.
#[derive(Clone, Default)]
pub struct Config(Table);

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// Backends, models and keys keep the order they are added in.
    pub fn backend(mut self, backend: Backend) -> Self {
        push(&mut self.0, "backends", backend.0);
        self
    }

    pub fn model(mut self, model: Model) -> Self {
        push(&mut self.0, "models", model.0);
        self
    }

    pub fn key(mut self, key: Key) -> Self {
        push(&mut self.0, "keys", key.0);
        self
    }

    /// `key = value` in the top-level table `section` (`routing`,
    /// `policy`, `server`, `ledger`), replacing what was set.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        put(table(&mut self.0, section), key, value);
        self
    }

    /// The admin API, opened by the token `gateway::ADMIN_TOKEN`.
    pub fn admin(self) -> Self {
        self.set("admin", "token_env", "ADMIN_TOKEN")
    }

    /// A `[[policy.residency]]` rule: requests from `request_region` may
    /// only be served in `backend_regions`.
    pub fn residency(mut self, request_region: &str, backend_regions: &[&str]) -> Self {
        let mut rule = Table::new();
        put(&mut rule, "request_region", request_region);
        put(&mut rule, "backend_regions", strings(backend_regions));
        push(table(&mut self.0, "policy"), "residency", rule);
        self
    }

    pub fn to_toml(&self) -> String {
        self.0.to_string()
    }
}

/// A `[[backends]]` table.
#[derive(Clone)]
pub struct Backend(Table);

impl Backend {
    /// A backend of `kind` at `base_url`; every other setting is the
    /// gateway's default until set.
    pub fn new(name: &str, kind: &str, base_url: &str) -> Self {
        Self::bare(name, kind).set("base_url", base_url)
    }

    /// An upstream at `base_url` as most tests want it: with its
    /// credential, and the timeouts of `short_timeouts`.
    pub fn upstream(name: &str, kind: &str, base_url: &str) -> Self {
        Self::new(name, kind, base_url)
            .credential()
            .short_timeouts()
    }

    pub fn simulated(name: &str) -> Self {
        Self::bare(name, "simulated")
    }

    /// Bedrock in us-east-1 at `base_url`, with the timeouts of
    /// `short_timeouts` and no credentials until `sigv4_with_token` or an
    /// `api_key_env`.
    pub fn bedrock(name: &str, base_url: &str) -> Self {
        Self::new(name, "bedrock", base_url)
            .set("aws_region", "us-east-1")
            .short_timeouts()
    }

    fn bare(name: &str, kind: &str) -> Self {
        Self(Table::new()).set("name", name).set("kind", kind)
    }

    /// `api_key_env = "UPSTREAM_KEY_<NAME>"`, which `gateway::env` holds
    /// as `sk-test-<name>`.
    pub fn credential(self) -> Self {
        let name = self.0["name"].as_str().expect("a name");
        let var = format!("UPSTREAM_KEY_{}", name.to_uppercase().replace('-', "_"));
        self.set("api_key_env", var)
    }

    /// SigV4 with a session token: the credentials `gateway::env` holds,
    /// which `gateway::bedrock_mock_with_token` accepts.
    pub fn sigv4_with_token(self) -> Self {
        self.set("aws_access_key_id_env", "AWS_KEY_ID_TEST")
            .set("aws_secret_access_key_env", "AWS_SECRET_TEST")
            .set("aws_session_token_env", "AWS_TOKEN_TEST")
    }

    /// Timeouts short enough that a hang fails the test rather than
    /// stalling it: 2 s to connect, 5 s to the first byte and between
    /// bytes.
    pub fn short_timeouts(self) -> Self {
        self.set_in("timeouts", "connect_ms", 2_000)
            .first_byte_ms(5_000)
            .idle_ms(5_000)
    }

    pub fn first_byte_ms(self, ms: u32) -> Self {
        self.set_in("timeouts", "first_byte_ms", ms)
    }

    pub fn idle_ms(self, ms: u32) -> Self {
        self.set_in("timeouts", "idle_ms", ms)
    }

    /// `[backends.simulated]`: how soon a simulated backend answers, how
    /// fast, and how long its answers are.
    pub fn answers(self, ttft_ms: u32, tokens_per_second: u32, completion_tokens: u32) -> Self {
        self.set_in("simulated", "ttft_ms", ttft_ms)
            .set_in(
                "simulated",
                "tokens_per_second",
                f64::from(tokens_per_second),
            )
            .set_in("simulated", "completion_tokens", completion_tokens)
    }

    /// `key = value` in `[backends.simulated]`.
    pub fn set_simulated(self, key: &str, value: impl Into<Value>) -> Self {
        self.set_in("simulated", key, value)
    }

    /// A simulated backend whose prefix cache holds `blocks` prompt blocks.
    pub fn prefix_cache(self, blocks: u32) -> Self {
        self.set_in("simulated", "prefix_cache_blocks", blocks)
    }

    /// A simulated backend that fails every request, at once.
    pub fn always_fails(self) -> Self {
        self.set_in("simulated", "ttft_ms", 1)
            .set_in("simulated", "failure_rate", 1.0)
    }

    /// A self-hosted pool, priced by the GPU-hour.
    pub fn pool(self, gpu_hour_usd: f64, gpus: u32, throughput_tokens_per_second: u32) -> Self {
        self.set("gpu_hour_usd", gpu_hour_usd)
            .set("gpus", gpus)
            .set(
                "throughput_tokens_per_second",
                f64::from(throughput_tokens_per_second),
            )
    }

    /// One GPU at $3.60 an hour and 1000 tokens/s: $1 per Mtok flat out.
    pub fn one_dollar_pool(self) -> Self {
        self.pool(3.6, 1, 1000)
    }

    /// `key = value` in `[backends.engine_metrics]`.
    pub fn engine_metrics(self, key: &str, value: impl Into<Value>) -> Self {
        self.set_in("engine_metrics", key, value)
    }

    /// Any other field (`region`, `max_concurrency`…), replacing what was
    /// set.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        put(&mut self.0, key, value);
        self
    }

    fn set_in(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        put(table(&mut self.0, section), key, value);
        self
    }
}

/// A `[[models]]` table: an alias and its deployments.
#[derive(Clone)]
pub struct Model(Table);

impl Model {
    pub fn new(alias: &str) -> Self {
        let mut table = Table::new();
        put(&mut table, "alias", alias);
        Self(table)
    }

    pub fn strategy(mut self, strategy: &str) -> Self {
        put(&mut self.0, "strategy", strategy);
        self
    }

    /// The `spillover` strategy with these thresholds.
    pub fn spillover(self, high_load: f64, low_load: f64) -> Self {
        self.strategy("spillover")
            .set_spillover("high_load", high_load)
            .set_spillover("low_load", low_load)
    }

    /// Spillover never overflows to a deployment dearer than this.
    pub fn price_cap(self, usd_per_mtok: f64) -> Self {
        self.set_spillover("price_cap_usd_per_mtok", usd_per_mtok)
    }

    /// `affinity = "none" | "session" | "prefix"`.
    pub fn affinity(mut self, affinity: &str) -> Self {
        put(&mut self.0, "affinity", affinity);
        self
    }

    /// `hedge = { after_ms, max_extra_usd_per_request }`.
    pub fn hedge_after(self, after_ms: u32, max_extra_usd: f64) -> Self {
        self.hedge("after_ms", after_ms)
            .hedge("max_extra_usd_per_request", max_extra_usd)
    }

    /// `key = value` in the alias's `hedge` table.
    pub fn hedge(mut self, key: &str, value: impl Into<Value>) -> Self {
        put(table(&mut self.0, "hedge"), key, value);
        self
    }

    /// Deployments keep the order they are added in.
    pub fn deployment(mut self, deployment: Deployment) -> Self {
        push(&mut self.0, "deployments", deployment.0);
        self
    }

    fn set_spillover(mut self, key: &str, value: f64) -> Self {
        put(table(&mut self.0, "spillover"), key, value);
        self
    }
}

/// A `[[models.deployments]]` table.
#[derive(Clone)]
pub struct Deployment(Table);

impl Deployment {
    /// `model` on `backend`: text only, a context window of 8192 tokens,
    /// no price.
    pub fn new(backend: &str, model: &str) -> Self {
        Self(Table::new())
            .set("backend", backend)
            .set("model", model)
            .set("context_window", 8192)
    }

    /// Deployment `name` of a model `m` on `backend`, for tests where the
    /// upstream model does not matter but the deployment's name does.
    pub fn named(name: &str, backend: &str) -> Self {
        Self::new(backend, "m").set("name", name)
    }

    pub fn price(self, input_usd_per_mtok: f64, output_usd_per_mtok: f64) -> Self {
        self.set("input_usd_per_mtok", input_usd_per_mtok)
            .set("output_usd_per_mtok", output_usd_per_mtok)
    }

    /// A multimodal model taking these input modalities.
    pub fn multimodal(self, modalities: &[&str]) -> Self {
        self.set("multimodal", true)
            .set("modalities", strings(modalities))
    }

    /// Any other field (`licence`, `tools`, `weight`, `rpm`…), replacing
    /// what was set.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        put(&mut self.0, key, value);
        self
    }
}

/// A `[[keys]]` table.
#[derive(Clone)]
pub struct Key(Table);

impl Key {
    /// Key `name`, allowed every model, whose secret `gateway::env` holds
    /// under `KEY_<NAME>` as `<name>-secret`.
    pub fn new(name: &str) -> Self {
        let var = format!("KEY_{}", name.to_uppercase().replace('-', "_"));
        Self(Table::new())
            .set("name", name)
            .set("key_env", var)
            .models(&["*"])
    }

    /// Key `name`, allowed every model, given by its SHA-256 digest: for
    /// configs read without an environment.
    pub fn hashed(name: &str, sha256: &str) -> Self {
        Self(Table::new())
            .set("name", name)
            .set("sha256", sha256)
            .models(&["*"])
    }

    pub fn models(self, aliases: &[&str]) -> Self {
        self.set("models", strings(aliases))
    }

    /// Any other field (`region`, `rpm`, `budget_daily_usd`…), replacing
    /// what was set.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        put(&mut self.0, key, value);
        self
    }
}

fn put(table: &mut Table, key: &str, value: impl Into<Value>) {
    table.insert(key.to_owned(), value.into());
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|&item| item.into()).collect())
}

/// The table under `key`, created empty if missing.
fn table<'t>(parent: &'t mut Table, key: &str) -> &'t mut Table {
    parent
        .entry(key)
        .or_insert_with(|| Value::Table(Table::new()))
        .as_table_mut()
        .expect("a table")
}

/// Appends `item` to the array of tables under `key`.
fn push(parent: &mut Table, key: &str, item: Table) {
    parent
        .entry(key)
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .expect("an array of tables")
        .push(Value::Table(item));
}

/// The line, counted from 1, of `text` that starts with `start`; there
/// must be exactly one.
pub fn line_of(text: &str, start: &str) -> usize {
    let lines: Vec<usize> = (1..)
        .zip(text.lines())
        .filter(|(_, line)| line.starts_with(start))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(lines.len(), 1, "{start:?} starts one line of:\n{text}");
    lines[0]
}
