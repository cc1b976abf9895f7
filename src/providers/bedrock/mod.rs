//! AWS Bedrock Runtime through Converse (`POST /model/{modelId}/converse`)
//! and ConverseStream (`…/converse-stream`). Requests are translated from
//! OpenAI chat (`request`), answers back to OpenAI objects (`response`) and
//! chunks (`stream`); `auth` signs, `errors` maps Bedrock's errors.

mod auth;
mod errors;
mod params;
mod request;
mod response;
mod stream;

use futures_util::future::BoxFuture;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use url::Url;

use super::http::{self, Caps, ErrorReply, HttpClient};
use super::{Provider, UpstreamCall, UpstreamReply};
use crate::boxed;
use crate::config::Backend;
use crate::error::GatewayError;
use crate::openai::TypedRequest;
use auth::Auth;

/// A path label is encoded as AWS SDKs do: everything but the unreserved
/// characters, so the `:` of `meta.llama3-1-8b-instruct-v1:0` is sent as
/// `%3A` (and signed as `%253A`).
const LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub struct Bedrock {
    name: String,
    base_url: Url,
    auth: Auth,
    client: HttpClient,
    caps: Caps,
    /// Parameters Converse cannot honour that are ignored, not refused.
    drop_params: Vec<String>,
}

impl Bedrock {
    pub fn new(backend: &Backend) -> Result<Self, String> {
        Ok(Self {
            name: backend.name.clone(),
            base_url: backend
                .base_url
                .clone()
                .ok_or("a bedrock backend needs a base_url")?,
            auth: Auth::new(backend)?,
            client: http::client(backend)?,
            caps: Caps::of(backend),
            drop_params: backend
                .aws
                .as_ref()
                .map(|aws| aws.drop_params.clone())
                .unwrap_or_default(),
        })
    }

    fn url(&self, model: &str, streaming: bool) -> Result<Url, GatewayError> {
        let operation = if streaming {
            "converse-stream"
        } else {
            "converse"
        };
        let url = format!(
            "{}/model/{}/{operation}",
            self.base_url.as_str().trim_end_matches('/'),
            utf8_percent_encode(model, LABEL)
        );
        Url::parse(&url).map_err(|e| {
            GatewayError::internal(format!("backend \"{}\": bad URL {url}: {e}", self.name))
        })
    }

    async fn call(&self, call: UpstreamCall<'_>) -> Result<UpstreamReply, GatewayError> {
        let TypedRequest::Chat(chat) = &call.request.typed else {
            // Another deployment of the alias may serve legacy completions.
            return Err(GatewayError::endpoint_unsupported(format!(
                "backend \"{}\" is AWS Bedrock, which serves chat only; send this as /v1/chat/completions",
                self.name
            )));
        };
        let converse = request::converse(chat, call.max_tokens, &self.drop_params)?;
        let stop = converse.only_stop();
        let body = serde_json::to_vec(&converse).map_err(|e| {
            GatewayError::internal(format!("cannot encode a Converse request: {e}"))
        })?;
        let streaming = call.request.stream();
        let url = self.url(call.upstream_model, streaming)?;
        let target = http::target(&self.name, url.as_str()).map_err(GatewayError::internal)?;
        let headers = self.auth.headers(&self.name, &target, &body)?;
        let mut request = http::post_json(&target, body);
        request.fields.extend(headers);
        // Not signed: AWS checks only the headers a signature names.
        http::tag(&mut request, &call);
        let response = http::send(&self.name, &self.client, request, call.quota).await?;
        if !response.status.is_success() {
            return Err(errors::from_reply(
                &self.name,
                ErrorReply::read(response).await,
            ));
        }
        if streaming {
            return Ok(UpstreamReply::Stream(stream::chunks(
                &self.name,
                call.upstream_model,
                stop,
                self.caps,
                http::body_bytes(&self.name, self.caps, response),
            )));
        }
        let bytes = http::read_body(&self.name, self.caps, response).await?;
        response::chat_completion(&self.name, call.upstream_model, &bytes, stop.as_deref())
            .map(UpstreamReply::Complete)
    }
}

impl Provider for Bedrock {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        boxed::pinned(|| self.call(call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_encoded_as_one_path_label() {
        let encoded = |id| utf8_percent_encode(id, LABEL).to_string();
        assert_eq!(
            encoded("us.meta.llama3-3-70b-instruct-v1:0"),
            "us.meta.llama3-3-70b-instruct-v1%3A0"
        );
        assert_eq!(
            encoded("arn:aws:bedrock:us-east-1::foundation-model/x"),
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fx"
        );
    }
}
