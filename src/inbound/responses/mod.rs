//! OpenAI Responses (`POST /v1/responses`), stateless: the request to the
//! canonical chat request (`request.rs`), the canonical answer back
//! (`response.rs`).

mod request;
mod response;

pub use request::to_chat;
pub use response::{ResponsesSink, response};
