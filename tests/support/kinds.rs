//! The backend kinds a behaviour suite runs against, each backed by its
//! protocol's mock on 127.0.0.1: an OpenAI-compatible server (vLLM),
//! Bedrock and TGI.

use bytes::Bytes;
use serde_json::{Value, json};

use super::bedrock_mock;
use super::config::{Backend, Config, Deployment, Model};
use super::gateway::{Gateway, bedrock_mock_with_token, start, url};
use super::mock::{MockServer, MockUpstream, fixture};
use super::openai_mock::CANNED_PROMPT_TOKENS;

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

/// The reasoning every reasoning mock answers with, before its text.
pub const REASONING: [&str; 2] = ["Let me ", "think."];

impl Kind {
    /// A mock whose answers reason first (`REASONING`), then say
    /// `tok tok tok `, in this kind's own shapes: vLLM's
    /// `reasoning_content`, Bedrock's `reasoningContent` blocks. TGI has
    /// none.
    pub fn reasoning_mock(self) -> MockUpstream {
        let thought = REASONING.concat();
        match self {
            Self::OpenAi => {
                let chunk = |delta: Value, finish: Value| {
                    Bytes::from(format!(
                        "data: {}\n\n",
                        json!({"id": "chatcmpl-r", "object": "chat.completion.chunk",
                        "created": 1_700_000_000, "model": "mock-model",
                        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
                    ))
                };
                let mut events = vec![chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                )];
                events
                    .extend(REASONING.map(|r| chunk(json!({"reasoning_content": r}), Value::Null)));
                events.extend((0..3).map(|_| chunk(json!({"content": "tok "}), Value::Null)));
                events.push(chunk(json!({}), json!("stop")));
                events.push(Bytes::from(format!(
                    "data: {}\n\n",
                    json!({"id": "chatcmpl-r", "object": "chat.completion.chunk",
                    "created": 1_700_000_000, "model": "mock-model", "choices": [],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}})
                )));
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                MockUpstream::openai().events(events).json(json!({"id": "chatcmpl-r",
                    "object": "chat.completion", "created": 1_700_000_000, "model": "mock-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok tok tok ",
                        "reasoning_content": thought}, "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}}))
            }
            Self::Bedrock => {
                let delta = |index: u32, delta: Value| {
                    bedrock_mock::event(
                        "contentBlockDelta",
                        json!({"contentBlockIndex": index, "delta": delta}),
                    )
                };
                let mut frames = vec![bedrock_mock::event(
                    "messageStart",
                    json!({"role": "assistant"}),
                )];
                frames
                    .extend(REASONING.map(|r| delta(0, json!({"reasoningContent": {"text": r}}))));
                frames.push(delta(0, json!({"reasoningContent": {"signature": "c2ln"}})));
                frames.push(bedrock_mock::event(
                    "contentBlockStop",
                    json!({"contentBlockIndex": 0}),
                ));
                frames.extend((0..3).map(|_| delta(1, json!({"text": "tok "}))));
                frames.push(bedrock_mock::event(
                    "contentBlockStop",
                    json!({"contentBlockIndex": 1}),
                ));
                frames.push(bedrock_mock::event(
                    "messageStop",
                    json!({"stopReason": "end_turn"}),
                ));
                let usage = json!({"inputTokens": 11, "outputTokens": 9, "totalTokens": 20});
                frames.push(bedrock_mock::event(
                    "metadata",
                    json!({"usage": usage, "metrics": {"latencyMs": 42}}),
                ));
                bedrock_mock_with_token().events(frames).json(json!({"output": {"message": {"role": "assistant",
                    "content": [{"reasoningContent": {"reasoningText": {"text": thought, "signature": "c2ln"}}},
                        {"text": "tok tok tok "}]}},
                    "stopReason": "end_turn", "usage": usage, "metrics": {"latencyMs": 42}}))
            }
            Self::Tgi => unimplemented!("TGI's chat API has no reasoning to mock"),
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

/// An OpenAI-compatible kind whose details differ from vLLM's, with its
/// recorded stream and what that stream says, and its recorded whole
/// answer where there is one (else the mock's canned answer).
pub struct Recorded {
    pub kind: &'static str,
    pub fixture: &'static str,
    pub whole: Option<&'static str>,
    /// Where the kind's API lives below the mock's root.
    pub path: &'static str,
    pub text: &'static str,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Together ends with `eos` and usage on its last chunk (and takes no
/// `stream_options`), Groq carries usage in `x_groq`, OpenAI sends a
/// usage chunk and takes `max_completion_tokens`.
pub const RECORDED: [Recorded; 3] = [
    Recorded {
        kind: "together",
        fixture: "together_chat.sse",
        whole: Some("together_chat.json"),
        path: "",
        text: "Together says hi.",
        input_tokens: 25,
        output_tokens: 5,
    },
    Recorded {
        kind: "groq",
        fixture: "groq_chat.sse",
        whole: None,
        path: "/openai/v1",
        text: "Fast inference is fun.",
        input_tokens: 40,
        output_tokens: 6,
    },
    Recorded {
        kind: "openai",
        fixture: "openai_chat_usage.sse",
        whole: None,
        path: "/v1",
        text: "Hello! How can I help?",
        input_tokens: 19,
        output_tokens: 7,
    },
];

impl Recorded {
    /// A mock replaying the recording, and a gateway whose alias `chat`
    /// is served by it as this kind.
    pub async fn start(&self) -> (MockServer, Gateway) {
        let mut mock = MockUpstream::openai().stream(self.fixture);
        if let Some(whole) = self.whole {
            mock = mock.body(fixture(whole));
        }
        let upstream = mock.start().await;
        let base_url = format!("{}{}", upstream.base_url(), self.path);
        let config = Config::new()
            .backend(Backend::upstream("up", self.kind, &base_url))
            .model(Model::new("chat").deployment(Deployment::new("up", "m")));
        (upstream, start(&config).await)
    }

    /// A whole answer's text and its input and output tokens.
    pub fn whole_answer(&self) -> (&'static str, u64, u64) {
        match self.whole {
            Some(_) => (self.text, self.input_tokens, self.output_tokens),
            None => ("tok tok tok ", CANNED_PROMPT_TOKENS, COMPLETION_TOKENS),
        }
    }

    /// The field the kind takes the output limit in.
    pub fn limit_field(&self) -> &'static str {
        if self.kind == "openai" {
            "max_completion_tokens"
        } else {
            "max_tokens"
        }
    }
}
