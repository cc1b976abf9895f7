//! The inbound APIs beside OpenAI chat and completions: Anthropic Messages
//! (`anthropic`) and OpenAI Responses (`responses`). Each translates its
//! request once into the canonical OpenAI chat request, and the canonical
//! answer (a whole chat completion, or its chunks) once back into its own
//! shape, whichever backend served it: N + M translations, never N × M.
//! The meter reads the canonical answer before it is translated.

mod anthropic;
mod canonical;
mod responses;

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

use crate::error::{ErrorShape, GatewayError};
use crate::openai::{Endpoint, InboundRequest, Usage};
use canonical::Translator;

/// Canonical chat parameters a translated request may carry, as Messages
/// names them.
const MESSAGES_PARAMS: &[(&str, &str)] = &[
    ("reasoning_effort", "thinking"),
    ("stop", "stop_sequences"),
    (
        "parallel_tool_calls",
        "tool_choice.disable_parallel_tool_use",
    ),
    ("user", "metadata.user_id"),
];

/// The same, as Responses names them.
const RESPONSES_PARAMS: &[(&str, &str)] = &[
    ("reasoning_effort", "reasoning.effort"),
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
];

/// The API a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Chat or legacy completions, served as the upstream answered.
    OpenAi(Endpoint),
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/responses`.
    Responses,
}

impl Api {
    pub fn error_shape(self) -> ErrorShape {
        match self {
            Self::Messages => ErrorShape::Anthropic,
            Self::OpenAi(_) | Self::Responses => ErrorShape::OpenAi,
        }
    }

    /// The API's name in the ledger, metrics and logs: the endpoint's name
    /// for OpenAI's chat, completions and embeddings.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi(endpoint) => endpoint.name(),
            Self::Messages => "messages",
            Self::Responses => "responses",
        }
    }

    /// `error`, raised once the request was canonical, naming parameters
    /// as this API does.
    pub fn name_params(self, mut error: GatewayError) -> GatewayError {
        let names = match self {
            Self::OpenAi(_) => return error,
            Self::Messages => MESSAGES_PARAMS,
            Self::Responses => RESPONSES_PARAMS,
        };
        if let Some((from, to)) = names.iter().find(|(c, _)| error.param_name() == Some(c)) {
            error.rename_param(from, to);
        }
        error
    }

    /// The canonical endpoint a request of this API is served as.
    pub fn endpoint(self) -> Endpoint {
        match self {
            Self::OpenAi(endpoint) => endpoint,
            Self::Messages | Self::Responses => Endpoint::Chat,
        }
    }

    /// Reads a client body as the canonical request, and how its answer
    /// goes back. A body that does not fit is a 400 naming the place.
    pub fn parse(self, body: Bytes) -> Result<(InboundRequest, Reply), GatewayError> {
        match self {
            Self::OpenAi(endpoint) => Ok((InboundRequest::parse(endpoint, body)?, Reply::OpenAi)),
            Self::Messages => {
                let (chat, stops) = anthropic::to_chat(&body)?;
                let mut request = InboundRequest::parse(Endpoint::Chat, chat.into())?;
                request.translated = true;
                Ok((request, Reply::Messages { stops }))
            }
            Self::Responses => {
                let (chat, echo) = responses::to_chat(&body)?;
                let mut request = InboundRequest::parse(Endpoint::Chat, chat.into())?;
                request.translated = true;
                Ok((request, Reply::Responses { echo }))
            }
        }
    }
}

/// How the canonical answer goes back to the client.
#[derive(Debug)]
pub enum Reply {
    /// As the upstream's OpenAI bytes.
    OpenAi,
    /// As a Messages `message` or event stream; `stops` are the request's
    /// stop sequences, to name the one that ended the answer.
    Messages { stops: Vec<String> },
    /// As a Responses `response` or event stream; `echo` holds the
    /// request's members the response object repeats.
    Responses { echo: Map<String, Value> },
}

impl Reply {
    pub fn error_shape(&self) -> ErrorShape {
        match self {
            Self::OpenAi | Self::Responses { .. } => ErrorShape::OpenAi,
            Self::Messages { .. } => ErrorShape::Anthropic,
        }
    }

    /// A whole canonical answer in the client's API.
    pub fn complete(&self, body: Bytes, backend: &str) -> Result<Bytes, GatewayError> {
        match self {
            Self::OpenAi => Ok(body),
            Self::Messages { stops } => anthropic::message(&body, backend, stops),
            Self::Responses { echo } => responses::response(&body, backend, echo),
        }
    }

    /// What re-encodes a canonical stream for the client; `None` when the
    /// chunks go out as they came. `input_estimate` gives the prompt's
    /// estimated tokens, for APIs that state usage before the upstream has.
    pub fn encoder(self, input_estimate: impl FnOnce() -> u64) -> Option<Box<Encoder>> {
        match self {
            Self::OpenAi => None,
            Self::Messages { stops } => Some(Box::new(Encoder::Messages(Translator::new(
                anthropic::MessagesSink::new(stops, input_estimate()),
            )))),
            Self::Responses { echo } => Some(Box::new(Encoder::Responses(Translator::new(
                responses::ResponsesSink::new(echo),
            )))),
        }
    }
}

/// A canonical stream being re-encoded in the client's API. An enum, so
/// each chunk costs one match, not a virtual call per event.
pub enum Encoder {
    Messages(Translator<anthropic::MessagesSink>),
    Responses(Translator<responses::ResponsesSink>),
}

impl Encoder {
    /// One canonical chunk, written to `out` as the API's events.
    pub fn chunk(&mut self, out: &mut BytesMut, chunk: &[u8]) {
        match self {
            Self::Messages(t) => t.chunk(out, chunk),
            Self::Responses(t) => t.chunk(out, chunk),
        }
    }

    /// The stream ended normally, having used `usage`.
    pub fn end(&mut self, out: &mut BytesMut, usage: Usage) {
        match self {
            Self::Messages(t) => t.end(out, usage),
            Self::Responses(t) => t.end(out, usage),
        }
    }

    /// The stream failed after it started, having used `usage`.
    pub fn fail(&mut self, out: &mut BytesMut, error: &GatewayError, usage: Usage) {
        match self {
            Self::Messages(t) => t.fail(out, error, usage),
            Self::Responses(t) => t.fail(out, error, usage),
        }
    }
}
