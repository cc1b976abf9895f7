//! The backend kinds a behaviour suite runs against, each backed by its
//! protocol's mock on 127.0.0.1: an OpenAI-compatible server (vLLM),
//! Bedrock and TGI.

use serde_json::json;

use super::config::{Backend, Config, Deployment, Model};
use super::gateway::{Gateway, bedrock_mock_with_token, start, url};
use super::mock::{MockServer, MockUpstream};

/// Tokens in every mock's canned answer (`tok tok tok `).
pub const COMPLETION_TOKENS: u64 = 3;

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    OpenAi,
    Bedrock,
    Tgi,
}

impl Kind {
    /// A well-behaved mock of this kind.
    pub fn mock(self) -> MockUpstream {
        match self {
            Self::OpenAi => MockUpstream::openai(),
            Self::Bedrock => bedrock_mock_with_token(),
            Self::Tgi => MockUpstream::tgi(),
        }
    }

    pub fn backend(self, name: &str, mock: &MockServer) -> Backend {
        match self {
            Self::OpenAi => Backend::upstream(name, "vllm", &url(mock)),
            Self::Bedrock => Backend::bedrock(name, &mock.base_url()).sigv4_with_token(),
            Self::Tgi => Backend::upstream(name, "tgi", &mock.base_url()),
        }
    }

    pub fn upstream_model(self) -> &'static str {
        match self {
            Self::OpenAi | Self::Tgi => "meta-llama/Llama-3.3-70B-Instruct",
            Self::Bedrock => "us.meta.llama3-3-70b-instruct-v1:0",
        }
    }

    /// This kind's own way of saying "slow down".
    pub fn rate_limited(self, mock: MockUpstream) -> MockUpstream {
        match self {
            Self::OpenAi => mock.error(429, json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error", "param": null, "code": null}})),
            Self::Bedrock => mock
                .error(429, json!({"message": "Too many requests, please wait before trying again."}))
                .header("x-amzn-errortype", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            Self::Tgi => mock.error(429, json!({"error": "Model is overloaded", "error_type": "overloaded"})),
        }
    }

    /// This kind's own way of refusing a request as invalid, and the
    /// status a client then sees.
    pub fn rejecting(self, mock: MockUpstream) -> (MockUpstream, u16) {
        match self {
            Self::OpenAi => (
                mock.error(400, json!({"error": {"message": "bad input words", "type": "invalid_request_error", "param": null, "code": null}})),
                400,
            ),
            Self::Bedrock => (
                mock.error(400, json!({"message": "bad input words"}))
                    .header("x-amzn-errortype", "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"),
                400,
            ),
            Self::Tgi => (
                mock.error(422, json!({"error": "bad input words", "error_type": "validation"})),
                422,
            ),
        }
    }
}

/// A gateway with one alias, `chat`, served by `mock`.
pub async fn start_for(kind: Kind, mock: &MockServer) -> Gateway {
    // Tool calling is declared, as routing may require it for tools.
    let config = Config::new().backend(kind.backend("up", mock)).model(
        Model::new("chat")
            .deployment(Deployment::new("up", kind.upstream_model()).set("tools", true)),
    );
    start(&config).await
}

/// One test per kind for each behaviour: `behaviour::openai`,
/// `behaviour::bedrock`, `behaviour::tgi`; `Kind` must be in scope where
/// it is used.
#[allow(
    unused_macros,
    reason = "each test binary uses a different part of the support code"
)]
macro_rules! for_each_kind {
    ($($behaviour:ident),* $(,)?) => {$(
        mod $behaviour {
            use super::Kind;

            #[tokio::test]
            async fn openai() {
                super::$behaviour(Kind::OpenAi).await;
            }

            #[tokio::test]
            async fn bedrock() {
                super::$behaviour(Kind::Bedrock).await;
            }

            #[tokio::test]
            async fn tgi() {
                super::$behaviour(Kind::Tgi).await;
            }
        }
    )*};
}

#[allow(
    unused_imports,
    reason = "each test binary uses a different part of the support code"
)]
pub(crate) use for_each_kind;
