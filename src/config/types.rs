//! The validated configuration: every value checked, every reference
//! resolved, every secret read from the environment. Built only by
//! `validate`, so holding a `Config` means holding a usable one.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Url;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub backends: Vec<Backend>,
    pub models: Vec<Model>,
    pub keys: Vec<Key>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
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

#[derive(Debug, Clone)]
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
    pub simulated: SimulatedSpec,
}

/// A Bedrock backend's AWS region, and its SigV4 credentials unless it
/// uses a Bedrock API key (`Backend::credential`) instead.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub region: String,
    pub keys: Option<AwsKeys>,
}

/// Static AWS credentials read from the environment.
#[derive(Debug, Clone)]
pub struct AwsKeys {
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy)]
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
}

impl Default for SimulatedSpec {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(150),
            tokens_per_second: 50.0,
            completion_tokens: 48,
            failure_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub alias: String,
    pub deployments: Vec<Deployment>,
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
    pub licence: Option<String>,
    pub multimodal: bool,
}

/// Prices are held as integer micro-dollars per million tokens, so a token
/// count times a price is an exact number of pico-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input_micro_usd_per_mtok: u64,
    pub output_micro_usd_per_mtok: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modalities {
    pub text: bool,
    pub image: bool,
    pub audio: bool,
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub sha256: [u8; 32],
    pub models: AllowedModels,
    pub region: Option<String>,
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
#[derive(Clone)]
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
