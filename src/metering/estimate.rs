//! Token estimates, used where no tokenizer answer exists yet: request
//! facts before routing, and usage when an upstream reports none. About
//! four characters a token holds for English text with Llama tokenizers.
//!
//! Beside the estimate, a prompt's most: the most tokens a tokenizer and
//! chat template can make of it, which a budget reserves. Byte-level BPE
//! (Llama 3 and 4, Qwen, GPT) makes at most a token of each byte of text,
//! and text can be written to reach that: digits between spaces are a
//! token a byte to Llama 3's tokenizer, where English prose is about four
//! bytes a token (`docs/metering.md` has the measured figures). JSON a
//! template writes again, indented (tools, tool calls), takes up to two
//! tokens a byte of its compact form.

use super::image;
use super::prompt::PromptTokens;
use crate::openai::{ChatRequest, InboundRequest, Medium, MessageContent, Prompt, TypedRequest};

pub const CHARS_PER_TOKEN: usize = 4;
/// Chat templates add role markers and separators around every message.
const TOKENS_PER_MESSAGE: u64 = 4;
/// The estimate of a part the gateway cannot measure (audio, a file, a
/// video, precomputed embeddings): the real count depends on the model's
/// encoder and the media's length. The most such a part can be is not
/// bounded short of the context window.
const TOKENS_PER_MEDIA_PART: u64 = 765;
/// The most a chat template adds around a message: Llama 3's and Qwen's
/// add 5 (its role between markers, a line end, an end marker).
const MOST_PER_MESSAGE: u64 = 16;
/// The most a chat template adds to a conversation: Llama 3.1's system
/// block with its dates and the answer's header make 35 tokens of a
/// one-word prompt's 36, Qwen 2.5's default system prompt about 30.
const MOST_PER_CHAT: u64 = 64;
/// The most a template adds to offer tools, beside the tools themselves:
/// Llama 3.1's instructions take 56 tokens, Qwen 2.5's about 90.
const MOST_FOR_TOOLS: u64 = 192;
/// The most a tokenizer adds to a legacy prompt or an embedding's input:
/// its begin and end markers.
const MOST_PER_INPUT: u64 = 2;

pub fn tokens_for_chars(chars: usize) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN) as u64
}

/// The most bytes of generated text a token holds, bar runs of one
/// character (Llama 3 and 4 have tokens of 64 dashes): the densest text
/// measured is a Markdown table's rule rows, 12.8 bytes a token, then
/// Thai, 9.6 to Llama 4, and code indented 24 spaces, 8.4
/// (`benches/tokens/bytes_per_token.py`).
const MOST_BYTES_PER_TOKEN: usize = 16;

/// The fewest tokens `bytes` of generated text are, bar runs of one
/// character: what a stream is known to have generated where its upstream
/// does not count it.
pub fn fewest_tokens_for_chars(bytes: usize) -> u64 {
    bytes.div_ceil(MOST_BYTES_PER_TOKEN) as u64
}

/// `bytes` of text: a token a byte at most.
fn of_text(bytes: usize) -> PromptTokens {
    PromptTokens {
        estimate: tokens_for_chars(bytes),
        most: bytes as u64,
    }
}

/// `bytes` of compact JSON, which a template may write indented.
fn of_json(bytes: usize) -> PromptTokens {
    PromptTokens {
        estimate: tokens_for_chars(bytes),
        most: 2 * bytes as u64,
    }
}

/// Tokens known, or counted the same either way.
fn exactly(tokens: u64) -> PromptTokens {
    PromptTokens {
        estimate: tokens,
        most: tokens,
    }
}

/// A part the gateway cannot measure: at most what a deployment's
/// context window holds ([`InboundRequest::prompt_ceiling`]).
fn unmeasured() -> PromptTokens {
    PromptTokens {
        estimate: TOKENS_PER_MEDIA_PART,
        most: u64::MAX,
    }
}

/// What a template adds: `estimate`, at most `most`.
fn of_template(estimate: u64, most: u64) -> PromptTokens {
    PromptTokens { estimate, most }
}

pub fn prompt_tokens(request: &InboundRequest) -> PromptTokens {
    match &request.typed {
        TypedRequest::Chat(chat) => chat_prompt_tokens(chat),
        TypedRequest::Completion(completion) => input_tokens(&completion.prompt),
        TypedRequest::Embedding(embedding) => input_tokens(&embedding.input),
    }
}

fn chat_prompt_tokens(chat: &ChatRequest) -> PromptTokens {
    // vLLM takes a request's own settings for the model's processor (Qwen
    // 2.5 VL's `max_pixels`): its images are then bounded by no
    // processor's defaults, only by the context window.
    let processor_set = chat.extra.contains_key("mm_processor_kwargs");
    let mut tokens = of_template(0, MOST_PER_CHAT);
    for message in &chat.messages {
        tokens += of_template(TOKENS_PER_MESSAGE, MOST_PER_MESSAGE);
        match &message.content {
            Some(MessageContent::Text(text)) => tokens += of_text(text.len()),
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    tokens += match (part.media().max(), &part.text) {
                        // An image given other than by `image_url` is of
                        // unknown size.
                        (Some(Medium::Image), _) => {
                            let image = image::tokens(part.image_url().unwrap_or(""));
                            if processor_set {
                                PromptTokens {
                                    most: u64::MAX,
                                    ..image
                                }
                            } else {
                                image
                            }
                        }
                        (None, Some(text)) => of_text(text.len()),
                        (Some(Medium::Audio | Medium::Video), _) | (None, None) => unmeasured(),
                    };
                }
            }
            None => {}
        }
        // Tool calls and other fields still cost tokens; count their JSON.
        if !message.extra.is_empty() {
            tokens += of_json(json_len(&message.extra));
        }
    }
    if let Some(tools) = &chat.tools {
        tokens += of_json(tools.get().len());
        tokens += of_template(0, MOST_FOR_TOOLS);
    }
    tokens
}

/// The length of `value` written as compact JSON, counted as it is
/// written rather than kept: an agent's tool calls run to kilobytes a
/// request.
fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counted(usize);
    impl std::io::Write for Counted {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counted = Counted(0);
    serde_json::to_writer(&mut counted, value).map_or(0, |()| counted.0)
}

/// The largest prompt of a legacy completions batch, or input of an
/// embeddings batch: `None` for a request of one prompt, where it is the
/// whole prompt.
pub fn longest_of_batch(request: &InboundRequest) -> Option<u64> {
    let prompt = match &request.typed {
        TypedRequest::Completion(completion) => &completion.prompt,
        TypedRequest::Embedding(embedding) => &embedding.input,
        TypedRequest::Chat(_) => return None,
    };
    match prompt {
        Prompt::Texts(texts) => texts.iter().map(|t| tokens_for_chars(t.len())).max(),
        Prompt::TokenBatches(batches) => batches.iter().map(|b| b.len() as u64).max(),
        Prompt::Text(_) | Prompt::Tokens(_) => None,
    }
}

/// A legacy completion's prompt, or an embedding's input.
fn input_tokens(prompt: &Prompt) -> PromptTokens {
    let text = |text: &String| of_text(text.len()) + of_template(0, MOST_PER_INPUT);
    match prompt {
        Prompt::Text(one) => text(one),
        Prompt::Texts(texts) => texts.iter().map(text).sum(),
        Prompt::Tokens(ids) => exactly(ids.len() as u64),
        Prompt::TokenBatches(batches) => batches.iter().map(|b| exactly(b.len() as u64)).sum(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::openai::Endpoint;

    #[test]
    fn estimates_chat_and_completion_prompts() {
        let chat = InboundRequest::parse(
            Endpoint::Chat,
            Bytes::from_static(
                br#"{"model":"m","messages":[{"role":"user","content":"12345678"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}},{"type":"input_audio","input_audio":{"data":"","format":"wav"}}]}]}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            prompt_tokens(&chat).estimate,
            4 + 2 + 4 + 1 + image::LLAMA4_MOST + 765
        );
        // The audio part's length cannot be read: no bound short of the
        // context window.
        assert_eq!(prompt_tokens(&chat).most, u64::MAX);
        let tokens = InboundRequest::parse(
            Endpoint::Completions,
            Bytes::from_static(br#"{"model":"m","prompt":[1,2,3]}"#),
        )
        .unwrap();
        assert_eq!(prompt_tokens(&tokens), exactly(3));
        assert_eq!(longest_of_batch(&tokens), None, "token ids are one prompt");
        assert_eq!(longest_of_batch(&chat), None);
        let parse = |endpoint, body: &'static str| {
            InboundRequest::parse(endpoint, Bytes::from_static(body.as_bytes())).unwrap()
        };
        let batch = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":["1234","12345678","1"]}"#,
        );
        assert_eq!(
            (prompt_tokens(&batch).estimate, longest_of_batch(&batch)),
            (4, Some(2))
        );
        let batches = parse(
            Endpoint::Embeddings,
            r#"{"model":"m","input":[[1,2],[3,4,5]]}"#,
        );
        assert_eq!(
            (prompt_tokens(&batches).estimate, longest_of_batch(&batches)),
            (5, Some(3))
        );
    }

    #[test]
    fn a_video_has_no_most_but_a_deployments_context_window() {
        let parse = |endpoint, body: &str| {
            InboundRequest::parse(endpoint, Bytes::copy_from_slice(body.as_bytes())).unwrap()
        };
        let chat = |part: &str| {
            parse(
                Endpoint::Chat,
                &format!(r#"{{"model":"m","messages":[{{"role":"user","content":[{part}]}}]}}"#),
            )
        };
        for video in [
            r#"{"type":"video_url","video_url":{"url":"https://x/clip.mp4"}}"#,
            r#"{"type":"text","text":"","uuid":"u","video_url":"https://x/clip.mp4"}"#,
        ] {
            let request = chat(video);
            let tokens = prompt_tokens(&request);
            let estimate = TOKENS_PER_MESSAGE + TOKENS_PER_MEDIA_PART;
            assert_eq!(
                tokens,
                PromptTokens {
                    estimate,
                    most: u64::MAX
                },
                "{video}"
            );
            assert_eq!(request.prompt_ceiling(tokens.most, 8192), 8192);
        }
        // An image given other than by `image_url` is one of unknown size.
        let image = chat(r#"{"type":"input_image","image_url":"https://x/a.png"}"#);
        assert_eq!(
            prompt_tokens(&image),
            of_template(TOKENS_PER_MESSAGE, MOST_PER_CHAT + MOST_PER_MESSAGE) + image::tokens("")
        );
        // A window for each prompt of a batch.
        let batch = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":["a","b","c"]}"#,
        );
        assert_eq!(batch.prompt_ceiling(u64::MAX, 10), 30);
        assert_eq!(batch.prompt_ceiling(9, 10), 9);
    }

    #[test]
    fn tools_count_as_written_and_other_message_members_as_compact_json() {
        let chat = InboundRequest::parse(
            Endpoint::Chat,
            Bytes::from_static(
                r#"{"model":"m", "messages": [{"role":"assistant", "content":null,
                "tool_calls": [{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"q\":\"é\\n\"}"}}]}],
                "tools": [{"type":"function", "function":{"name":"f","parameters":{"type":"object"}}}]}"#
                    .as_bytes(),
            ),
        )
        .unwrap();
        // 102 bytes of `tool_calls` written without spaces (é is two), and
        // the 77 of `tools` as the client wrote them.
        assert_eq!(
            prompt_tokens(&chat),
            PromptTokens {
                estimate: 4 + 102_u64.div_ceil(4) + 77_u64.div_ceil(4),
                // Twice the JSON, as a template writes it indented.
                most: MOST_PER_CHAT + MOST_PER_MESSAGE + 2 * 102 + 2 * 77 + MOST_FOR_TOOLS,
            }
        );
    }

    #[test]
    fn a_prompts_most_is_a_token_a_byte_of_its_text_with_its_templates_markers() {
        let parse = |endpoint, body: &str| {
            InboundRequest::parse(endpoint, Bytes::copy_from_slice(body.as_bytes())).unwrap()
        };
        // Digits between spaces: 3,999 bytes that Llama 3 makes 3,999
        // tokens of, estimated at 1,000.
        let digits = (0..2000)
            .map(|i| (i % 10).to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let chat = parse(
            Endpoint::Chat,
            &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{digits}"}}]}}"#),
        );
        assert_eq!(
            prompt_tokens(&chat),
            PromptTokens {
                estimate: 4 + 1000,
                most: MOST_PER_CHAT + MOST_PER_MESSAGE + 3999,
            }
        );
        // Multi-byte text counts its bytes: "é" is two.
        let accented = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":["été","a"]}"#,
        );
        assert_eq!(
            prompt_tokens(&accented),
            PromptTokens {
                estimate: 2 + 1,
                most: 5 + 1 + 2 * MOST_PER_INPUT,
            }
        );
        let embeddings = parse(Endpoint::Embeddings, r#"{"model":"m","input":"abcdefgh"}"#);
        assert_eq!(
            prompt_tokens(&embeddings),
            PromptTokens {
                estimate: 2,
                most: 8 + MOST_PER_INPUT,
            }
        );
    }
}
