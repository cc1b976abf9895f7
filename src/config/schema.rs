//! The TOML schema, exactly as written in a config file. These types only
//! describe shape; `validate` turns them into a checked `Config`.
//!
//! Unknown keys are not rejected here with `deny_unknown_fields` (serde stops
//! at the first one); `load` collects every ignored key with `serde_ignored`
//! so `tollgate check` can report all of them at once.

use serde::Deserialize;

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
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
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
    #[serde(default)]
    pub timeouts: RawTimeouts,
    pub simulated: Option<RawSimulated>,
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
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawModel {
    pub alias: String,
    #[serde(default)]
    pub deployments: Vec<RawDeployment>,
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
    pub context_window: u32,
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub tools: bool,
    pub licence: Option<String>,
    #[serde(default)]
    pub multimodal: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawKey {
    pub name: String,
    pub sha256: Option<String>,
    pub key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    pub region: Option<String>,
}
