//! Client requests: chat completions and legacy completions. Only the
//! fields the gateway reads are typed; everything else is kept in `extra`
//! for the providers that translate it. OpenAI-compatible upstreams get the
//! client's own bytes back, with `model` and `stream_options` replaced.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use bytes::Bytes;
use serde::de::value::{BorrowedStrDeserializer, MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer as _, IntoDeserializer, MapAccess,
    SeqAccess, Visitor,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::text;
use super::usage::UsageBound;
use crate::error::{GatewayError, echo};

/// `POST /v1/chat/completions`; `model` and `stream_options` are read
/// apart (see [`InboundRequest`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// As the client wrote it: only a provider that translates the request
    /// reads its tools, and an agent's run to kilobytes.
    #[serde(default, deserialize_with = "tools")]
    pub tools: Option<Box<RawValue>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// Whether the request offers any tool.
    pub fn has_tools(&self) -> bool {
        let tools = self.tools.as_deref().map_or("", RawValue::get);
        tools
            .strip_prefix('[')
            .is_some_and(|rest| !rest.trim_start().starts_with(']'))
    }
}

/// `tools`, kept as written once it is known to be an array.
fn tools<'de, D: de::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Box<RawValue>>, D::Error> {
    let tools = Option::<Box<RawValue>>::deserialize(deserializer)?;
    if let Some(tools) = &tools
        && !tools.get().starts_with('[')
    {
        return Err(de::Error::custom(
            "must be an array of tools such as {\"type\":\"function\",\"function\":{\"name\":...}}",
        ));
    }
    Ok(tools)
}

#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    /// Every other member: tool calls, a tool call's id, a name.
    pub extra: Map<String, Value>,
}

/// Read member by member, each other member straight into `extra`: with
/// `#[serde(flatten)]`, serde would buffer each into a tree of its own
/// first, and read that tree into a value again, which doubles the cost
/// of an agent's tool calls.
impl<'de> Deserialize<'de> for ChatMessage {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = ChatMessage;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a message such as {"role":"user","content":"..."}"#)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<ChatMessage, A::Error> {
                let (mut role, mut content, mut extra) = (None, None, Map::new());
                while let Some(name) = members.next_key::<MemberName<'de>>()? {
                    let (twice, field) = match &*name.0 {
                        "role" => (role.replace(members.next_value()?).is_some(), "role"),
                        "content" => (content.replace(members.next_value()?).is_some(), "content"),
                        _ => {
                            let value = members.next_value()?;
                            extra.insert(name.0.into_owned(), value);
                            continue;
                        }
                    };
                    if twice {
                        return Err(de::Error::duplicate_field(field));
                    }
                }
                Ok(ChatMessage {
                    role: role.ok_or_else(|| de::Error::missing_field("role"))?,
                    content: content.flatten(),
                    extra,
                })
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A chat message's `content`.
pub type MessageContent = TextOrParts<ContentPart>;

/// A message's content as OpenAI's APIs send it: a string, or an array of
/// parts. Read by the type of the value rather than as an untagged enum,
/// which buffers the value and tries each variant in turn (a copy of every
/// message's text) and, when no variant fits, cannot say which part is wrong.
#[derive(Debug, Clone)]
pub enum TextOrParts<P> {
    Text(String),
    Parts(Vec<P>),
}

/// A part type, with what its array is called and an example of one, for
/// the error that names what the value may be.
pub trait PartExample {
    const PARTS: &'static str = "content parts";
    const EXAMPLE: &'static str;
}

impl PartExample for ContentPart {
    const EXAMPLE: &'static str = r#"{"type":"text","text":"..."}"#;
}

impl<'de, P: Deserialize<'de> + PartExample> Deserialize<'de> for TextOrParts<P> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Content<P>(PhantomData<P>);
        impl<'de, P: Deserialize<'de> + PartExample> Visitor<'de> for Content<P> {
            type Value = TextOrParts<P>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a string, or an array of {} such as {}",
                    P::PARTS,
                    P::EXAMPLE
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(TextOrParts::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(TextOrParts::Text(text))
            }

            fn visit_bytes<E: de::Error>(self, text: &[u8]) -> Result<Self::Value, E> {
                text::from_bytes(text).map(TextOrParts::Text)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, parts: A) -> Result<Self::Value, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(parts)).map(TextOrParts::Parts)
            }
        }
        // Read as `text::MessageText` is: serde_json gives a string asked
        // for as bytes, and an array as a sequence.
        deserializer.deserialize_bytes(Content(PhantomData))
    }
}

/// The member of a translated request's `tool` message that marks its
/// result as an error (a Messages `tool_result` with `is_error`). Chat has
/// no such member: Bedrock takes it as the result's status, and it is
/// removed before a request goes to an OpenAI-compatible upstream.
pub const TOOL_ERROR: &str = "is_error";

/// One part of an array content: `text`, `image_url`, `input_audio`, `file`…
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "text::optional")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ContentPart {
    /// An `image_url` part's URL, given as the object OpenAI's API takes
    /// (`{"url": …}`) or as a plain string; `""` when it names none.
    pub fn image_url(&self) -> Option<&str> {
        if self.kind != "image_url" {
            return None;
        }
        Some(match self.extra.get("image_url") {
            Some(Value::String(url)) => url,
            Some(Value::Object(image)) => image.get("url").and_then(Value::as_str).unwrap_or(""),
            _ => "",
        })
    }

    /// The media the part gives the model: by its `type`, and, for a part
    /// with a `uuid`, by its members too, as vLLM reads such a part by its
    /// `image_url`, `audio_url` or `video_url` member whatever its type.
    pub fn media(&self) -> impl Iterator<Item = Medium> + '_ {
        let by_member = self.extra.get("uuid").is_some_and(|uuid| !uuid.is_null());
        let members = self.extra.keys().filter(move |_| by_member);
        std::iter::once(&self.kind)
            .chain(members)
            .filter_map(|name| Medium::named(name))
    }
}

/// A kind of input other than text, as a deployment's `modalities` name
/// it. Declared from the cheapest to bound to the costliest, so a part a
/// model may read as two counts as the costlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Medium {
    Audio,
    Image,
    Video,
}

impl Medium {
    /// The medium of a part type or member: OpenAI's, and those vLLM's
    /// chat API takes besides.
    fn named(name: &str) -> Option<Self> {
        match name {
            "image_url" | "input_image" | "image_embeds" | "image_pil" | "image" => {
                Some(Self::Image)
            }
            "input_audio" | "audio_url" | "audio_embeds" | "audio" => Some(Self::Audio),
            "video_url" | "video_embeds" | "video" => Some(Self::Video),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// vLLM's option for the usage so far in every chunk.
const CONTINUOUS_USAGE: &str = "continuous_usage_stats";

impl StreamOptions {
    /// Whether the client asked for the usage so far in every chunk.
    pub fn continuous_usage(&self) -> bool {
        self.extra.get(CONTINUOUS_USAGE) == Some(&Value::Bool(true))
    }

    pub fn set_continuous_usage(&mut self) {
        self.extra
            .insert(CONTINUOUS_USAGE.into(), Value::Bool(true));
    }
}

/// `POST /v1/completions` (legacy); `model` and `stream_options` are read
/// apart, as for chat.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/embeddings`; `model` is read apart, as for chat. Never
/// streamed, and generates no tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub input: Prompt,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How the vectors are written: arrays of floats, or base64 of their
/// little-endian `f32` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// The most inputs one embeddings request may hold, as OpenAI's API allows.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

impl EmbeddingRequest {
    /// What serde cannot say: the input is not empty, nor too many.
    fn check(&self) -> Result<(), GatewayError> {
        let count = self.input.count();
        let empty = match &self.input {
            Prompt::Text(text) => text.is_empty(),
            Prompt::Texts(texts) => texts.iter().any(String::is_empty),
            Prompt::Tokens(ids) => ids.is_empty(),
            Prompt::TokenBatches(batches) => batches.iter().any(Vec::is_empty),
        };
        let problem = if count == 0 {
            "`input` is an empty array; send at least one string or token array".to_owned()
        } else if empty {
            "`input` holds an empty string or token array; every input needs text".to_owned()
        } else if count > MAX_EMBEDDING_INPUTS {
            format!("`input` holds {count} inputs; send at most {MAX_EMBEDDING_INPUTS} per request")
        } else if self.dimensions == Some(0) {
            return Err(GatewayError::bad_request(
                "`dimensions` must be at least 1",
                Some("dimensions".into()),
            ));
        } else {
            return Ok(());
        };
        Err(GatewayError::bad_request(problem, Some("input".into())))
    }
}

/// The most answers one request may ask for, as OpenAI's API allows `n`.
pub const MAX_GENERATIONS: u32 = 128;

/// [`InboundRequest::answers`] and [`InboundRequest::generations`],
/// checked: a count an upstream would refuse, or read otherwise than the
/// gateway reserved for, is a 400.
fn answers(typed: &TypedRequest) -> Result<(u32, u32), GatewayError> {
    let (extra, prompts) = match typed {
        TypedRequest::Chat(r) => (&r.extra, 1),
        TypedRequest::Completion(r) => (&r.extra, r.prompt.count()),
        TypedRequest::Embedding(_) => return Ok((1, 1)),
    };
    let count = |field: &str| match extra.get(field) {
        None | Some(Value::Null) => Ok(1),
        Some(value) => value
            .as_u64()
            .and_then(|count| u32::try_from(count).ok())
            .filter(|count| (1..=MAX_GENERATIONS).contains(count))
            .ok_or_else(|| out_of_range(field)),
    };
    let (n, best_of) = (count("n")?, count("best_of")?);
    // Each prompt of a batch is answered as a request of its own.
    let prompts = u32::try_from(prompts.max(1)).unwrap_or(u32::MAX);
    Ok((
        n.saturating_mul(prompts),
        n.max(best_of).saturating_mul(prompts),
    ))
}

/// A count of answers outside what OpenAI's API takes.
fn out_of_range(field: &str) -> GatewayError {
    GatewayError::bad_request(
        format!("`{field}` must be a whole number from 1 to {MAX_GENERATIONS}, or left out for 1"),
        Some(field.into()),
    )
}

/// A string, an array of strings, or token ids (one prompt or many).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, or an array of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

impl Prompt {
    /// How many prompts (inputs) it holds: each of a batch is answered
    /// (embedded) on its own.
    pub fn count(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(texts) => texts.len(),
            Prompt::TokenBatches(batches) => batches.len(),
        }
    }
}

/// Which endpoint a request came in on; decides the response object shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Endpoint {
    #[default]
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The name a deployment's `endpoints` lists it by.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The `object` of a stream chunk: legacy completions stream
    /// `text_completion` objects (embeddings never stream).
    pub fn chunk_object(self) -> &'static str {
        match self {
            Self::Chat => "chat.completion.chunk",
            Self::Completions | Self::Embeddings => "text_completion",
        }
    }

    /// The output limit of a request that sets none: 16 tokens for legacy
    /// completions, as OpenAI and vLLM define it; none for chat.
    pub fn default_max_tokens(self) -> Option<u32> {
        match self {
            Self::Chat => None,
            Self::Completions => Some(16),
            Self::Embeddings => Some(0),
        }
    }
}

/// A client request of either endpoint: the body as it came, and the
/// fields the gateway reads.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The client's JSON object. An OpenAI-compatible upstream gets these
    /// bytes with `model` and `stream_options` replaced where they stand:
    /// re-encoding the request escaped every message again, and copying it
    /// member by member scanned it again, each a tenth of a stream's CPU.
    body: Bytes,
    /// Where the client's `model` and `stream_options` values are in `body`.
    spans: Spans,
    model: String,
    stream_options: Option<StreamOptions>,
    pub typed: TypedRequest,
    /// The body is the gateway's translation of another API's request, not
    /// a client's own chat body: a provider may name its members as its
    /// upstream prefers, where a client's body goes as the client wrote it.
    pub translated: bool,
    /// How many answers come back (see [`Self::answers`]).
    answers: u32,
    /// How many answers the upstream generates (see [`Self::generations`]).
    generations: u32,
}

#[derive(Debug, Clone)]
struct Spans {
    model: Range<usize>,
    stream_options: Option<Range<usize>>,
}

#[derive(Debug, Clone)]
pub enum TypedRequest {
    Chat(ChatRequest),
    Completion(CompletionRequest),
    Embedding(EmbeddingRequest),
}

impl InboundRequest {
    /// Reads a client body sent to `endpoint`. A body that does not fit is
    /// a 400 whose message and `param` say where it went wrong.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, GatewayError> {
        let (typed, model, stream_options) = match endpoint {
            Endpoint::Chat => {
                let read = typed::<ChatRequest>(&body)?;
                (
                    TypedRequest::Chat(read.rest),
                    read.model,
                    read.stream_options,
                )
            }
            Endpoint::Completions => {
                let read = typed::<CompletionRequest>(&body)?;
                (
                    TypedRequest::Completion(read.rest),
                    read.model,
                    read.stream_options,
                )
            }
            Endpoint::Embeddings => {
                let read = typed::<EmbeddingRequest>(&body)?;
                read.rest.check()?;
                (
                    TypedRequest::Embedding(read.rest),
                    read.model,
                    read.stream_options,
                )
            }
        };
        if let TypedRequest::Chat(chat) = &typed {
            if chat.messages.is_empty() {
                return Err(GatewayError::bad_request(
                    "`messages` is empty; send at least one message",
                    Some("messages".into()),
                ));
            }
            // An answer of no tokens is refused upstream (vLLM, Bedrock,
            // Anthropic's and OpenAI's APIs), and would be reserved as
            // none. Legacy completions take 0 with `echo`, to score a
            // prompt.
            let limits = [
                ("max_tokens", chat.max_tokens),
                ("max_completion_tokens", chat.max_completion_tokens),
            ];
            if let Some((field, _)) = limits.iter().find(|(_, limit)| *limit == Some(0)) {
                return Err(GatewayError::bad_request(
                    format!("`{field}` must be at least 1, or left out"),
                    Some((*field).into()),
                ));
            }
            // Refused as OpenAI refuses it: upstreams read one or the
            // other (vLLM the newer, TGI and Together the older), so the
            // limit reserved could be the one an upstream ignores.
            if limits.iter().all(|(_, limit)| limit.is_some()) {
                return Err(GatewayError::bad_request(
                    "setting `max_tokens` and `max_completion_tokens` at the same time is not supported; send one of them",
                    Some("max_tokens".into()),
                ));
            }
        }
        let span = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
            start..start + raw.get().len()
        };
        let (answers, generations) = answers(&typed)?;
        let spans = Spans {
            model: span(model),
            stream_options: stream_options.map(span),
        };
        let model = member::<String>("model", model)?;
        let stream_options = stream_options
            .map(|raw| member::<Option<StreamOptions>>("stream_options", raw))
            .transpose()?
            .flatten();
        Ok(Self {
            spans,
            model,
            stream_options,
            typed,
            body,
            translated: false,
            answers,
            generations,
        })
    }

    pub fn endpoint(&self) -> Endpoint {
        match self.typed {
            TypedRequest::Chat(_) => Endpoint::Chat,
            TypedRequest::Completion(_) => Endpoint::Completions,
            TypedRequest::Embedding(_) => Endpoint::Embeddings,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The end user the client names in `user` (where the Anthropic
    /// Messages API's `metadata.user_id` and the Responses API's `user`
    /// land too); `None` when absent, empty or not a string.
    pub fn user(&self) -> Option<&str> {
        self.text_member("user")
    }

    /// A string member of the body the gateway does not read otherwise
    /// (`user`, `prompt_cache_key`); `None` when absent, empty or not a
    /// string.
    pub fn text_member(&self, name: &str) -> Option<&str> {
        let extra = match &self.typed {
            TypedRequest::Chat(r) => &r.extra,
            TypedRequest::Completion(r) => &r.extra,
            TypedRequest::Embedding(r) => &r.extra,
        };
        extra
            .get(name)
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    }

    pub fn stream(&self) -> bool {
        match &self.typed {
            TypedRequest::Chat(r) => r.stream,
            TypedRequest::Completion(r) => r.stream,
            TypedRequest::Embedding(_) => None,
        }
        .unwrap_or(false)
    }

    fn stream_options(&self) -> Option<&StreamOptions> {
        self.stream_options.as_ref()
    }

    /// Whether the client asked for the usage-only chunk at the end of a stream.
    pub fn include_usage(&self) -> bool {
        self.stream()
            && self
                .stream_options()
                .and_then(|o| o.include_usage)
                .unwrap_or(false)
    }

    /// Whether the client asked for the usage so far in every chunk.
    pub fn asks_running_usage(&self) -> bool {
        self.stream_options()
            .is_some_and(StreamOptions::continuous_usage)
    }

    /// The output limit the client set, if any.
    pub fn max_output_tokens(&self) -> Option<u32> {
        match &self.typed {
            TypedRequest::Chat(r) => r.max_completion_tokens.or(r.max_tokens),
            TypedRequest::Completion(r) => r.max_tokens,
            // Embeddings generate nothing.
            TypedRequest::Embedding(_) => Some(0),
        }
    }

    /// How many prompts the request holds: a legacy completions batch's or
    /// an embeddings batch's, each answered (embedded) on its own; else 1.
    pub fn prompts(&self) -> usize {
        match &self.typed {
            TypedRequest::Chat(_) => 1,
            TypedRequest::Completion(r) => r.prompt.count(),
            TypedRequest::Embedding(r) => r.input.count(),
        }
    }

    /// How many answers come back: `n` for each prompt of a legacy
    /// completions batch, each with its `index`.
    pub fn answers(&self) -> u32 {
        self.answers
    }

    /// How many answers the upstream generates for the request, each up to
    /// its output limit, and bills: `n`, or `best_of` (generated
    /// server-side, though only `n` come back; legacy completions', and
    /// vLLM's chat), for each prompt of a legacy completions batch; 1 when
    /// unset. A budget reserves output for each.
    pub fn generations(&self) -> u32 {
        self.generations
    }

    /// The most tokens each side of a usage report for the request can
    /// hold from a deployment with a context window of `context_window`.
    pub fn usage_bound(&self, context_window: u32) -> UsageBound {
        UsageBound::new(
            u64::from(context_window),
            self.prompts() as u64,
            u64::from(self.generations()),
        )
    }

    /// The most tokens the request's prompt, at most `most` tokens as the
    /// request tells, can be at a deployment with a context window of
    /// `context_window`: never more than a window for each prompt, as an
    /// upstream refuses a longer one. A video's prompt has no other bound.
    pub fn prompt_ceiling(&self, most: u64, context_window: u32) -> u64 {
        most.min(self.usage_bound(context_window).prompt)
    }

    /// The most output tokens the request may have of a deployment with a
    /// context window of `context_window`, after a prompt of `prompt`
    /// tokens: its `max_tokens`, else its endpoint's default limit (legacy
    /// completions stop at 16), within what the window leaves.
    pub fn output_ceiling(&self, context_window: u32, prompt: u64) -> u64 {
        let window = u64::from(context_window).saturating_sub(prompt);
        self.max_output_tokens()
            .or(self.endpoint().default_max_tokens())
            .map_or(window, |max| window.min(u64::from(max)))
    }

    /// The body to send to an OpenAI-compatible upstream: the client's
    /// bytes, with `model` replaced by `upstream_model`, `stream_options`
    /// set as the upstream call needs (`None` removes it), and an output
    /// limit the client did not set added (`max_tokens`: the field's name
    /// and the limit).
    pub fn to_upstream_json(
        &self,
        upstream_model: &str,
        stream_options: Option<&StreamOptions>,
        max_tokens: Option<(&str, u32)>,
    ) -> Vec<u8> {
        let body = &self.body[..];
        let model = serde_json::to_vec(upstream_model).expect("strings serialise");
        let options = stream_options.map(|o| serde_json::to_vec(o).expect("options serialise"));
        // Members the client did not send, written first in the object.
        let mut added = Vec::new();
        if let Some((field, limit)) = max_tokens {
            added.extend_from_slice(format!("\"{field}\":{limit},").as_bytes());
        }
        // Each edit puts text in place of a range of the body.
        let mut edits = Vec::with_capacity(3);
        edits.push((self.spans.model.clone(), &model[..]));
        match (&self.spans.stream_options, &options) {
            (Some(span), Some(options)) => edits.push((span.clone(), options)),
            (None, Some(options)) => {
                added.extend_from_slice(b"\"stream_options\":");
                added.extend_from_slice(options);
                added.push(b',');
            }
            // The client's own has to go: its member is left out of a copy
            // made member by member, which is rare enough to cost a scan.
            (Some(_), None) => return self.upstream_json_without_stream_options(&model, &added),
            (None, None) => {}
        }
        if !added.is_empty() {
            // After the brace that opens the object, never empty: it has `model`.
            let open = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
            edits.push((open..open, &added));
        }
        edits.sort_by_key(|(range, _)| range.start);
        let mut out = Vec::with_capacity(body.len() + model.len() + added.len() + 64);
        let mut at = 0;
        for (range, text) in edits {
            out.extend_from_slice(&body[at..range.start]);
            out.extend_from_slice(text);
            at = range.end;
        }
        out.extend_from_slice(&body[at..]);
        out
    }

    fn upstream_json_without_stream_options(&self, model: &[u8], added: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + model.len() + added.len() + 16);
        out.push(b'{');
        out.extend_from_slice(added);
        out.extend_from_slice(b"\"model\":");
        out.extend_from_slice(model);
        serde_json::Deserializer::from_slice(&self.body)
            .deserialize_map(CopyMembers { out: &mut out })
            .expect("the body was read as a JSON object");
        out.push(b'}');
        out
    }

    /// `stream_options` for an upstream stream call: the client's own
    /// options with `include_usage` forced on, so usage is always metered.
    pub fn upstream_stream_options(&self) -> StreamOptions {
        let mut options = self.stream_options().cloned().unwrap_or_default();
        options.include_usage = Some(true);
        options
    }
}

fn typed<'b, T: DeserializeOwned>(bytes: &'b [u8]) -> Result<Read<'b, T>, GatewayError> {
    read_json(bytes)
}

/// A client's JSON body as `R`. Parsed plainly first, as text checked to
/// be UTF-8 in one SIMD pass (read as bytes, each string is checked on its
/// own, which costs more than twice as much), and checked for raw control
/// characters in its strings in another, which its long text is not
/// ([`text`]); only a body that fails is parsed again, with the path
/// tracking that names where it went wrong (a 400 whose message and
/// `param` say where).
pub fn read_json<'b, R: Deserialize<'b>>(bytes: &'b [u8]) -> Result<R, GatewayError> {
    let controls_escaped = text::controls_escaped(bytes);
    if controls_escaped
        && let Ok(text) = simdutf8::basic::from_utf8(bytes)
        && let Ok(read) = serde_json::from_str(text)
    {
        return Ok(read);
    }
    // Read again, to say where it went wrong: a raw control character as
    // serde_json says it, which the text read as bytes would not.
    if !controls_escaped
        && let Err(e) = serde_json::from_slice::<de::IgnoredAny>(bytes)
        && (e.is_syntax() || e.is_eof())
    {
        return Err(not_json(&e));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let read = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return not_json(&inner);
        }
        let said = inner.to_string();
        if path == "." {
            // "missing field `input` at line 1 column 17": the field is the param.
            let missing = said
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            GatewayError::bad_request(format!("invalid request body: {}", echo(&said)), missing)
        } else {
            invalid_at(&path, &said)
        }
    })?;
    // The object read, something follows it: the only fault left.
    de.end().map_err(|e| {
        GatewayError::bad_request(
            format!("the request body has more after its JSON object ({e}); send one JSON object"),
            None,
        )
    })?;
    Ok(read)
}

fn not_json(error: &serde_json::Error) -> GatewayError {
    GatewayError::bad_request(
        format!(
            "the request body is not valid JSON: {}",
            echo(&error.to_string())
        ),
        None,
    )
}

/// serde's `error` quotes the value it refused, and the path may hold a
/// client's key: both are the client's, echoed as such.
fn invalid_at(path: &str, error: &str) -> GatewayError {
    GatewayError::bad_request(
        format!("invalid request body at `{}`: {}", echo(path), echo(error)),
        Some(path.to_owned()),
    )
}

/// A top-level member read apart from the rest.
fn member<T: DeserializeOwned>(name: &str, raw: &RawValue) -> Result<T, GatewayError> {
    serde_json::from_str(raw.get()).map_err(|e| {
        // The position is within the member's own text; the path says where.
        let text = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        invalid_at(name, text.strip_suffix(&position).unwrap_or(&text))
    })
}

/// A request object: `model` and `stream_options` as the client wrote
/// them, borrowed from the body so that their place in it is known, and
/// every other member read into `T`.
struct Read<'de, T> {
    rest: T,
    model: &'de RawValue,
    stream_options: Option<&'de RawValue>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Read<'de, T> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Object<T> {
            type Value = Read<'de, T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let mut members = SetAside {
                    map,
                    model: None,
                    stream_options: None,
                };
                let rest = T::deserialize(MapAccessDeserializer::new(&mut members))?;
                Ok(Read {
                    rest,
                    model: members
                        .model
                        .ok_or_else(|| de::Error::missing_field("model"))?,
                    stream_options: members.stream_options,
                })
            }
        }
        deserializer.deserialize_map(Object(PhantomData))
    }
}

/// The members of an object but `model` and `stream_options`, which it
/// keeps as raw text.
struct SetAside<'de, A> {
    map: A,
    model: Option<&'de RawValue>,
    stream_options: Option<&'de RawValue>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SetAside<'de, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(name) = self.map.next_key::<MemberName<'de>>()? {
            let (slot, field) = match &*name.0 {
                "model" => (&mut self.model, "model"),
                "stream_options" => (&mut self.stream_options, "stream_options"),
                // Borrowed, the name is not copied into a `String`.
                _ => {
                    return match name.0 {
                        Cow::Borrowed(name) => seed.deserialize(BorrowedStrDeserializer::new(name)),
                        Cow::Owned(name) => seed.deserialize(name.into_deserializer()),
                    }
                    .map(Some);
                }
            };
            if slot.replace(self.map.next_value()?).is_some() {
                return Err(de::Error::duplicate_field(field));
            }
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("strings and options serialise");
}

/// Appends each member of the object it visits to `out`, each after a
/// comma, as written: all but `model` and `stream_options`.
struct CopyMembers<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> Visitor<'de> for CopyMembers<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        while let Some(name) = members.next_key::<MemberName<'de>>()? {
            let value = members.next_value::<&'de RawValue>()?;
            if matches!(&*name.0, "model" | "stream_options") {
                continue;
            }
            self.out.push(b',');
            write_json(self.out, &*name.0);
            self.out.push(b':');
            self.out.extend_from_slice(value.get().as_bytes());
        }
        Ok(())
    }
}

/// A member's name, borrowed unless it had escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(name)))
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(Name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_body_keeps_unknown_fields_and_rewrites_model() {
        let body = r#"{"model":"alias","messages":[{"role":"user","content":"hi","name":"bob"}],
            "stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false},
            "top_k":5,"temperature":null,"tools":[{"type":"function","function":{"name":"f"}}]}"#;
        let req =
            InboundRequest::parse(Endpoint::Chat, Bytes::from_static(body.as_bytes())).unwrap();
        let out: Value = serde_json::from_slice(&req.to_upstream_json(
            "meta/llama",
            Some(&req.upstream_stream_options()),
            None,
        ))
        .unwrap();
        assert_eq!(out["model"], "meta/llama");
        assert_eq!(out["top_k"], 5);
        assert_eq!(out["temperature"], Value::Null);
        assert_eq!(out["messages"][0]["name"], "bob");
        assert_eq!(out["tools"][0]["function"]["name"], "f");
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["stream_options"]["include_obfuscation"], false);
        assert!(!req.include_usage());
    }

    fn chat(body: &'static str) -> Result<InboundRequest, GatewayError> {
        InboundRequest::parse(Endpoint::Chat, Bytes::from_static(body.as_bytes()))
    }

    fn upstream(request: &InboundRequest, options: Option<&StreamOptions>) -> String {
        String::from_utf8(request.to_upstream_json("meta/llama", options, None)).unwrap()
    }

    #[test]
    fn upstream_body_is_the_clients_own_text_with_model_and_stream_options_replaced() {
        let req = chat(concat!(
            "{ \"messages\" : [ {\"role\":\"user\", \"content\":\"caf\\u00e9 \\\"q\\\"\"} ],\n",
            "  \"mod\\u0065l\": \"alias\", \"stream\": true,\n",
            "  \"stream_options\": {\"include_usage\": false}, \"top_k\" : 5 }",
        ))
        .unwrap();
        assert_eq!(req.model(), "alias");
        assert_eq!(
            upstream(&req, Some(&req.upstream_stream_options())),
            concat!(
                "{ \"messages\" : [ {\"role\":\"user\", \"content\":\"caf\\u00e9 \\\"q\\\"\"} ],\n",
                "  \"mod\\u0065l\": \"meta/llama\", \"stream\": true,\n",
                "  \"stream_options\": {\"include_usage\":true}, \"top_k\" : 5 }",
            )
        );
    }

    #[test]
    fn stream_options_are_added_first_when_the_client_sent_none_or_null() {
        let options = StreamOptions {
            include_usage: Some(true),
            extra: Map::new(),
        };
        let none = chat(r#" {"messages":[{"role":"user","content":"hi"}],"model":"a"}"#).unwrap();
        assert_eq!(
            upstream(&none, Some(&options)),
            r#" {"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}],"model":"meta/llama"}"#
        );
        let null = chat(
            r#"{"model":"a","stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(
            upstream(&null, Some(&options)),
            r#"{"model":"meta/llama","stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#
        );
        assert_eq!(
            upstream(&null, None),
            r#"{"model":"meta/llama","messages":[{"role":"user","content":"hi"}]}"#
        );
    }

    #[test]
    fn an_output_limit_the_gateway_sets_is_added_first() {
        let limit = Some(("max_tokens", 512));
        let plain = chat(r#"{"messages":[{"role":"user","content":"hi"}],"model":"a"}"#).unwrap();
        assert_eq!(
            String::from_utf8(plain.to_upstream_json("m", None, limit)).unwrap(),
            r#"{"max_tokens":512,"messages":[{"role":"user","content":"hi"}],"model":"m"}"#
        );
        let options = StreamOptions {
            include_usage: Some(true),
            extra: Map::new(),
        };
        let with_options = String::from_utf8(plain.to_upstream_json("m", Some(&options), limit));
        let parsed: Value = serde_json::from_str(&with_options.unwrap()).unwrap();
        assert_eq!(parsed["max_tokens"], 512);
        assert_eq!(parsed["stream_options"]["include_usage"], true);
        let dropped = chat(
            r#"{"model":"a","stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(dropped.to_upstream_json(
                "m",
                None,
                Some(("max_completion_tokens", 7))
            ))
            .unwrap(),
            r#"{"max_completion_tokens":7,"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        );
    }

    #[test]
    fn model_is_required_once_and_must_be_a_string() {
        let error = |body| chat(body).expect_err(body).message().to_owned();
        let messages = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert!(
            error(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
                .contains("missing field `model`")
        );
        let twice = format!(r#"{{"model":"a",{messages},"model":"b"}}"#).leak();
        assert!(error(twice).contains("duplicate field `model`"));
        let number = format!(r#"{{"model":5,{messages}}}"#).leak();
        let wrong = chat(number).err().unwrap();
        assert_eq!(
            wrong.message(),
            "invalid request body at `model`: invalid type: integer `5`, expected a string"
        );
        assert_eq!(wrong.param_name(), Some("model"));
        let options =
            format!(r#"{{"model":"a","stream_options":{{"include_usage":"yes"}},{messages}}}"#)
                .leak();
        assert!(error(options).contains("at `stream_options`"));
    }

    #[test]
    fn messages_keep_what_the_gateway_does_not_read() {
        let body = r#"{"model":"a","stream":null,"temperature":0.5,"messages":[
            {"role":"user","content":"hi","na\u006de":"bob"},
            {"role":"user","content":[{"type":"text","text":"look"},
                {"type":"image_url","image_url":{"url":"https://x/y.png"}}]},
            {"role":"assistant","content":null,"tool_calls":[]}]}"#;
        let TypedRequest::Chat(chat) = chat(body).unwrap().typed else {
            panic!("a chat request")
        };
        assert_eq!(chat.stream, None);
        assert_eq!(chat.extra["temperature"], 0.5);
        let [first, second, third] = &chat.messages[..] else {
            panic!("three messages")
        };
        assert!(matches!(&first.content, Some(MessageContent::Text(t)) if t == "hi"));
        assert_eq!(first.extra["name"], "bob");
        let Some(MessageContent::Parts(parts)) = &second.content else {
            panic!("content parts")
        };
        assert_eq!(parts[0].text.as_deref(), Some("look"));
        assert_eq!(parts[1].kind, "image_url");
        assert_eq!(parts[1].extra["image_url"]["url"], "https://x/y.png");
        assert!(third.content.is_none());
        assert_eq!(third.extra["tool_calls"], serde_json::json!([]));
    }

    #[test]
    fn a_part_brings_the_media_its_type_names_or_with_a_uuid_its_members() {
        let media = |part: &str| {
            let part: ContentPart = serde_json::from_str(part).unwrap();
            part.media().collect::<Vec<_>>()
        };
        let none: [Medium; 0] = [];
        assert_eq!(media(r#"{"type":"text","text":"hi"}"#), none);
        assert_eq!(media(r#"{"type":"file","file":{}}"#), none);
        for (part, medium) in [
            (
                r#"{"type":"image_url","image_url":{"url":"x"}}"#,
                Medium::Image,
            ),
            (r#"{"type":"input_image","image_url":"x"}"#, Medium::Image),
            (
                r#"{"type":"image_embeds","image_embeds":"x"}"#,
                Medium::Image,
            ),
            (r#"{"type":"input_audio","input_audio":{}}"#, Medium::Audio),
            (
                r#"{"type":"audio_url","audio_url":{"url":"x"}}"#,
                Medium::Audio,
            ),
            (
                r#"{"type":"audio_embeds","audio_embeds":"x"}"#,
                Medium::Audio,
            ),
            (
                r#"{"type":"video_url","video_url":{"url":"x"}}"#,
                Medium::Video,
            ),
            (
                r#"{"type":"video_embeds","video_embeds":"x"}"#,
                Medium::Video,
            ),
        ] {
            assert_eq!(media(part), [medium], "{part}");
        }
        // vLLM reads a part with a `uuid` by its members, not its type.
        let keyed = r#"{"type":"text","text":"","uuid":"u","video_url":"x"}"#;
        assert_eq!(media(keyed), [Medium::Video]);
        let unkeyed = r#"{"type":"text","text":"","uuid":null,"video_url":"x"}"#;
        assert_eq!(media(unkeyed), none);
    }

    #[test]
    fn anything_after_the_json_object_is_refused() {
        let one = r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#;
        assert!(chat(one.to_owned().leak()).is_ok());
        for body in [
            format!("{one}xyz"),
            format!("{one}{one}"),
            format!("{one} 1"),
        ] {
            let error = chat(body.clone().leak()).expect_err(&body);
            assert_eq!(error.status(), 400, "{body}");
            assert!(
                error.message().contains("more after its JSON object"),
                "{body}: {}",
                error.message()
            );
        }
        assert!(
            chat(format!("{one} \n").leak()).is_ok(),
            "white space may follow"
        );
    }

    #[test]
    fn a_malformed_message_is_named_by_its_path() {
        let wrong = |messages: &str| {
            let body = format!(r#"{{"model":"a","messages":{messages}}}"#).leak();
            let error = chat(body).expect_err(body);
            (
                error.message().to_owned(),
                error.param_name().unwrap_or_default().to_owned(),
            )
        };
        let (message, param) = wrong(r#"[{"role":"user","content":5}]"#);
        assert_eq!(param, "messages[0].content");
        assert!(
            message.contains("a string, or an array of content parts"),
            "{message}"
        );
        let (message, param) = wrong(r#"[{"content":"hi"}]"#);
        assert_eq!(param, "messages[0]");
        assert!(message.contains("missing field `role`"), "{message}");
        let (message, param) = wrong(r#"[{"role":"user","content":"a","x":1,"content":"b"}]"#);
        assert_eq!(param, "messages[0]");
        assert!(message.contains("duplicate field `content`"), "{message}");
        let (message, param) = wrong(r#"["hi"]"#);
        assert_eq!(param, "messages[0]");
        assert!(
            message.contains(r#"expected a message such as {"role":"user""#),
            "{message}"
        );
        let (message, param) = wrong(r#"[{"role":"user","content":[{"text":"x"}]}]"#);
        assert_eq!(param, "messages[0].content[0]");
        assert!(message.contains("missing field `type`"), "{message}");
        let (message, param) = wrong(r#"[{"role":"user","content":{"type":"text"}}]"#);
        assert_eq!(param, "messages[0].content");
        assert!(
            message.contains(r#"content parts such as {"type":"text","text":"..."}"#),
            "{message}"
        );
        let error = chat(r#"{"model":"a"}"#).unwrap_err();
        assert!(error.message().contains("missing field `messages`"));
    }

    #[test]
    fn generations_are_n_or_best_of_and_out_of_range_counts_are_refused() {
        let parse = |endpoint, members: &str| {
            let body = match endpoint {
                Endpoint::Chat => format!(
                    r#"{{"model":"a","messages":[{{"role":"user","content":"x"}}]{members}}}"#
                ),
                _ => format!(r#"{{"model":"a","prompt":"x"{members}}}"#),
            };
            InboundRequest::parse(endpoint, Bytes::from(body))
        };
        let generations = |endpoint, members| parse(endpoint, members).unwrap().generations();
        assert_eq!(generations(Endpoint::Chat, ""), 1);
        assert_eq!(generations(Endpoint::Chat, r#","n":null"#), 1);
        assert_eq!(generations(Endpoint::Chat, r#","n":4"#), 4);
        assert_eq!(generations(Endpoint::Chat, r#","n":128"#), 128);
        // OpenAI's chat has no `best_of`, but vLLM's takes it: reserved
        // for, whoever may refuse it.
        assert_eq!(generations(Endpoint::Chat, r#","best_of":9"#), 9);
        assert_eq!(generations(Endpoint::Completions, r#","n":2"#), 2);
        // Generated and billed server-side, though only `n` come back.
        let best_of = parse(Endpoint::Completions, r#","n":2,"best_of":5"#).unwrap();
        assert_eq!((best_of.answers(), best_of.generations()), (2, 5));
        // Each prompt of a batch, and each batch of token ids, is answered
        // on its own.
        // (answers, generations).
        let batch = |prompt: &str, members: &str| {
            let body = format!(r#"{{"model":"a","prompt":{prompt}{members}}}"#);
            let request = InboundRequest::parse(Endpoint::Completions, Bytes::from(body)).unwrap();
            (request.answers(), request.generations())
        };
        assert_eq!(batch(r#"["a","b","c"]"#, ""), (3, 3));
        assert_eq!(batch(r#"["a","b","c"]"#, r#","n":2"#), (6, 6));
        assert_eq!(batch("[[1,2],[3]]", r#","best_of":4"#), (2, 8));
        assert_eq!(batch("[1,2,3]", ""), (1, 1));
        for (endpoint, members, param) in [
            (Endpoint::Chat, r#","n":0"#, "n"),
            (Endpoint::Chat, r#","n":129"#, "n"),
            (Endpoint::Chat, r#","n":-1"#, "n"),
            (Endpoint::Chat, r#","n":2.5"#, "n"),
            (Endpoint::Chat, r#","n":"2""#, "n"),
            (Endpoint::Chat, r#","n":4294967297"#, "n"),
            (Endpoint::Completions, r#","best_of":1e9"#, "best_of"),
        ] {
            let error = parse(endpoint, members).unwrap_err();
            assert_eq!(error.status(), 400, "{members}");
            assert_eq!(error.param_name(), Some(param), "{members}");
            assert!(
                error.message().contains("from 1 to 128"),
                "{members}: {}",
                error.message()
            );
        }
    }

    #[test]
    fn message_text_is_read_as_json_says_whatever_its_escapes_and_control_characters() {
        let text = |content: &str| {
            let body =
                format!(r#"{{"model":"a","messages":[{{"role":"user","content":{content}}}]}}"#);
            let TypedRequest::Chat(chat) = chat(body.leak())?.typed else {
                panic!("a chat request")
            };
            Ok::<_, GatewayError>(match &chat.messages[0].content {
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => parts[0].text.clone().unwrap_or_default(),
                None => panic!("content"),
            })
        };
        assert_eq!(text(r#""a\nb \u00e9\t\"q\"""#).unwrap(), "a\nb é\t\"q\"");
        assert_eq!(
            text(r#"[{"type":"text","text":"x\\y\ud83d\ude00"}]"#).unwrap(),
            "x\\y😀"
        );
        // Pretty-printed, with newlines and tabs between members.
        let pretty = "{\n\t\"model\": \"a\",\n\t\"messages\": [{\"role\": \"user\", \"content\": \"hi\\n\"}]\n}";
        assert!(chat(pretty).is_ok());
        // A raw control character in any string is not JSON, whatever reads it.
        for content in [
            "\"a\nb\"",
            "[{\"type\":\"text\",\"text\":\"\t\"}]",
            "\"\\\\\u{1}\"",
        ] {
            let error = text(content).expect_err(content);
            assert_eq!(error.status(), 400);
            assert!(
                error
                    .message()
                    .starts_with("the request body is not valid JSON: control character"),
                "{content:?}: {}",
                error.message()
            );
        }
        let error = text(r#""half \udc00 of a pair""#).unwrap_err();
        assert_eq!(error.param_name(), Some("messages[0].content"));
        assert!(
            error.message().contains("without its pair"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn tools_are_kept_as_written_and_must_be_an_array() {
        let with_tools = |tools: &str| {
            let body = format!(
                r#"{{"model":"a","messages":[{{"role":"user","content":"hi"}}],"tools":{tools}}}"#
            );
            chat(body.leak()).map(|request| match request.typed {
                TypedRequest::Chat(chat) => {
                    (chat.has_tools(), chat.tools.map(|t| t.get().to_owned()))
                }
                _ => panic!("a chat request"),
            })
        };
        let tool = r#"{"type":"function","function":{"name":"f"}}"#;
        assert_eq!(
            with_tools(&format!("[ {tool} ]")).unwrap(),
            (true, Some(format!("[ {tool} ]")))
        );
        for none in ["[]", "[ \n ]", "null"] {
            assert!(!with_tools(none).unwrap().0, "{none}");
        }
        for wrong in [tool, "\"f\"", "5"] {
            let error = with_tools(wrong).unwrap_err();
            assert_eq!(error.param_name(), Some("tools"), "{wrong}");
            assert!(
                error.message().contains("must be an array of tools"),
                "{}",
                error.message()
            );
        }
    }

    #[test]
    fn non_stream_upstream_body_drops_stream_options() {
        let body = r#"{"model":"a","prompt":["x","y"],"stream_options":{"include_usage":true}}"#;
        let req = InboundRequest::parse(Endpoint::Completions, Bytes::from_static(body.as_bytes()))
            .unwrap();
        assert_eq!(
            upstream(&req, None),
            r#"{"model":"meta/llama","prompt":["x","y"]}"#
        );
    }
}
