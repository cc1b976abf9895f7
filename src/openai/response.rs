//! Response objects: completions, stream chunks, usage, the model list.
//! Upstream responses are forwarded as the bytes received; these types are
//! for the objects the gateway writes itself and for reading usage.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::usage::{ReportedUsage, Usage, UsageFault};
use super::{EncodingFormat, Endpoint};

/// An assistant's whole message, as a simple provider writes it.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
    pub refusal: Option<()>,
    /// The model's reasoning, as vLLM names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
}

/// A stream chunk's delta, as a simple provider writes it.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
}

/// Every response object and chunk the gateway writes itself has this
/// envelope; `choices` is empty on the usage-only chunk.
#[derive(Serialize)]
struct Object<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct MessageChoice<'a, M> {
    index: u32,
    message: &'a M,
    logprobs: Option<()>,
    finish_reason: &'a str,
    /// The stop sequence that ended the answer, where vLLM puts it.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct DeltaChoice<'a, D> {
    index: u32,
    delta: &'a D,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelEntry<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelEntry<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// What the alias serves (`chat`, `completions`, `embeddings`): not in
    /// OpenAI's schema, which SDKs keep as an extra field.
    pub endpoints: Vec<&'static str>,
}

/// A string of a response, borrowed from its body unless it had escapes.
/// serde's `borrow` reaches a bare `Cow` field but not one inside an
/// `Option`, which it copies into a `String` of its own.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// What the meter reads from any response object or stream chunk, chat
/// or legacy, whichever upstream sent it. Borrowed, so reading one copies
/// nothing but the usage numbers; its other members are skipped.
#[derive(Debug, Default, Deserialize)]
pub struct ResponseView<'a> {
    #[serde(borrow, default)]
    pub object: Option<Text<'a>>,
    #[serde(default)]
    pub choices: Option<Choices>,
    #[serde(default)]
    pub usage: Option<ReportedUsage>,
    /// Groq reports stream usage here, on the final chunk.
    #[serde(default)]
    pub x_groq: Option<XGroq>,
    /// An error object sent in place of a chunk.
    #[serde(default)]
    pub error: Option<Value>,
}

/// A stream's `id`, `created` and `model` as read from its first chunk,
/// the rest of which is skipped over rather than read.
#[derive(Debug, Default, Deserialize)]
pub struct IdentityView<'a> {
    #[serde(borrow, default)]
    id: Option<Text<'a>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    model: Option<Text<'a>>,
}

impl IdentityView<'_> {
    pub fn identity(&self) -> ResponseIdentity {
        ResponseIdentity::read(&self.id, self.created, &self.model)
    }
}

/// `id`, `created` and `model` of one response, the same on every chunk
/// of a stream: made up by a translating provider, or read from an
/// upstream's first chunk for the usage chunk the gateway may write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseIdentity {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseIdentity {
    /// The identity an upstream's stream chunk names: empty where it names
    /// none, or is not JSON.
    pub fn of_chunk(chunk: &[u8]) -> Self {
        serde_json::from_slice::<IdentityView<'_>>(chunk)
            .map(|view| view.identity())
            .unwrap_or_default()
    }

    /// A fresh identity, `id` such as `chatcmpl-…` or `cmpl-…`.
    pub fn new(prefix: &str, model: &str) -> Self {
        Self {
            id: format!("{prefix}-{}", crate::id::random()),
            created: unix_now(),
            model: model.to_owned(),
        }
    }

    fn read(id: &Option<Text<'_>>, created: Option<u64>, model: &Option<Text<'_>>) -> Self {
        Self {
            id: id.as_deref().unwrap_or_default().to_owned(),
            created: created.unwrap_or_default(),
            model: model.as_deref().unwrap_or_default().to_owned(),
        }
    }

    fn write<C: Serialize>(
        &self,
        object: &'static str,
        choices: C,
        usage: Option<Usage>,
    ) -> Vec<u8> {
        serde_json::to_vec(&Object {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
        .expect("response objects serialise")
    }

    /// A whole `chat.completion` with one choice; `stop_sequence`: the
    /// one that ended it, when known.
    pub fn chat_completion(
        &self,
        message: &impl Serialize,
        finish_reason: &str,
        stop_sequence: Option<&str>,
        usage: Usage,
    ) -> Vec<u8> {
        let choice = MessageChoice {
            index: 0,
            message,
            logprobs: None,
            finish_reason,
            stop_reason: stop_sequence,
        };
        self.write("chat.completion", [choice], Some(usage))
    }

    /// A `chat.completion.chunk` with one choice.
    pub fn chat_chunk(&self, delta: &impl Serialize, finish_reason: Option<&str>) -> Vec<u8> {
        self.chat_chunk_stopped(delta, finish_reason, None)
    }

    /// A `chat.completion.chunk` that ends the answer, naming the stop
    /// sequence that ended it when known.
    pub fn chat_chunk_stopped(
        &self,
        delta: &impl Serialize,
        finish_reason: Option<&str>,
        stop_sequence: Option<&str>,
    ) -> Vec<u8> {
        let choice = DeltaChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
            stop_reason: stop_sequence,
        };
        self.write(Endpoint::Chat.chunk_object(), [choice], None)
    }

    /// A `text_completion` with one choice: the same shape whole or as a
    /// stream chunk.
    pub fn text_completion(
        &self,
        text: &str,
        finish_reason: Option<&str>,
        usage: Option<Usage>,
    ) -> Vec<u8> {
        let choice = TextChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason,
        };
        self.write(Endpoint::Completions.chunk_object(), [choice], usage)
    }

    /// The chunk that ends answer `index` of a stream cut at its length
    /// limit: nothing more of it, and `finish_reason: "length"`.
    pub fn length_chunk(&self, endpoint: Endpoint, index: u32) -> Vec<u8> {
        let finish_reason = Some("length");
        let object = endpoint.chunk_object();
        if endpoint == Endpoint::Chat {
            let delta = Delta::default();
            let choice = DeltaChoice {
                index,
                delta: &delta,
                logprobs: None,
                finish_reason,
                stop_reason: None,
            };
            return self.write(object, [choice], None);
        }
        let choice = TextChoice {
            index,
            text: "",
            logprobs: None,
            finish_reason,
        };
        self.write(object, [choice], None)
    }

    /// The usage-only chunk OpenAI sends last when `include_usage` is on.
    pub fn usage_chunk(&self, endpoint: Endpoint, usage: Usage) -> Vec<u8> {
        self.write(endpoint.chunk_object(), [(); 0], Some(usage))
    }
}

/// An embeddings response, `{"object":"list","data":[…],"model",…}`, the
/// vectors written as `format` asks: floats, or base64 of their
/// little-endian `f32` bytes.
pub fn embeddings(
    model: &str,
    vectors: &[Vec<f32>],
    format: EncodingFormat,
    usage: Usage,
) -> Vec<u8> {
    use base64::Engine as _;
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => Vector::Floats(vector),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
        })
        .collect();
    serde_json::to_vec(&EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.total_tokens,
        },
    })
    .expect("embeddings serialise")
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem<'a>>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

/// Floats written as `f32`s (`0.3917046`), not widened to `f64`.
#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Seconds since the epoch, as OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Default, Deserialize)]
pub struct XGroq {
    #[serde(default)]
    pub usage: Option<ReportedUsage>,
}

/// What the meter reads of `choices`: how many there are, and their text,
/// measured as each is read rather than kept.
#[derive(Debug, Default)]
pub struct Choices {
    pub count: usize,
    pub text_chars: usize,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Measure;

        impl<'de> serde::de::Visitor<'de> for Measure {
            type Value = Choices;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of choices")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Choices, A::Error> {
                let mut choices = Choices::default();
                while let Some(choice) = seq.next_element::<ChoiceView<'de>>()? {
                    choices.count += 1;
                    choices.text_chars += choice.text_chars();
                }
                Ok(choices)
            }
        }

        deserializer.deserialize_seq(Measure)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ChoiceView<'a> {
    #[serde(borrow, default)]
    pub delta: Option<TextView<'a>>,
    #[serde(borrow, default)]
    pub message: Option<TextView<'a>>,
    /// Legacy completions carry their text here.
    #[serde(borrow, default)]
    pub text: Option<Text<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TextView<'a> {
    #[serde(borrow, default)]
    pub content: Option<Text<'a>>,
    /// A reasoning model's reasoning, as vLLM and DeepSeek name it.
    #[serde(borrow, default)]
    pub reasoning_content: Option<Text<'a>>,
    /// The same, as Together and newer vLLM name it.
    #[serde(borrow, default)]
    pub reasoning: Option<Text<'a>>,
    /// The model's tool calls, whose arguments are output too.
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<ToolCallView<'a>>>,
    /// The one call of OpenAI's older `functions` API.
    #[serde(borrow, default)]
    pub function_call: Option<FunctionView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ToolCallView<'a> {
    #[serde(borrow, default)]
    pub function: Option<FunctionView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct FunctionView<'a> {
    #[serde(borrow, default)]
    pub arguments: Option<Text<'a>>,
}

impl ResponseView<'_> {
    /// Usage from wherever this upstream put it, if it is usable.
    pub fn usage(&self) -> Option<Result<Usage, UsageFault>> {
        self.usage
            .as_ref()
            .or_else(|| self.x_groq.as_ref().and_then(|x| x.usage.as_ref()))
            .map(ReportedUsage::read)
    }

    /// An error sent in place of a response or chunk: OpenAI's nested
    /// `error`, or older vLLM's flat `{"object":"error",...}`.
    pub fn is_error(&self) -> bool {
        self.error.is_some() || self.object.as_deref() == Some("error")
    }

    /// The usage-only chunk OpenAI sends last when `include_usage` is on.
    pub fn is_usage_only(&self) -> bool {
        self.usage.is_some() && self.choices.as_ref().is_some_and(|c| c.count == 0)
    }

    /// Characters of generated text in this object, for estimating usage
    /// when the upstream reports none.
    pub fn text_chars(&self) -> usize {
        self.choices.as_ref().map_or(0, |c| c.text_chars)
    }
}

impl ChoiceView<'_> {
    /// Together sends the same text both as `text` and `delta.content`, so
    /// the first one present counts, not their sum; reasoning and tool
    /// calls' arguments are output too, and count beside it.
    fn text_chars(&self) -> usize {
        let view = self.delta.as_ref().or(self.message.as_ref());
        let content = view.and_then(|t| t.content.as_ref()).map(|c| c.len());
        let reasoning = view
            .and_then(|t| t.reasoning_content.as_ref().or(t.reasoning.as_ref()))
            .map_or(0, |r| r.len());
        let calls = view
            .and_then(|t| t.tool_calls.as_ref())
            .into_iter()
            .flatten();
        let functions = calls
            .filter_map(|call| call.function.as_ref())
            .chain(view.and_then(|t| t.function_call.as_ref()));
        let arguments = functions
            .filter_map(|function| Some(function.arguments.as_ref()?.len()))
            .sum::<usize>();
        content
            .or_else(|| self.text.as_ref().map(|t| t.len()))
            .unwrap_or(0)
            + reasoning
            + arguments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_names_its_stream_whatever_comes_first_and_nothing_when_not_json() {
        let chunk = br#"{"choices":[{"delta":{"tool_calls":[{"id":"call_1"}]}}],
            "model":"m\/1","created":7,"id":"c1"}"#;
        let identity = ResponseIdentity::of_chunk(chunk);
        assert_eq!((identity.id.as_str(), identity.created), ("c1", 7));
        assert_eq!(identity.model, "m/1");
        for not_json in [&br#"{"id":"c1",choices}"#[..], b"{}", b"\xff"] {
            assert_eq!(
                ResponseIdentity::of_chunk(not_json),
                ResponseIdentity::default()
            );
        }
    }

    #[test]
    fn a_chunk_is_read_without_copying_its_strings_unless_escaped() {
        let chunk = r#"{"id":"c1","object":"chat.completion.chunk","model":"m",
            "choices":[{"delta":{"content":"hi"},"finish_reason":"stop"},
                       {"delta":{"content":"\u00e9"}}]}"#;
        let view: ResponseView<'_> = serde_json::from_str(chunk).unwrap();
        let borrowed = |t: &Option<Text<'_>>| matches!(t, Some(Text(Cow::Borrowed(_))));
        assert!(borrowed(&view.object));
        let choices = view.choices.as_ref().unwrap();
        assert_eq!((choices.count, view.text_chars()), (2, 2 + "é".len()));
        let plain: TextView<'_> = serde_json::from_str(r#"{"content":"hi"}"#).unwrap();
        assert!(borrowed(&plain.content));
        let escaped: TextView<'_> = serde_json::from_str(r#"{"content":"\u00e9"}"#).unwrap();
        assert!(!borrowed(&escaped.content));
        assert!(serde_json::from_str::<ResponseView<'_>>(r#"{"choices":{}}"#).is_err());
    }
}
