//! Token estimates, used where no tokenizer answer exists yet: request
//! facts before routing, and usage when an upstream reports none. About
//! four characters a token holds for English text with Llama tokenizers.

use super::image;
use crate::openai::{ChatRequest, InboundRequest, MessageContent, Prompt, TypedRequest};

pub const CHARS_PER_TOKEN: usize = 4;
/// Chat templates add role markers and separators around every message.
const TOKENS_PER_MESSAGE: u64 = 4;
/// A flat charge per audio or file part; the real count depends on the
/// model's encoder and the media's size.
const TOKENS_PER_MEDIA_PART: u64 = 765;

pub fn tokens_for_chars(chars: usize) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN) as u64
}

pub fn prompt_tokens(request: &InboundRequest) -> u64 {
    match &request.typed {
        TypedRequest::Chat(chat) => chat_prompt_tokens(chat),
        TypedRequest::Completion(completion) => input_tokens(&completion.prompt),
        TypedRequest::Embedding(embedding) => input_tokens(&embedding.input),
    }
}

fn chat_prompt_tokens(chat: &ChatRequest) -> u64 {
    let mut tokens = 0;
    for message in &chat.messages {
        tokens += TOKENS_PER_MESSAGE;
        match &message.content {
            Some(MessageContent::Text(text)) => tokens += tokens_for_chars(text.len()),
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    tokens += match (&part.text, part.image_url()) {
                        (Some(text), _) => tokens_for_chars(text.len()),
                        (None, Some(url)) => image::tokens(url),
                        (None, None) => TOKENS_PER_MEDIA_PART,
                    };
                }
            }
            None => {}
        }
        // Tool calls and other fields still cost tokens; count their JSON.
        if !message.extra.is_empty() {
            tokens += tokens_for_chars(json_len(&message.extra));
        }
    }
    if let Some(tools) = &chat.tools {
        tokens += tokens_for_chars(tools.get().len());
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
fn input_tokens(prompt: &Prompt) -> u64 {
    match prompt {
        Prompt::Text(text) => tokens_for_chars(text.len()),
        Prompt::Texts(texts) => texts.iter().map(|t| tokens_for_chars(t.len())).sum(),
        Prompt::Tokens(ids) => ids.len() as u64,
        Prompt::TokenBatches(batches) => batches.iter().map(|b| b.len() as u64).sum(),
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
            prompt_tokens(&chat),
            4 + 2 + 4 + 1 + image::MOST_TOKENS + 765
        );
        let tokens = InboundRequest::parse(
            Endpoint::Completions,
            Bytes::from_static(br#"{"model":"m","prompt":[1,2,3]}"#),
        )
        .unwrap();
        assert_eq!(prompt_tokens(&tokens), 3);
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
            (prompt_tokens(&batch), longest_of_batch(&batch)),
            (4, Some(2))
        );
        let batches = parse(
            Endpoint::Embeddings,
            r#"{"model":"m","input":[[1,2],[3,4,5]]}"#,
        );
        assert_eq!(
            (prompt_tokens(&batches), longest_of_batch(&batches)),
            (5, Some(3))
        );
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
            4 + 102_u64.div_ceil(4) + 77_u64.div_ceil(4)
        );
    }
}
