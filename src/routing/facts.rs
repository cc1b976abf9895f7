//! The facts of a request that routing decides on, read once.

use axum::http::HeaderName;

use super::session::Session;
use crate::config::{Affinity, Key, Policy, is_region};
use crate::error::GatewayError;
use crate::metering::estimate;
use crate::metering::prefix::{self, Block};
use crate::metering::prompt::PromptTokens;
use crate::openai::{ContentPart, Endpoint, InboundRequest, Medium, MessageContent, TypedRequest};

pub const REGION_HEADER: &str = "x-tollgate-region";
/// The header as a request's headers are searched for it: by a name not
/// parsed again at each search.
pub const REGION: HeaderName = HeaderName::from_static(REGION_HEADER);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub endpoint: Endpoint,
    pub region: Option<String>,
    pub image: bool,
    pub audio: bool,
    pub video: bool,
    pub tools: bool,
    /// The prompt's estimated tokens: all of a batch's prompts (legacy
    /// completions, embeddings), which are billed together.
    pub input_tokens: u64,
    /// The most tokens the prompt can be ([`PromptTokens`]), whatever the
    /// deployment: what a budget reserves for it, within a deployment's
    /// window ([`InboundRequest::prompt_ceiling`]).
    pub input_tokens_most: u64,
    /// The largest prompt of a batch, when the request is one (legacy
    /// completions, embeddings): each is answered on its own.
    pub longest_of_batch: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub stream: bool,
    /// The request's session, read only for an alias with affinity.
    pub session: Option<Session>,
    /// The prompt's blocks, read only for an alias with prefix affinity.
    pub blocks: Vec<Block>,
}

impl RequestFacts {
    /// What a deployment's context window must hold of the prompt: all of
    /// it, or a batch's longest.
    pub fn window_tokens(&self) -> u64 {
        self.longest_of_batch.unwrap_or(self.input_tokens)
    }

    pub fn of(request: &InboundRequest, region: Option<String>) -> Self {
        let prompt = estimate::prompt_tokens(request);
        let mut facts = Self {
            endpoint: request.endpoint(),
            region,
            input_tokens: prompt.estimate,
            input_tokens_most: prompt.most,
            longest_of_batch: estimate::longest_of_batch(request),
            max_output_tokens: request.max_output_tokens().map(u64::from),
            stream: request.stream(),
            ..Self::default()
        };
        if let TypedRequest::Chat(chat) = &request.typed {
            facts.tools = chat.has_tools();
            let parts = chat.messages.iter().filter_map(|m| match &m.content {
                Some(MessageContent::Parts(parts)) => Some(parts),
                _ => None,
            });
            for medium in parts.flatten().flat_map(ContentPart::media) {
                match medium {
                    Medium::Image => facts.image = true,
                    Medium::Audio => facts.audio = true,
                    Medium::Video => facts.video = true,
                }
            }
        }
        facts
    }

    /// Reads what `affinity` binds by: the session (`header` is the
    /// request's `x-session-id`) and, for prefix affinity, the blocks.
    pub fn with_affinity(
        mut self,
        request: &InboundRequest,
        affinity: Affinity,
        header: Option<&[u8]>,
    ) -> Self {
        if affinity != Affinity::None {
            self.session = Session::of(request, header);
        }
        if affinity == Affinity::Prefix {
            self.blocks = prefix::blocks(request);
        }
        self
    }

    /// The prompt's tokens, estimated and at most.
    pub fn prompt(&self) -> PromptTokens {
        PromptTokens {
            estimate: self.input_tokens,
            most: self.input_tokens_most,
        }
    }

    /// Whether the request has input other than text.
    pub fn has_media(&self) -> bool {
        self.image || self.audio || self.video
    }

    /// The same request with its images, audio and video left out.
    pub fn text_only(&self) -> Self {
        Self {
            image: false,
            audio: false,
            video: false,
            ..self.clone()
        }
    }
}

/// The request's region: its key's, or the one it asks for (`asked`, from
/// `x-tollgate-region`) where the key allows callers to choose (always,
/// when the gateway has no keys), or the policy's default.
pub fn region(
    asked: Option<&[u8]>,
    key: Option<&Key>,
    policy: &Policy,
) -> Result<Option<String>, GatewayError> {
    let header = match asked {
        None => None,
        Some(value) => Some(
            std::str::from_utf8(value)
                .ok()
                .map(str::trim)
                .filter(|r| r.len() <= 64 && is_region(r))
                // Regions are held lowercase (see `config::is_region`).
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| {
                    GatewayError::bad_request(
                        format!("{REGION_HEADER} must be a region name such as \"eu\": letters, digits, - and _"),
                        None,
                    )
                })?,
        ),
    };
    let key_region = key.and_then(|k| k.region.as_deref());
    let may_choose = key.is_none_or(|k| k.region_header);
    Ok(match (header, key_region) {
        (Some(chosen), _) if may_choose => Some(chosen),
        (Some(chosen), Some(own)) if chosen == own => Some(chosen),
        (Some(chosen), _) => {
            let key = key.map_or("", |k| k.name.as_str());
            return Err(GatewayError::region_not_allowed(key, &chosen, key_region));
        }
        (None, Some(own)) => Some(own.to_owned()),
        (None, None) => policy.default_region.clone(),
    })
}
