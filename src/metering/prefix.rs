//! A prompt as a chain of blocks of about 16 tokens, as vLLM's prefix
//! cache keys its KV blocks: each block's hash covers every block before
//! it, so two prompts have a block hash in common exactly as far as they
//! share a prefix. Blocks close at each message's end, so the messages of
//! an earlier turn hash the same when a conversation is sent again with
//! more turns. Hashes are the same in every replica of one build.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, PoisonError};

use foldhash::fast::{FixedState, FoldHasher};
use hashlink::LruCache;

use super::estimate::{CHARS_PER_TOKEN, tokens_for_chars};
use crate::openai::{InboundRequest, MessageContent, Prompt, TypedRequest};

/// Tokens per block, as vLLM's default KV block holds.
pub const BLOCK_TOKENS: usize = 16;
const BLOCK_BYTES: usize = BLOCK_TOKENS * CHARS_PER_TOKEN;
/// The one seed every replica hashes with, so their hashes agree.
const SEED: u64 = 0x746f_6c6c_6761_7465;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub hash: u64,
    /// The block's estimated tokens.
    pub tokens: u64,
}

/// The blocks of a request's prompt, in order; none for embeddings.
pub fn blocks(request: &InboundRequest) -> Vec<Block> {
    let mut chain = prompt(request);
    chain.close();
    chain.blocks
}

/// The blocks of a request's prompt followed by its answer `reply`, as
/// the conversation's next turn sends them (for chat, an `assistant`
/// message), and how many of them are the prompt's. An engine keeps the
/// blocks of what it generated in its prefix cache too.
pub fn conversation(request: &InboundRequest, reply: &str) -> (Vec<Block>, usize) {
    let mut chain = prompt(request);
    chain.close();
    let prompt_blocks = chain.blocks.len();
    if matches!(request.typed, TypedRequest::Chat(_)) {
        chain.write(b"assistant");
    }
    chain.write(reply.as_bytes());
    chain.close();
    (chain.blocks, prompt_blocks)
}

/// The chain of a request's prompt, its last block still open.
fn prompt(request: &InboundRequest) -> Chain {
    let mut chain = Chain::default();
    match &request.typed {
        TypedRequest::Chat(chat) => {
            for message in &chat.messages {
                chain.write(message.role.as_bytes());
                match &message.content {
                    Some(MessageContent::Text(text)) => chain.write(text.as_bytes()),
                    Some(MessageContent::Parts(parts)) => {
                        for part in parts {
                            chain.write(part.kind.as_bytes());
                            if let Some(text) = &part.text {
                                chain.write(text.as_bytes());
                            }
                            chain.json(&part.extra);
                        }
                    }
                    None => {}
                }
                chain.json(&message.extra);
                chain.close();
            }
        }
        TypedRequest::Completion(completion) => match &completion.prompt {
            Prompt::Text(text) => chain.write(text.as_bytes()),
            Prompt::Texts(texts) => texts.iter().for_each(|t| chain.write(t.as_bytes())),
            Prompt::Tokens(ids) => ids.iter().for_each(|id| chain.write(&id.to_le_bytes())),
            Prompt::TokenBatches(batches) => batches
                .iter()
                .flatten()
                .for_each(|id| chain.write(&id.to_le_bytes())),
        },
        TypedRequest::Embedding(_) => {}
    }
    chain
}

/// Cuts what is written into blocks, each hash seeded with the last.
struct Chain {
    hasher: FoldHasher<'static>,
    filled: usize,
    blocks: Vec<Block>,
}

impl Default for Chain {
    fn default() -> Self {
        Self {
            hasher: FixedState::with_seed(SEED).build_hasher(),
            filled: 0,
            blocks: Vec::new(),
        }
    }
}

impl Chain {
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (BLOCK_BYTES - self.filled).min(bytes.len());
            self.hasher.write(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == BLOCK_BYTES {
                self.close();
            }
        }
    }

    /// Fields beside the text (tool calls, image URLs) are prompt too.
    fn json(&mut self, extra: &serde_json::Map<String, serde_json::Value>) {
        if !extra.is_empty() {
            // Writing into the chain cannot fail.
            let _ = serde_json::to_writer(&mut *self, extra);
        }
    }

    fn close(&mut self) {
        if self.filled == 0 {
            return;
        }
        let hash = self.hasher.finish();
        self.blocks.push(Block {
            hash,
            tokens: tokens_for_chars(self.filled),
        });
        self.hasher = FixedState::with_seed(SEED).build_hasher();
        self.hasher.write_u64(hash);
        self.filled = 0;
    }
}

impl std::io::Write for Chain {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        Chain::write(self, bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The blocks one engine holds (or is believed to hold), the least
/// recently served evicted first, bounded in memory: each block is a
/// hash and when it was last served.
pub struct PrefixCache {
    inner: Mutex<Served>,
}

struct Served {
    blocks: LruCache<u64, u64>,
    clock: u64,
}

/// How much of a prompt a cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Matched {
    /// Leading blocks held.
    pub blocks: usize,
    pub tokens: u64,
    /// When the last of them was served; larger is more recent.
    pub served: u64,
}

/// Holds nothing until given a capacity.
impl Default for PrefixCache {
    fn default() -> Self {
        Self::new(0)
    }
}

impl PrefixCache {
    pub fn new(capacity: u32) -> Self {
        Self {
            inner: Mutex::new(Served {
                blocks: LruCache::new(capacity as usize),
                clock: 0,
            }),
        }
    }

    /// Keeps at most `capacity` blocks, evicting the least recent.
    pub fn set_capacity(&self, capacity: u32) {
        self.served().blocks.set_capacity(capacity as usize);
    }

    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The longest prefix of `blocks` held, without touching the order.
    pub fn matched(&self, blocks: &[Block]) -> Matched {
        let served = self.served();
        let mut matched = Matched::default();
        for block in blocks {
            let Some(&at) = served.blocks.peek(&block.hash) else {
                break;
            };
            matched.blocks += 1;
            matched.tokens += block.tokens;
            matched.served = at;
        }
        matched
    }

    /// Serves `blocks`: what it held of them, after which it holds all of
    /// them as the most recently served.
    pub fn serve(&self, blocks: &[Block]) -> Matched {
        let matched = self.matched(blocks);
        self.hold(blocks.iter().map(|b| b.hash));
        matched
    }

    /// Takes up blocks another replica routed here since the last
    /// exchange with the fleet, the oldest first, as served now.
    pub fn learn(&self, hashes: &[u64]) {
        if !hashes.is_empty() {
            self.hold(hashes.iter().copied());
        }
    }

    fn hold(&self, hashes: impl Iterator<Item = u64>) {
        let mut served = self.served();
        served.clock += 1;
        let now = served.clock;
        for hash in hashes {
            served.blocks.insert(hash, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::openai::Endpoint;

    fn chat(messages: &str) -> InboundRequest {
        let body = format!(r#"{{"model":"m","messages":{messages}}}"#);
        InboundRequest::parse(Endpoint::Chat, Bytes::from(body)).unwrap()
    }

    #[test]
    fn a_longer_conversation_shares_every_block_of_the_shorter_one() {
        let system = "You are a careful assistant. ".repeat(10);
        let first = chat(&format!(
            r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"What is a KV cache?"}}]"#
        ));
        let second = chat(&format!(
            r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"What is a KV cache?"}},
               {{"role":"assistant","content":"Keys and values of past tokens."}},{{"role":"user","content":"Why keep it?"}}]"#
        ));
        let (a, b) = (blocks(&first), blocks(&second));
        assert!(a.len() >= 6, "{} blocks", a.len());
        assert_eq!(&b[..a.len()], &a[..]);
        assert!(b.len() > a.len());
        let other = chat(r#"[{"role":"user","content":"What is a KV cache?"}]"#);
        assert_ne!(
            blocks(&other)[0],
            a[0],
            "a block's hash covers what came before"
        );
        let tokens: u64 = a.iter().map(|b| b.tokens).sum();
        assert_eq!(tokens, tokens_for_chars(6 + 290) + tokens_for_chars(4 + 19));
        // What the first turn generated is the start of the next turn.
        let (answered, prompt_blocks) = conversation(&first, "Keys and values of past tokens.");
        assert_eq!(prompt_blocks, a.len());
        assert_eq!(&answered[..], &b[..answered.len()]);
        assert_eq!(answered.len() + 1, b.len());
    }

    #[test]
    fn the_cache_matches_the_longest_held_prefix_and_evicts_the_least_recent() {
        let block = |hash| Block { hash, tokens: 16 };
        let cache = PrefixCache::new(4);
        assert_eq!(cache.serve(&[block(1), block(2), block(3)]).blocks, 0);
        let matched = cache.serve(&[block(1), block(2), block(9)]);
        assert_eq!((matched.blocks, matched.tokens), (2, 32));
        // 3 was served least recently; a fifth block evicts it.
        cache.serve(&[block(5)]);
        assert_eq!(cache.matched(&[block(1), block(2), block(3)]).blocks, 2);
        assert_eq!(cache.matched(&[block(2)]).blocks, 1);
        assert_eq!(
            cache.matched(&[block(1)]).served,
            2,
            "served last by the second prompt"
        );
    }
}
