//! The TOML schema, exactly as written in a config file. These types only
//! describe shape; `validate` turns them into a checked `Config`.
//!
//! Unknown keys are not rejected here with `deny_unknown_fields` (serde stops
//! at the first one); `load` collects every ignored key with `serde_ignored`
//! so `tollgate check` can report all of them at once.

use serde::{Deserialize, Serialize, Serializer};
use sha2::Digest;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub logging: RawLogging,
    #[serde(default)]
    pub tracing: RawTracing,
    #[serde(default)]
    pub licence: RawLicence,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLicence {
    pub user_header: Option<String>,
    pub attribution_header: Option<bool>,
    pub mau_threshold: Option<u64>,
    pub mau_alert_fraction: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLogging {
    pub format: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawTracing {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawState {
    pub backend: Option<String>,
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub prefix: Option<String>,
    pub timeout_ms: Option<u64>,
    pub on_unavailable: Option<String>,
    pub lease_ms: Option<u64>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLedger {
    pub backend: Option<String>,
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub data_dir: Option<String>,
    pub flush_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRouting {
    pub max_attempts: Option<u32>,
    pub circuit_failures: Option<u32>,
    pub circuit_cooldown_ms: Option<u64>,
    pub exploration: Option<f64>,
    pub default_output_tokens: Option<u32>,
    pub affinity_epsilon: Option<f64>,
    pub prefix_blocks: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawPolicy {
    pub eu_regions: Option<Vec<String>>,
    pub llama_eu_multimodal_block: Option<bool>,
    pub default_region: Option<String>,
    #[serde(default)]
    pub residency: Vec<RawResidency>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawResidency {
    pub request_region: String,
    pub backend_regions: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAdmin {
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawMetrics {
    pub token_env: Option<String>,
    pub top_keys: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub keepalive_timeout_ms: Option<u64>,
    pub send_timeout_ms: Option<u64>,
    #[serde(default)]
    pub allow_anonymous: bool,
    #[serde(default)]
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawBackend {
    pub name: String,
    pub kind: String,
    pub base_url: Option<String>,
    pub region: Option<String>,
    pub api_key_env: Option<String>,
    /// Bedrock only: the AWS region requests are signed for and sent to.
    pub aws_region: Option<String>,
    pub aws_access_key_id_env: Option<String>,
    pub aws_secret_access_key_env: Option<String>,
    pub aws_session_token_env: Option<String>,
    /// Bedrock only: OpenAI parameters Converse cannot honour that are
    /// ignored rather than refused.
    pub drop_params: Option<Vec<String>>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    pub max_response_bytes: Option<u64>,
    pub max_event_bytes: Option<u64>,
    pub simulated: Option<RawSimulated>,
    pub gpu_hour_usd: Option<f64>,
    pub gpus: Option<u32>,
    pub throughput_tokens_per_second: Option<f64>,
    pub max_concurrency: Option<u32>,
    pub engine_metrics: Option<RawEngineMetrics>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawEngineMetrics {
    pub enabled: Option<bool>,
    pub url: Option<String>,
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawTimeouts {
    pub connect_ms: Option<u64>,
    pub first_byte_ms: Option<u64>,
    pub idle_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSimulated {
    pub ttft_ms: Option<u64>,
    pub tokens_per_second: Option<f64>,
    pub completion_tokens: Option<u32>,
    pub failure_rate: Option<f64>,
    pub prefix_cache_blocks: Option<u32>,
    pub slow_fraction: Option<f64>,
    pub slow_ttft_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawModel {
    pub alias: String,
    pub strategy: Option<String>,
    pub affinity: Option<String>,
    pub spillover: Option<RawSpillover>,
    pub hedge: Option<RawHedge>,
    #[serde(default)]
    pub deployments: Vec<RawDeployment>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawHedge {
    pub after_ms: Option<u64>,
    pub after_quantile: Option<f64>,
    pub max_extra_usd_per_request: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSpillover {
    pub high_load: Option<f64>,
    pub low_load: Option<f64>,
    pub price_cap_usd_per_mtok: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawDeployment {
    pub name: Option<String>,
    pub backend: String,
    pub model: String,
    #[serde(default)]
    pub input_usd_per_mtok: f64,
    #[serde(default)]
    pub output_usd_per_mtok: f64,
    pub cached_input_usd_per_mtok: Option<f64>,
    pub cache_write_usd_per_mtok: Option<f64>,
    pub context_window: u32,
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub tools: bool,
    pub licence: Option<String>,
    #[serde(default)]
    pub multimodal: bool,
    pub weight: Option<u32>,
    pub tier: Option<u32>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub endpoints: Option<Vec<String>>,
}

/// A key's digest as `/admin/config` shows it: its fingerprint, the first
/// 4 bytes of the sha256 of the digest as a JSON string.
fn fingerprint<S: Serializer>(digest: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    let quoted = serde_json::to_string(digest).unwrap_or_default();
    let print = sha2::Sha256::digest(quoted.as_bytes());
    s.serialize_str(&format!("[redacted {}]", hex::encode(&print[..4])))
}

/// Serialised as written (skipping what was left out) for `GET
/// /admin/config`, with the digest replaced by a fingerprint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RawKey {
    pub name: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "fingerprint"
    )]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub region_header: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_daily_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_monthly_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics: bool,
}
