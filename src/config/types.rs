//! The validated configuration: every value checked, every reference
//! resolved, every secret read from the environment. Built only by
//! `validate`, so holding a `Config` means holding a usable one.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use url::Url;

pub use crate::tls::{ClientTls, Identity, Roots};

pub use crate::logging::LogFormat;
pub use crate::traces::TracingSettings;

#[derive(Debug, Clone)]
pub struct Config {
    /// Validated without reading its secrets (`Secrets::Unread`): it has
    /// no credentials, so it may be explained but never served.
    pub offline: bool,
    /// A hash of the config text (`config::version`).
    pub version: String,
    /// The config as written, as JSON, but for its keys: with
    /// `written_keys`, what `GET /admin/config` shows
    /// ([`Config::written`]) and what diffs compare.
    pub document: serde_json::Value,
    pub written_keys: super::WrittenKeys,
    pub server: ServerConfig,
    pub backends: Vec<Backend>,
    pub models: Vec<Model>,
    pub keys: Vec<Key>,
    pub routing: RoutingSettings,
    pub policy: Policy,
    pub admin: Admin,
    pub metrics: MetricsAccess,
    pub ledger: LedgerSettings,
    pub state: StateSettings,
    pub logging: LogFormat,
    /// OpenTelemetry spans exported over OTLP/HTTP; `None`: off.
    pub tracing: Option<TracingSettings>,
    pub licence: LicenceSettings,
    /// What `tollgate check` warns of: valid, but probably not meant;
    /// placed in the text as problems are.
    pub warnings: Vec<super::Problem>,
}

/// The Llama licence's bookkeeping: who counts as a monthly active user,
/// when to warn, and whether answers say they were built with Llama.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenceSettings {
    /// A request header naming the end user, read when the body names
    /// none (lowercase).
    pub user_header: Option<axum::http::HeaderName>,
    /// `x-built-with: Llama` on answers from `llama` deployments.
    pub attribution_header: bool,
    /// Monthly active users at which the licence asks for a licence of
    /// its own from Meta.
    pub mau_threshold: u64,
    /// The share of `mau_threshold` at which the alert fires.
    pub mau_alert_fraction: f64,
}

impl LicenceSettings {
    /// The Llama Community Licence's threshold.
    pub const DEFAULT_MAU_THRESHOLD: u64 = 700_000_000;

    /// Users at which the alert fires.
    pub fn alert_users(&self) -> u64 {
        (self.mau_threshold as f64 * self.mau_alert_fraction).round() as u64
    }
}

impl Default for LicenceSettings {
    fn default() -> Self {
        Self {
            user_header: None,
            attribution_header: false,
            mau_threshold: Self::DEFAULT_MAU_THRESHOLD,
            mau_alert_fraction: 0.8,
        }
    }
}

/// Where budgets, rate limits and upstream pressure live: in this process
/// (the default), or in Redis, shared by every replica.
#[derive(Debug, Clone, Default)]
pub enum StateSettings {
    #[default]
    Memory,
    Redis(RedisState),
}

#[derive(Debug, Clone)]
pub struct RedisState {
    /// `redis://[user[:password]@]host:port/db` (`rediss://` for TLS); from the environment when
    /// it carries a password. `None` when validated offline.
    pub url: Option<Secret>,
    /// Put before every key the gateway writes, so replicas of one fleet
    /// share them and other fleets on the same Redis do not.
    pub prefix: String,
    /// The longest a request waits on Redis before the replica counts it
    /// unavailable.
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// How long a budget reservation outlives a replica that stopped
    /// renewing it.
    pub lease: Duration,
    /// What a `rediss://` server's certificate must chain to, and the
    /// certificate the gateway shows it.
    pub tls: ClientTls,
}

/// What a replica does while Redis does not answer within the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Serve with this replica's own limits and its share of each budget.
    Local,
    /// Answer 503 with `retry-after`.
    Refuse,
}

/// Where spend is kept. With `Sqlite` and no directory it lives in memory
/// only and a restart loses it.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub backend: LedgerBackend,
    /// The SQLite ledger; with `Postgres`, the local spool (always set).
    pub data_dir: Option<std::path::PathBuf>,
    pub flush_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerBackend {
    /// Daily totals in this replica's SQLite file (or memory).
    Sqlite,
    /// One record per request in a database the fleet shares.
    Postgres {
        /// The database's URL, which may hold a password; `None` only in
        /// a config validated offline (`url_env` unread).
        url: Option<Secret>,
    },
}

#[derive(Debug, Clone)]
pub struct RoutingSettings {
    /// Deployments tried for one request, at most.
    pub max_attempts: usize,
    /// Consecutive failures that open a deployment's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit rejects before it lets one probe through.
    pub circuit_cooldown: Duration,
    /// Share of `latency` decisions that try a random deployment first.
    pub exploration: f64,
    /// Expected completion length before an alias has observed any.
    pub default_output_tokens: u32,
    /// Bounded load for session affinity: no deployment takes a session
    /// past (1 + ε) × the mean of the requests in flight.
    pub affinity_epsilon: f64,
    /// Prompt blocks remembered per deployment for prefix affinity.
    pub prefix_blocks: u32,
}

/// Who may be served where: data residency and the Llama licence.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Request regions that are in the EU, for the Llama licence rule.
    pub eu_regions: Vec<String>,
    /// Multimodal Llama models never serve EU requests (Llama 3.2 / 4
    /// acceptable use policy). On unless the config turns it off.
    pub llama_eu_multimodal_block: bool,
    /// The region of a request whose key names none and that sends none.
    pub default_region: Option<String>,
    pub residency: Vec<Residency>,
}

impl Policy {
    pub fn is_eu(&self, region: &str) -> bool {
        self.eu_regions.iter().any(|r| r == region)
    }

    /// The backend regions allowed for requests from `region`, when a
    /// residency rule limits them.
    pub fn residency_for(&self, region: &str) -> Option<&Residency> {
        self.residency.iter().find(|r| r.request_region == region)
    }
}

/// A region name: letters, digits, `-` and `_`. Regions are held
/// lowercase, so they compare without regard to case.
pub fn is_region(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

#[derive(Debug, Clone)]
pub struct Residency {
    pub request_region: String,
    pub backend_regions: Vec<String>,
}

/// Admin endpoints are on only when a token is configured.
#[derive(Debug, Clone, Default)]
pub struct Admin {
    pub token_sha256: Option<[u8; 32]>,
}

/// `/metrics` asks for this token when one is configured: per-key series
/// name keys and their spend.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccess {
    pub token_sha256: Option<[u8; 32]>,
    /// Keys with series of their own besides those that opt in: the ones
    /// that spent most this month, so that a config of 100,000 keys never
    /// means 100,000 series per family.
    pub top_keys: usize,
}

/// `[metrics] top_keys` when unset.
pub const DEFAULT_TOP_KEYS: usize = 100;
/// The most `top_keys` may be.
pub const MAX_TOP_KEYS: u32 = 10_000;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// The longest a client may take to send a request body (408 after).
    pub body_timeout: Duration,
    /// How long a kept-alive HTTP/1.1 connection may wait for its next
    /// request.
    pub keepalive_timeout: Duration,
    /// How long a response may wait for its client to take any of it
    /// before the connection is closed: a client that stops reading holds
    /// its upstream and its share of the backend's load no longer.
    pub send_timeout: Duration,
    /// A reload may drop every key or the admin token: said on purpose.
    pub allow_anonymous: bool,
    /// Browser origins allowed to call the API (`*`: any).
    pub cors_origins: Vec<String>,
}

impl ServerConfig {
    /// Whether a browser page at `origin` may call the API.
    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        self.cors_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.as_bytes() == origin)
    }
}

/// The upstream protocols tollgate speaks. Matched once, when a backend's
/// provider is built (`providers::build`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Vllm,
    Together,
    Groq,
    Openai,
    Tgi,
    Bedrock,
    Simulated,
}

impl BackendKind {
    pub const NAMES: &'static [&'static str] = &[
        "vllm",
        "together",
        "groq",
        "openai",
        "tgi",
        "bedrock",
        "simulated",
    ];

    /// The name the config writes it by.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "vllm" => Self::Vllm,
            "together" => Self::Together,
            "groq" => Self::Groq,
            "openai" => Self::Openai,
            "tgi" => Self::Tgi,
            "bedrock" => Self::Bedrock,
            "simulated" => Self::Simulated,
            _ => return None,
        })
    }

    /// Whether its streams can carry the usage so far in every chunk:
    /// vLLM's `stream_options.continuous_usage_stats`, which the
    /// simulated backend honours as vLLM does (OpenAI's API, and so the
    /// others, refuse the option).
    pub fn reports_running_usage(self) -> bool {
        matches!(self, Self::Vllm | Self::Simulated)
    }

    /// The base URL used when the config gives none; `None` where the
    /// server's address cannot be guessed. Bedrock's depends on the AWS
    /// region, so it is `None` here too (see `validate`).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::Together => Some("https://api.together.xyz/v1"),
            Self::Groq => Some("https://api.groq.com/openai/v1"),
            Self::Vllm | Self::Openai | Self::Tgi | Self::Bedrock | Self::Simulated => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    pub kind: BackendKind,
    /// `None` only for `simulated`.
    pub base_url: Option<Url>,
    pub region: Option<String>,
    /// The API key (`api_key_env`), sent as a bearer token.
    pub credential: Option<Secret>,
    /// Bedrock only: where and how requests are signed.
    pub aws: Option<AwsSettings>,
    pub timeouts: Timeouts,
    /// The most one upstream response body may hold, streamed or not.
    pub max_response_bytes: u64,
    /// The most one SSE event or event-stream frame may hold.
    pub max_event_bytes: u64,
    pub simulated: SimulatedSpec,
    /// GPUs the operator pays for by the hour; `None` for per-token APIs.
    pub self_hosted: Option<SelfHosted>,
    /// Concurrent requests the backend is sized for; load is measured
    /// against it.
    pub max_concurrency: Option<u32>,
    /// Where the inference engine's Prometheus metrics are scraped.
    pub engine_metrics: Option<EngineMetrics>,
    /// What the certificates of its `https://` URLs must chain to, and the
    /// certificate the gateway shows them.
    pub tls: ClientTls,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfHosted {
    pub gpu_hour_usd: f64,
    pub gpus: u32,
    /// Tokens (input and output) the pool processes per second flat out.
    pub throughput_tokens_per_second: f64,
}

impl SelfHosted {
    /// USD per million tokens when the pool runs at full throughput: the
    /// lowest its amortised cost can be.
    pub fn full_load_usd_per_mtok(&self) -> f64 {
        self.gpu_hour_usd * f64::from(self.gpus) * 1e6
            / (self.throughput_tokens_per_second * 3600.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetrics {
    pub url: Url,
    pub interval: Duration,
}

/// A Bedrock backend's AWS region, and its SigV4 credentials unless it
/// uses a Bedrock API key (`Backend::credential`) instead.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsSettings {
    pub region: String,
    pub keys: Option<AwsKeys>,
    /// Names from `BEDROCK_UNHONOURED` to ignore rather than refuse.
    pub drop_params: Vec<String>,
}

/// The OpenAI chat parameters that change the answer and that Converse
/// cannot honour: a request asking for one is a 400 from a Bedrock backend
/// unless the backend's `drop_params` names it. Config validation checks
/// `drop_params` against this list; the provider refuses by it.
pub const BEDROCK_UNHONOURED: &[&str] = &[
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "modalities",
    "n",
    "parallel_tool_calls",
    "presence_penalty",
    "reasoning_effort",
    "response_format",
    "seed",
    "service_tier",
    "top_logprobs",
    "verbosity",
    "web_search_options",
];

/// Static AWS credentials read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsKeys {
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// From sending the request to the first byte of the response body.
    pub first_byte: Duration,
    /// Longest silence allowed between two chunks of a stream.
    pub idle: Duration,
}

/// How the built-in `simulated` backend behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedSpec {
    pub ttft: Duration,
    pub tokens_per_second: f64,
    pub completion_tokens: u32,
    pub failure_rate: f64,
    /// Prompt blocks its prefix cache holds; 0: no cache.
    pub prefix_cache_blocks: u32,
    /// Share of requests whose first token takes `slow_ttft` instead: a
    /// slow tail, as a busy or unlucky replica has.
    pub slow_fraction: f64,
    pub slow_ttft: Duration,
}

impl Default for SimulatedSpec {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(150),
            tokens_per_second: 50.0,
            completion_tokens: 48,
            failure_rate: 0.0,
            prefix_cache_blocks: 0,
            slow_fraction: 0.0,
            slow_ttft: Duration::from_millis(2_000),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub alias: String,
    pub strategy: Strategy,
    pub affinity: Affinity,
    pub hedge: Option<Hedge>,
    pub deployments: Vec<Deployment>,
}

/// When a request that has had no first byte from its deployment also
/// goes to the next one in its plan, and what that may add to its cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedge {
    pub after: HedgeAfter,
    /// The most the second deployment may cost a request, in nano-dollars:
    /// its worst case, the prompt and the output limit at its prices.
    pub max_extra_nano_usd: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    /// A fixed wait.
    Fixed(Duration),
    /// This quantile of the first deployment's recent times to a first
    /// byte (to the whole answer, for a request that does not stream).
    Quantile(f64),
}

/// Whether an alias keeps the requests of one session, or one prompt
/// prefix, on one deployment, where an engine's prompt cache holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    None,
    Session,
    Prefix,
}

impl Affinity {
    pub const NAMES: &'static [&'static str] = &["none", "session", "prefix"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Self::None,
            "session" => Self::Session,
            "prefix" => Self::Prefix,
            _ => return None,
        })
    }
}

/// How an alias orders its deployments, after policy has filtered them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    Cost,
    Latency,
    Spillover(Spillover),
    Weighted,
}

impl Strategy {
    pub const NAMES: &'static [&'static str] = &["cost", "latency", "spillover", "weighted"];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Cost => "cost",
            Self::Latency => "latency",
            Self::Spillover(_) => "spillover",
            Self::Weighted => "weighted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spillover {
    /// A deployment stops taking new traffic at this load...
    pub high_load: f64,
    /// ...and takes it again once its load falls below this.
    pub low_load: f64,
    /// Overflow deployments dearer than this (USD per million output
    /// tokens) are not used.
    pub price_cap_usd_per_mtok: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    /// Stable name for live state and metrics; defaults to `alias/backend`.
    pub name: String,
    pub backend: String,
    pub upstream_model: String,
    pub price: Price,
    pub context_window: u32,
    pub modalities: Modalities,
    pub tools: bool,
    pub licence: Option<Licence>,
    pub multimodal: bool,
    /// `weighted` strategy: relative share of traffic.
    pub weight: u32,
    /// `spillover` strategy: lower tiers are filled first.
    pub tier: u32,
    /// The provider's quota for this model on this account.
    pub limits: PerMinute,
    /// The APIs it serves; routing sends it nothing else.
    pub endpoints: Endpoints,
}

/// The APIs a deployment serves (`endpoints`): chat completions and legacy
/// completions unless it says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub chat: bool,
    pub completions: bool,
    pub embeddings: bool,
}

impl Endpoints {
    pub const NAMES: &'static [&'static str] = &["chat", "completions", "embeddings"];
    /// The backend kinds with an OpenAI-compatible `/embeddings`.
    pub const EMBEDDING_KINDS: &'static [BackendKind] = &[
        BackendKind::Vllm,
        BackendKind::Together,
        BackendKind::Openai,
        BackendKind::Simulated,
    ];

    /// The names of those it serves, in `NAMES`' order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        let served = [self.chat, self.completions, self.embeddings];
        Self::NAMES
            .iter()
            .zip(served)
            .filter_map(|(name, served)| served.then_some(*name))
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            chat: true,
            completions: true,
            embeddings: false,
        }
    }
}

impl Deployment {
    pub fn is_llama(&self) -> bool {
        self.licence == Some(Licence::Llama)
    }
}

/// A deployment's licence family. A closed set, so that a misspelt Llama
/// licence is refused rather than silently escaping the Llama rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Licence {
    Llama,
    Gemma,
    Qwen,
    Mistral,
    Apache2,
    Mit,
    Proprietary,
    Other,
}

impl Licence {
    pub const NAMES: &'static [&'static str] = &[
        "llama",
        "gemma",
        "qwen",
        "mistral",
        "apache-2.0",
        "mit",
        "proprietary",
        "other",
    ];

    /// Matched without regard to case: `"Llama"` is `llama`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "llama" => Self::Llama,
            "gemma" => Self::Gemma,
            "qwen" => Self::Qwen,
            "mistral" => Self::Mistral,
            "apache-2.0" => Self::Apache2,
            "mit" => Self::Mit,
            "proprietary" => Self::Proprietary,
            "other" => Self::Other,
            _ => return None,
        })
    }
}

/// Prices are held as integer micro-dollars per million tokens, so a token
/// count times a price is an exact number of pico-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input_micro_usd_per_mtok: u64,
    /// Input tokens the upstream served from its prompt cache.
    pub cached_input_micro_usd_per_mtok: u64,
    /// Input tokens the upstream wrote to its prompt cache.
    pub cache_write_micro_usd_per_mtok: u64,
    pub output_micro_usd_per_mtok: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modalities {
    pub text: bool,
    pub image: bool,
    pub audio: bool,
    pub video: bool,
}

impl Modalities {
    /// Whether any input other than text is accepted: the Llama licence
    /// calls such a model multimodal.
    pub fn any_media(&self) -> bool {
        self.image || self.audio || self.video
    }
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub sha256: [u8; 32],
    pub models: AllowedModels,
    pub region: Option<String>,
    /// The key's callers may set their region with `x-tollgate-region`.
    pub region_header: bool,
    pub budget: Budget,
    pub limits: PerMinute,
    /// The key has series of its own in `/metrics` whatever it spends.
    pub metrics: bool,
}

/// Rate limits: requests and tokens per minute; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerMinute {
    pub requests: Option<NonZeroU32>,
    pub tokens: Option<NonZeroU32>,
}

/// Spending limits in nano-dollars per UTC day and calendar month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub daily_nano_usd: Option<u64>,
    pub monthly_nano_usd: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum AllowedModels {
    All,
    Only(Vec<String>),
}

impl AllowedModels {
    pub fn allows(&self, alias: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(aliases) => aliases.iter().any(|a| a == alias),
        }
    }
}

/// A credential read from the environment. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
