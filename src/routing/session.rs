//! A request's session, for affinity: the client's own key for it when it
//! gives one, else its opening (system prompt and first message), which
//! every later turn of a conversation resends. Held as a hash, read once
//! per request without copying the key; the same in every replica.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use axum::http::HeaderName;
use foldhash::fast::FixedState;

use crate::openai::{InboundRequest, MessageContent, TypedRequest};

pub const SESSION_HEADER: &str = "x-session-id";
/// The header as a request's headers are searched for it: by a name not
/// parsed again at each search.
pub const SESSION: HeaderName = HeaderName::from_static(SESSION_HEADER);

/// The seed every replica hashes with, so they bind sessions alike.
const SEED: u64 = 0x7365_7373_696f_6e00;
/// Of each opening message, the bytes hashed: enough to tell
/// conversations apart, bounded for long system prompts.
const OPENING_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub hash: u64,
    pub source: SessionSource,
}

/// Where a request's session came from, in the order they are looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionSource {
    /// `x-session-id`.
    Header,
    /// OpenAI's `prompt_cache_key`.
    PromptCacheKey,
    /// OpenAI's `user`, or Anthropic's `metadata.user_id` (translated to it).
    User,
    /// The system prompt and first message.
    Opening,
}

impl SessionSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Header => SESSION_HEADER,
            Self::PromptCacheKey => "prompt_cache_key",
            Self::User => "user",
            Self::Opening => "opening",
        }
    }
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:016x}", self.source.name(), self.hash)
    }
}

impl Session {
    /// The session of `request`, whose `x-session-id` is `header`; `None`
    /// for a request with nothing to key on (an empty prompt).
    pub fn of(request: &InboundRequest, header: Option<&[u8]>) -> Option<Self> {
        let keyed = |source, key: &[u8]| Self {
            hash: hash_of(|h| h.write(key)),
            source,
        };
        if let Some(key) = header.filter(|k| !k.is_empty()) {
            return Some(keyed(SessionSource::Header, key));
        }
        if let Some(key) = request.text_member("prompt_cache_key") {
            return Some(keyed(SessionSource::PromptCacheKey, key.as_bytes()));
        }
        if let Some(user) = request.user() {
            return Some(keyed(SessionSource::User, user.as_bytes()));
        }
        let mut opened = false;
        let hash = hash_of(|h| match &request.typed {
            TypedRequest::Chat(chat) => {
                // The system (or developer) messages, then the first other.
                let first = chat.messages.iter().position(|m| !is_system(&m.role));
                let opening = chat
                    .messages
                    .iter()
                    .take(first.map_or(usize::MAX, |i| i + 1));
                for message in opening {
                    h.write(message.role.as_bytes());
                    let mut left = OPENING_BYTES;
                    let mut text = |t: &str| {
                        let t = &t.as_bytes()[..t.len().min(left)];
                        left -= t.len();
                        opened |= !t.is_empty();
                        h.write(t);
                    };
                    match &message.content {
                        Some(MessageContent::Text(t)) => text(t),
                        Some(MessageContent::Parts(parts)) => parts
                            .iter()
                            .filter_map(|p| p.text.as_deref())
                            .for_each(text),
                        None => {}
                    }
                }
            }
            TypedRequest::Completion(completion) => {
                if let crate::openai::Prompt::Text(text) = &completion.prompt {
                    let t = &text.as_bytes()[..text.len().min(OPENING_BYTES)];
                    opened = !t.is_empty();
                    h.write(t);
                }
            }
            TypedRequest::Embedding(_) => {}
        });
        opened.then_some(Self {
            hash,
            source: SessionSource::Opening,
        })
    }
}

fn is_system(role: &str) -> bool {
    matches!(role, "system" | "developer")
}

fn hash_of(write: impl FnOnce(&mut foldhash::fast::FoldHasher<'static>)) -> u64 {
    let mut hasher = FixedState::with_seed(SEED).build_hasher();
    write(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::openai::Endpoint;

    fn chat(body: &str) -> InboundRequest {
        InboundRequest::parse(Endpoint::Chat, Bytes::from(body.to_owned())).unwrap()
    }

    #[test]
    fn the_session_is_the_first_of_header_cache_key_user_and_opening() {
        let both = chat(
            r#"{"model":"m","prompt_cache_key":"k1","user":"u1","messages":[{"role":"user","content":"hi"}]}"#,
        );
        let header = Session::of(&both, Some(b"s1")).unwrap();
        assert_eq!(header.source, SessionSource::Header);
        let key = Session::of(&both, None).unwrap();
        assert_eq!(key.source, SessionSource::PromptCacheKey);
        assert_ne!(key.hash, header.hash);
        let user = chat(r#"{"model":"m","user":"k1","messages":[{"role":"user","content":"hi"}]}"#);
        let user = Session::of(&user, Some(b"")).unwrap();
        assert_eq!(user.source, SessionSource::User);
        assert_eq!(user.hash, key.hash, "the same key names the same session");
    }

    #[test]
    fn later_turns_of_a_conversation_share_its_opening() {
        let first = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Plan a trip."}]}"#,
        );
        let third = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Plan a trip."},
                {"role":"assistant","content":"Where to?"},{"role":"user","content":"Lisbon."}]}"#,
        );
        let other = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Fix my code."}]}"#,
        );
        let session = Session::of(&first, None).unwrap();
        assert_eq!(session.source, SessionSource::Opening);
        assert_eq!(Session::of(&third, None), Some(session));
        assert_ne!(Session::of(&other, None).unwrap().hash, session.hash);
        let empty = chat(r#"{"model":"m","messages":[{"role":"user","content":""}]}"#);
        assert_eq!(Session::of(&empty, None), None);
    }
}
