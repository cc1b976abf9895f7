//! Token estimates, used where no tokenizer answer exists yet: request
//! facts before routing, and usage when an upstream reports none. About
//! four characters a token holds for English text with Llama tokenizers.

use crate::openai::{ChatRequest, InboundRequest, MessageContent, Prompt, TypedRequest};

pub const CHARS_PER_TOKEN: usize = 4;
/// Chat templates add role markers and separators around every message.
const TOKENS_PER_MESSAGE: u64 = 4;
/// A flat charge per image or audio part; the real count depends on the
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
                    tokens += match &part.text {
                        Some(text) => tokens_for_chars(text.len()),
                        None => TOKENS_PER_MEDIA_PART,
                    };
                }
            }
            None => {}
        }
        // Tool calls and other fields still cost tokens; count their JSON.
        if !message.extra.is_empty() {
            tokens += tokens_for_chars(
                serde_json::Value::Object(message.extra.clone())
                    .to_string()
                    .len(),
            );
        }
    }
    if let Some(tools) = &chat.tools {
        tokens += tokens_for_chars(serde_json::to_string(tools).map_or(0, |s| s.len()));
    }
    tokens
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
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            ),
        )
        .unwrap();
        assert_eq!(prompt_tokens(&chat), 4 + 2 + 4 + 1 + 765);
        let tokens = InboundRequest::parse(
            Endpoint::Completions,
            Bytes::from_static(br#"{"model":"m","prompt":[1,2,3]}"#),
        )
        .unwrap();
        assert_eq!(prompt_tokens(&tokens), 3);
    }
}
